"""Head decoding, NMS and COCO-style mAP.

Conventions (docs/DESIGN.md):
- Head maps (B, na*(nc+5), H, W), anchor-major, raw logits; `detect` is the model's Detect head (or any
  object with `nc`, `na`, `no`, `stride` (nl,) and `anchors` (nl, na, 2) in grid units, as YOLOv5).
- Detections: per image (n, 6) = [x1, y1, x2, y2, score, class] in input pixels (score = obj * cls).
- Ground truth for mAP: per image (m, 5) = [class, x1, y1, x2, y2] in the same pixels.

The mAP follows COCOeval (iouType bbox, area 'all', no maxDets cap beyond what NMS keeps): per class,
detections of all images sorted by score, each matched greedily to the unmatched label of the same
class with the highest IoU >= threshold; AP is the 101-point interpolated area under the monotone
precision envelope; mAP averages over classes that have labels. Stock NMS, no merge-NMS (bug B12).
Torch-free twins of decoding and NMS live in `postprocess.py`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ghost_deploy.eval.boxes import box_iou_np, xywh2xyxy
from ghost_deploy.eval.postprocess import (  # noqa: F401 (twins)
    MAX_NMS,
    decode_heads_np,
    greedy_nms_np,
    non_max_suppression_np,
)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # where P, R and F1 are sampled to pick the reporting threshold


def decode_heads(heads: Sequence[torch.Tensor], detect) -> torch.Tensor:
    """Raw head maps -> (B, N, 5+nc): [cx, cy, w, h] in input pixels, sigmoid(obj), sigmoid(cls...).

    YOLOv5 decoding: xy = (2*sigmoid - 0.5 + grid) * stride, wh = (2*sigmoid)^2 * anchor_pixels.
    N runs over levels, anchors, rows, columns. Differentiable.
    """
    outputs = []
    for level, head in enumerate(heads):
        batch, _, height, width = head.shape
        p = head.float().view(batch, detect.na, detect.no, height, width).permute(0, 1, 3, 4, 2).sigmoid()
        grid_y, grid_x = torch.meshgrid(torch.arange(height, device=head.device),
                                        torch.arange(width, device=head.device), indexing="ij")
        grid = torch.stack((grid_x, grid_y), -1).view(1, 1, height, width, 2).float()
        stride = detect.stride[level].to(head.device, torch.float32)
        anchor = (detect.anchors[level].to(head.device, torch.float32) * stride).view(1, detect.na, 1, 1, 2)
        xy = (p[..., :2] * 2 - 0.5 + grid) * stride
        wh = (p[..., 2:4] * 2) ** 2 * anchor
        outputs.append(torch.cat((xy, wh, p[..., 4:]), -1).view(batch, -1, detect.no))
    return torch.cat(outputs, 1)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float,
               max_keep: int) -> torch.Tensor:
    """Indices kept by per-class greedy NMS: the numpy implementation, so both paths agree exactly."""
    keep = greedy_nms_np(boxes.detach().cpu().float().numpy(), scores.detach().cpu().float().numpy(),
                         classes.detach().cpu().numpy(), iou_thres, max_keep)
    return torch.from_numpy(keep).to(boxes.device)


@torch.no_grad()
def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6,
                        max_det: int = 300, multi_label: bool = True) -> list[torch.Tensor]:
    """Standard (not merge) NMS of decoded predictions (B, N, 5+nc) -> per image (n, 6), best first.

    Candidates need obj > conf_thres and score = obj * cls > conf_thres; with `multi_label` a box yields
    one candidate per class above the threshold, else only its best class. Same results as
    `postprocess.non_max_suppression_np`.
    """
    output = []
    for image_pred in pred:
        x = image_pred[image_pred[:, 4] > conf_thres]
        scores = x[:, 5:] * x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            rows, cls = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[rows], scores[rows, cls, None], cls[:, None].float()), 1)
        else:
            best, cls = scores.max(1)
            det = torch.cat((boxes, best[:, None], cls[:, None].float()), 1)[best > conf_thres]
        det = det[det[:, 4].argsort(descending=True, stable=True)[:MAX_NMS]]
        keep = greedy_nms(det[:, :4], det[:, 4], det[:, 5], iou_thres, max_det)
        output.append(det[keep].reshape(-1, 6))
    return output


def targets_to_pixels(targets: torch.Tensor, batch_size: int, width: int, height: int) -> list[np.ndarray]:
    """Batch targets (N, 6) [image_index, class, cx, cy, w, h] normalised -> per image (m, 5) [class, x1, y1,
    x2, y2] in input pixels, the ground-truth format of `MeanAP.update`."""
    t = _as_numpy(targets).reshape(-1, 6).astype(np.float64)
    boxes = xywh2xyxy(t[:, 2:6] * np.array([width, height, width, height]))
    gt = np.concatenate((t[:, 1:2], boxes), 1)
    return [gt[t[:, 0] == image] for image in range(batch_size)]


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def match_detections(det: np.ndarray, gt: np.ndarray, iou_thresholds: np.ndarray) -> np.ndarray:
    """(n, T) bool: whether each detection (sorted by score, best first) is a true positive at each IoU
    threshold. Greedy COCO matching: a detection takes the unmatched same-class label of highest IoU >= t."""
    correct = np.zeros((len(det), len(iou_thresholds)), dtype=bool)
    if not len(det) or not len(gt):
        return correct
    iou = box_iou_np(det[:, :4], gt[:, 1:5])
    iou[det[:, 5][:, None] != gt[:, 0][None, :]] = -1.0  # other classes never match
    matched = np.zeros((len(iou_thresholds), len(gt)), dtype=bool)
    for index, row in enumerate(iou):
        candidate = (row[None, :] >= iou_thresholds[:, None]) & ~matched
        found = candidate.any(1)
        if found.any():
            best = np.where(candidate, row[None, :], -1.0).argmax(1)
            matched[found, best[found]] = True
            correct[index, found] = True
    return correct


def average_precision_101(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO 101-point AP: mean over recall r in {0, .01, .., 1} of the best precision at recall >= r."""
    if not len(recall):
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(index < len(recall), envelope[np.minimum(index, len(recall) - 1)], 0.0).mean())


class MeanAP:
    """Accumulates detections and labels image by image; `compute()` gives COCO-style AP.

    `update(predictions, targets)`: lists (one entry per image) of detections (n, 6) [x1, y1, x2, y2,
    score, class] and labels (m, 5) [class, x1, y1, x2, y2], tensors or arrays, same pixels.
    """

    def __init__(self, nc: int, iou_thresholds: Sequence[float] = IOU_THRESHOLDS):
        self.nc = nc
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        self._correct, self._scores, self._classes = [], [], []
        self.labels_per_class = np.zeros(nc, dtype=np.int64)

    def update(self, predictions: Sequence, targets: Sequence) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} label lists")
        for det, gt in zip(predictions, targets):
            det = _as_numpy(det).astype(np.float64).reshape(-1, 6)
            gt = _as_numpy(gt).astype(np.float64).reshape(-1, 5)
            for name, cls in (("detection", det[:, 5]), ("label", gt[:, 0])):
                if len(cls) and (cls.min() < 0 or cls.max() >= self.nc or (cls % 1).any()):
                    raise ValueError(f"{name} class outside 0..{self.nc - 1}: {np.unique(cls).tolist()}")
            det = det[np.argsort(-det[:, 4], kind="stable")]
            self._correct.append(match_detections(det, gt, self.iou_thresholds))
            self._scores.append(det[:, 4])
            self._classes.append(det[:, 5].astype(np.int64))
            self.labels_per_class += np.bincount(gt[:, 0].astype(np.int64), minlength=self.nc)

    def compute(self) -> dict:
        """mAP50, mAP50_95 (mean over classes with labels; 0.0 when no class has labels), precision and
        recall (means over those classes at the confidence `f1_conf` that maximises their mean F1,
        YOLOv5-style, without F1 smoothing), and per-class lists (None where a class has no labels)."""
        thresholds = len(self.iou_thresholds)
        correct = np.concatenate(self._correct) if self._correct else np.zeros((0, thresholds), bool)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        classes = np.concatenate(self._classes) if self._classes else np.zeros(0, np.int64)
        order = np.argsort(-scores, kind="stable")
        correct, scores, classes = correct[order], scores[order], classes[order]

        ap = np.zeros((self.nc, thresholds))
        precision_at, recall_at = np.zeros((self.nc, len(CONF_GRID))), np.zeros((self.nc, len(CONF_GRID)))
        has_labels = self.labels_per_class > 0
        for c in np.flatnonzero(has_labels):
            hits = correct[classes == c]
            true_pos = np.cumsum(hits, 0)
            recall = true_pos / self.labels_per_class[c]
            precision = true_pos / np.arange(1, len(hits) + 1)[:, None]
            ap[c] = [average_precision_101(recall[:, t], precision[:, t]) for t in range(thresholds)]
            if len(hits):  # P and R against confidence at the first IoU threshold (0.5)
                neg_scores = -scores[classes == c]
                recall_at[c] = np.interp(-CONF_GRID, neg_scores, recall[:, 0], left=0.0)
                precision_at[c] = np.interp(-CONF_GRID, neg_scores, precision[:, 0], left=1.0)

        f1 = 2 * precision_at * recall_at / (precision_at + recall_at + 1e-16)
        best = int(f1[has_labels].mean(0).argmax()) if has_labels.any() else 0

        def mean(values: np.ndarray) -> float:
            return float(values[has_labels].mean()) if has_labels.any() else 0.0

        def per_class(values: np.ndarray) -> list:
            return [float(v) if labelled else None for v, labelled in zip(values, has_labels)]

        return {
            "mAP50": mean(ap[:, 0]),
            "mAP50_95": mean(ap.mean(1)),
            "precision": mean(precision_at[:, best]),
            "recall": mean(recall_at[:, best]),
            "f1_conf": float(CONF_GRID[best]),
            "iou_thresholds": self.iou_thresholds.tolist(),
            "per_class": {
                "ap50": per_class(ap[:, 0]),
                "ap50_95": per_class(ap.mean(1)),
                "precision": per_class(precision_at[:, best]),
                "recall": per_class(recall_at[:, best]),
                "labels": self.labels_per_class.tolist(),
            },
        }


def evaluate_detections(predictions: Sequence, targets: Sequence, nc: int,
                        iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
    """One-shot `MeanAP`: see `MeanAP.update` for the formats and `MeanAP.compute` for the result."""
    metric = MeanAP(nc, iou_thresholds)
    metric.update(predictions, targets)
    return metric.compute()


def format_ap_table(result: dict, names: Sequence[str]) -> str:
    """Per-class table (class, labels, P, R, AP50, AP50:95) for the terminal; '-' where a class has no labels."""
    per_class = result["per_class"]
    if len(names) != len(per_class["labels"]):
        raise ValueError(f"{len(names)} class names for {len(per_class['labels'])} classes")
    width = max([len("class"), len("all"), *(len(str(n)) for n in names)])

    def row(name, labels, *values) -> str:
        cells = "".join(f"{'-' if v is None else format(v, '.3f'):>9}" for v in values)
        return f"{name:<{width}} {labels:>7}{cells}"

    lines = [f"{'class':<{width}} {'labels':>7}{'P':>9}{'R':>9}{'AP50':>9}{'AP50:95':>9}",
             row("all", sum(per_class["labels"]), result["precision"], result["recall"],
                 result["mAP50"], result["mAP50_95"])]
    for index, name in enumerate(names):
        lines.append(row(name, per_class["labels"][index], per_class["precision"][index],
                         per_class["recall"][index], per_class["ap50"][index], per_class["ap50_95"][index]))
    return "\n".join(lines)
