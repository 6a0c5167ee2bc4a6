"""Box helpers for torch tensors and NumPy arrays.

Boxes are `xyxy` = [x1, y1, x2, y2] or `xywh` = [cx, cy, w, h] (centre, size), in pixels, with no +1
in widths or areas (the COCO / YOLOv5 convention). This module never imports torch: the tensor helpers
use Tensor methods only, so torch-free code (engines, `postprocess.py`) can import it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Floor for a union area: keeps degenerate boxes from dividing by zero without moving any IoU of real
# boxes (an eps added to every union would put an IoU of exactly 0.5 just below a 0.5 threshold).
_MIN_UNION = 1e-9


def _copy(boxes):
    return boxes.clone() if hasattr(boxes, "clone") else np.array(boxes, copy=True)


def xywh2xyxy(boxes):
    """[cx, cy, w, h] -> [x1, y1, x2, y2] over the last axis; tensor or array in, same kind out."""
    out = _copy(boxes)
    out[..., 0] = boxes[..., 0] - boxes[..., 2] / 2
    out[..., 1] = boxes[..., 1] - boxes[..., 3] / 2
    out[..., 2] = boxes[..., 0] + boxes[..., 2] / 2
    out[..., 3] = boxes[..., 1] + boxes[..., 3] / 2
    return out


def xyxy2xywh(boxes):
    """[x1, y1, x2, y2] -> [cx, cy, w, h] over the last axis; tensor or array in, same kind out."""
    out = _copy(boxes)
    out[..., 0] = (boxes[..., 0] + boxes[..., 2]) / 2
    out[..., 1] = (boxes[..., 1] + boxes[..., 3]) / 2
    out[..., 2] = boxes[..., 2] - boxes[..., 0]
    out[..., 3] = boxes[..., 3] - boxes[..., 1]
    return out


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy tensors (n, 4) and (m, 4) -> (n, m). Same arithmetic as `box_iou_np`."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    top_left = boxes_a[:, None, :2].maximum(boxes_b[None, :, :2])
    bottom_right = boxes_a[:, None, 2:].minimum(boxes_b[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=_MIN_UNION)


def box_iou_np(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy arrays (n, 4) and (m, 4) -> (n, m)."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    size = np.clip(bottom_right - top_left, 0, None)
    inter = size[..., 0] * size[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.asarray(_MIN_UNION, dtype=union.dtype))


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, ciou: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU (or CIoU) of xywh tensors (n, 4) and (n, 4) -> (n,), differentiable.

    CIoU = IoU - centre distance^2 / enclosing diagonal^2 - alpha * v (Zheng et al. 2020), as in YOLOv5.
    alpha is detached, as YOLOv5 computes it under no_grad.
    """
    x1, y1, w1, h1 = box1.unbind(-1)
    x2, y2, w2, h2 = box2.unbind(-1)
    h1, h2 = h1.clamp(min=eps), h2.clamp(min=eps)  # a zero-height label would make atan(w/h) NaN
    left1, right1, top1, bottom1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    left2, right2, top2, bottom2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = ((right1.minimum(right2) - left1.maximum(left2)).clamp(min=0)
             * (bottom1.minimum(bottom2) - top1.maximum(top2)).clamp(min=0))
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    if not ciou:
        return iou
    enclose_w = right1.maximum(right2) - left1.minimum(left2)
    enclose_h = bottom1.maximum(bottom2) - top1.minimum(top2)
    diagonal2 = enclose_w ** 2 + enclose_h ** 2 + eps
    centre2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi ** 2) * ((w2 / h2).atan() - (w1 / h1).atan()) ** 2
    alpha = (v / (v - iou + (1 + eps))).detach()
    return iou - (centre2 / diagonal2 + v * alpha)
