"""Torch-free head decoding and NMS (NumPy), for engines and runtimes that have no torch.

These are the twins of `evaluate.decode_heads` and `evaluate.non_max_suppression`, with the same
conventions and the same arithmetic, so both give identical detections (tests/test_evaluate.py).

- Head map: (B, na*(nc+5), H, W), anchor-major: channels [a*no:(a+1)*no] are anchor a, laid out
  [x, y, w, h, obj, cls...] (raw logits).
- Decoded prediction: (B, N, 5+nc) = [cx, cy, w, h] in input pixels, then sigmoid(obj), sigmoid(cls...);
  N runs over levels, then anchors, then rows, then columns (YOLOv5 order).
- Detections: per image (n, 6) = [x1, y1, x2, y2, score, class], score = obj * cls, highest first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ghost_deploy.eval.boxes import box_iou_np, xywh2xyxy

# Candidates kept (by score) before NMS, as YOLOv5: bounds the work on an untrained model.
MAX_NMS = 30000


def sigmoid_np(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large negative logits, unlike 1 / (1 + exp(-x))
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype, copy=False)


def decode_heads_np(heads: Sequence[np.ndarray], strides: Sequence[float], anchors_pixels, nc: int) -> np.ndarray:
    """Decode raw head maps into (B, N, 5+nc) predictions (YOLOv5: xy = (2s - 0.5 + grid) * stride,
    wh = (2s)^2 * anchor). `anchors_pixels`: (nl, na, 2) anchor sizes in input pixels."""
    anchors_pixels = np.asarray(anchors_pixels, dtype=np.float32)
    no = nc + 5
    outputs = []
    for level, head in enumerate(heads):
        batch, channels, height, width = head.shape
        na = channels // no
        p = sigmoid_np(head.astype(np.float32).reshape(batch, na, no, height, width).transpose(0, 1, 3, 4, 2))
        grid_y, grid_x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        grid = np.stack((grid_x, grid_y), -1).reshape(1, 1, height, width, 2).astype(np.float32)
        anchor = anchors_pixels[level].reshape(1, na, 1, 1, 2)
        xy = (p[..., :2] * 2 - 0.5 + grid) * np.float32(strides[level])
        wh = (p[..., 2:4] * 2) ** 2 * anchor
        outputs.append(np.concatenate((xy, wh, p[..., 4:]), -1).reshape(batch, -1, no))
    return np.concatenate(outputs, 1)


def greedy_nms_np(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_thres: float,
                  max_keep: int) -> np.ndarray:
    """Indices kept by per-class greedy NMS, highest score first, at most `max_keep`.

    A box is suppressed by a higher-scored kept box of the same class with IoU > iou_thres. Stopping at
    `max_keep` gives the same result as running to the end and truncating, since kept boxes come in
    score order; each step only touches the boxes still standing, so junk-heavy early-training
    predictions cost O(kept x candidates), not candidates squared.
    """
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_keep:
        best, rest = order[0], order[1:]
        keep.append(best)
        # a class mask rather than YOLOv5's class offset: offsets of 7680*cls cost float32 precision
        iou = box_iou_np(boxes[best][None], boxes[rest])[0]
        order = rest[(iou <= iou_thres) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=np.int64)


def non_max_suppression_np(pred: np.ndarray, conf_thres: float = 0.001, iou_thres: float = 0.6,
                           max_det: int = 300, multi_label: bool = True, with_anchors: bool = False) -> list:
    """Standard (not merge) NMS of decoded predictions (B, N, 5+nc) -> per image (n, 6) float32.

    Candidates need obj > conf_thres and score = obj * cls > conf_thres; with `multi_label` a box yields
    one candidate per class above the threshold, else only its best class. `with_anchors`: per image a pair
    ((n, 6) detections, (n,) index into N of the prediction each came from).
    """
    output = []
    for image_pred in pred:
        candidates = np.nonzero(image_pred[:, 4] > conf_thres)[0]
        x = image_pred[candidates]
        scores = x[:, 5:] * x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            rows, cls = np.nonzero(scores > conf_thres)
            det = np.concatenate((boxes[rows], scores[rows, cls, None], cls[:, None].astype(np.float32)), 1)
        else:
            cls = scores.argmax(1)
            best = scores[np.arange(len(scores)), cls]
            rows = np.nonzero(best > conf_thres)[0]
            det = np.concatenate((boxes, best[:, None], cls[:, None].astype(np.float32)), 1)[rows]
        order = np.argsort(-det[:, 4], kind="stable")[:MAX_NMS]
        det = det[order].astype(np.float32, copy=False)
        keep = greedy_nms_np(det[:, :4], det[:, 4], det[:, 5], iou_thres, max_det)
        kept = det[keep].reshape(-1, 6)
        output.append((kept, candidates[rows[order[keep]]]) if with_anchors else kept)
    return output
