"""YOLOv5 detection loss (utils/loss.py ComputeLoss, without focal loss, label smoothing or pos_weight).

- box: mean over positives of 1 - CIoU(predicted box, target box);
- obj: per level, BCE mean over every (image, anchor, cell) with the detached IoU (gr = 1) as the target
  of positives and 0 elsewhere, weighted by the level balance ([4.0, 1.0, 0.4] for 3 levels, [4.0] for 1);
- cls: BCE mean over positives x classes, one-hot targets (skipped when nc == 1, as YOLOv5).
Positives: a target goes to every anchor whose wh ratio max(r, 1/r) < anchor_t, in its own cell and in
the up to two neighbour cells nearest to its centre (offset 0.5). Gains are scaled as YOLOv5 train.py:
box *= 3/nl, cls *= nc/80 * 3/nl, obj *= (img_size/640)^2 * 3/nl, with img_size the DETECTOR INPUT size
(the original used the training image size, bug B8).

Inputs: `heads` = list of raw maps (B, na*(nc+5), H, W), anchor-major; `targets` = (N, 6)
[image_index, class, cx, cy, w, h] normalised to the detector input.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ghost_deploy.eval.boxes import bbox_iou

DEFAULT_HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0}  # YOLOv5 hyp.scratch.yaml
DEFAULT_BALANCE = {1: [4.0], 3: [4.0, 1.0, 0.4]}
# Own cell, then the left, upper, right and lower neighbours (subtracted from the centre, in cells).
NEIGHBOUR_OFFSETS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 0.5


class DetectionLoss:
    """`loss(heads, targets)` -> (total, items); `loss(heads, targets, per_image=True)` -> (per_image, items).

    total = (box + obj + cls) * B, each term the gain-scaled batch mean (YOLOv5's batch-size scaling);
    items = detached [box, obj, cls] batch means (without the * B).
    per_image (B,) = for each image the same three terms computed over that image alone, i.e. exactly
    `loss(heads[b:b+1], targets_of_b)[0]`. Its obj part sums to the batch obj * B; box and cls are means
    over each image's own positives, so `per_image.sum() == total` only when every image has the same
    number of positives per level (e.g. identical images).
    """

    def __init__(self, detect, hyp: Mapping[str, float] | None = None, img_size: int = 640,
                 balance: Sequence[float] | None = None):
        hyp = {**DEFAULT_HYP, **(hyp or {})}
        if detect.no != detect.nc + 5:
            raise ValueError(f"Detect.no = {detect.no}, expected nc + 5 = {detect.nc + 5}")
        self.detect = detect  # anchors are read on every call, so moving the model to a device is fine
        self.nc, self.na, self.nl = detect.nc, detect.na, detect.nl
        level_scale = 3.0 / self.nl
        self.box_gain = hyp["box"] * level_scale
        self.cls_gain = hyp["cls"] * self.nc / 80 * level_scale
        self.obj_gain = hyp["obj"] * (img_size / 640) ** 2 * level_scale
        self.anchor_t = hyp["anchor_t"]
        self.balance = list(balance or DEFAULT_BALANCE.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02][:self.nl]))
        if len(self.balance) != self.nl:
            raise ValueError(f"{len(self.balance)} balance weights for {self.nl} levels")

    def __call__(self, heads: Sequence[torch.Tensor], targets: torch.Tensor, per_image: bool = False):
        # float32 under autocast too: BCE on logits and the IoU terms lose too much in bf16/fp16
        with torch.autocast(heads[0].device.type, enabled=False):
            return self._loss([head.float() for head in heads], targets.float(), per_image)

    def _loss(self, heads: Sequence[torch.Tensor], targets: torch.Tensor, per_image: bool):
        if len(heads) != self.nl:
            raise ValueError(f"{len(heads)} head maps for a Detect with {self.nl} levels")
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (N, 6) [image, class, cx, cy, w, h], got {tuple(targets.shape)}")
        batch, device = heads[0].shape[0], heads[0].device
        if len(targets) and not 0 <= int(targets[:, 0].min()) <= int(targets[:, 0].max()) < batch:
            raise ValueError(f"target image indices must lie in 0..{batch - 1}")
        targets = targets.to(device, torch.float32)
        batch_terms = torch.zeros(3, device=device)  # box, obj, cls
        image_terms = torch.zeros(3, batch, device=device)
        for level, (head, assigned) in enumerate(zip(heads, self.build_targets(heads, targets))):
            image, anchor, gj, gi, target_box, anchor_wh, target_cls = assigned
            _, _, height, width = head.shape
            p = head.float().view(batch, self.na, self.nc + 5, height, width).permute(0, 1, 3, 4, 2)
            target_obj = torch.zeros(p.shape[:4], device=device)
            if len(image):
                chosen = p[image, anchor, gj, gi]
                pred_xy = chosen[:, :2].sigmoid() * 2 - 0.5
                pred_wh = (chosen[:, 2:4].sigmoid() * 2) ** 2 * anchor_wh
                iou = bbox_iou(torch.cat((pred_xy, pred_wh), 1), target_box, ciou=True)
                box = 1.0 - iou
                target_obj[image, anchor, gj, gi] = iou.detach().clamp(min=0)
                batch_terms[0] += box.mean()
                image_terms[0] += _mean_by_image(box, image, batch)
                if self.nc > 1:
                    onehot = F.one_hot(target_cls, self.nc).float()
                    cls = F.binary_cross_entropy_with_logits(chosen[:, 5:], onehot, reduction="none").mean(1)
                    batch_terms[2] += cls.mean()
                    image_terms[2] += _mean_by_image(cls, image, batch)
            obj = F.binary_cross_entropy_with_logits(p[..., 4], target_obj, reduction="none")
            batch_terms[1] += obj.mean() * self.balance[level]
            image_terms[1] += obj.mean((1, 2, 3)) * self.balance[level]
        gains = torch.tensor([self.box_gain, self.obj_gain, self.cls_gain], device=device)
        items = (batch_terms * gains).detach()
        if per_image:
            return (image_terms * gains[:, None]).sum(0), items
        return (batch_terms * gains).sum() * batch, items

    def build_targets(self, heads: Sequence[torch.Tensor], targets: torch.Tensor) -> list[tuple]:
        """Positives per level: (image, anchor, gj, gi, target_box, anchor_wh, target_cls).

        target_box = [x, y, w, h] in grid units, xy relative to the assigned cell (so in -0.5..1.5);
        anchor_wh = the assigned anchor in grid units; gj/gi = row/column of the cell.
        """
        device, count = targets.device, targets.shape[0]
        anchor_index = torch.arange(self.na, device=device).float().view(self.na, 1).repeat(1, count)
        all_targets = torch.cat((targets.repeat(self.na, 1, 1), anchor_index[..., None]), 2)  # (na, N, 7)
        offsets_table = NEIGHBOUR_OFFSETS.to(device)
        gain = torch.ones(7, device=device)
        assigned = []
        for level, head in enumerate(heads):
            height, width = head.shape[2:]
            anchors = self.detect.anchors[level].to(device, torch.float32)
            gain[2:6] = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)
            t = all_targets * gain  # xywh now in grid units
            offsets = torch.zeros(0, 2, device=device)
            if count:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2).values < self.anchor_t]
                grid_xy = t[:, 2:4]
                grid_xy_inverse = gain[[2, 3]] - grid_xy
                left, up = ((grid_xy % 1 < 0.5) & (grid_xy > 1)).T
                right, down = ((grid_xy_inverse % 1 < 0.5) & (grid_xy_inverse > 1)).T
                use = torch.stack((torch.ones_like(left), left, up, right, down))
                t = t.repeat((5, 1, 1))[use]
                offsets = (torch.zeros_like(grid_xy)[None] + offsets_table[:, None])[use]
            else:
                t = t[0]
            grid_xy, grid_wh, anchor = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            cell = (grid_xy - offsets).long()
            gi, gj = cell[:, 0].clamp(0, width - 1), cell[:, 1].clamp(0, height - 1)
            assigned.append((t[:, 0].long(), anchor, gj, gi, torch.cat((grid_xy - cell, grid_wh), 1),
                             anchors[anchor], t[:, 1].long()))
        return assigned


def _mean_by_image(values: torch.Tensor, image: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) mean of `values` over the entries of each image; 0 for an image with none."""
    sums = torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(0, image, values)
    counts = torch.bincount(image, minlength=batch).clamp(min=1)
    return sums / counts
