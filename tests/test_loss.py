"""YOLOv5 detection loss: CIoU, target assignment against a loop reference, gains, per-image split, training."""
import math
from types import SimpleNamespace

import pytest
import torch

from ghost_deploy.eval.boxes import bbox_iou
from ghost_deploy.train.loss import DetectionLoss

ANCHORS_PIXELS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def make_detect(nc=3, strides=(4.0, 8.0, 16.0)):
    """Detect-like namespace with YOLOv5's attributes (anchors in grid units)."""
    nl = len(strides)
    stride = torch.tensor(strides)
    anchors = torch.tensor(ANCHORS_PIXELS[:nl], dtype=torch.float32).view(nl, 3, 2) / stride.view(-1, 1, 1)
    return SimpleNamespace(nc=nc, na=3, nl=nl, no=nc + 5, stride=stride, anchors=anchors)


def random_heads(detect, batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, detect.na * detect.no, int(size // s), int(size // s), generator=generator)
            for s in detect.stride.tolist()]


def random_targets(batch, count, nc, seed=0, min_size=0.05, max_size=0.4):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, batch, (count, 1), generator=generator).float()
    cls = torch.randint(0, nc, (count, 1), generator=generator).float()
    centre = torch.rand(count, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(count, 2, generator=generator) * (max_size - min_size) + min_size
    return torch.cat((image, cls, centre, size), 1)


# ---------------------------------------------------------------- CIoU

def test_ciou_hand_values():
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert bbox_iou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    shifted = torch.tensor([[1.0, 0.0, 2.0, 2.0]])
    # IoU 2/6; enclosing box 3 x 2 (diagonal^2 13); centre distance^2 1; same aspect so v = 0
    assert bbox_iou(box, shifted, ciou=False).item() == pytest.approx(1 / 3, abs=1e-6)
    assert bbox_iou(box, shifted).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-6)
    # same centre, aspect 1 vs 2: IoU 1/2, v = 4/pi^2 (atan 2 - atan 1)^2, alpha = v / (v - iou + 1)
    tall = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    v = 4 / math.pi ** 2 * (math.atan(0.5) - math.atan(1.0)) ** 2
    assert bbox_iou(tall, box).item() == pytest.approx(0.5 - v * v / (v + 0.5), abs=1e-6)


def test_ciou_gradient_is_finite_for_zero_height_target():
    pred = torch.tensor([[1.0, 1.0, 2.0, 2.0]], requires_grad=True)
    bbox_iou(pred, torch.tensor([[1.0, 1.0, 2.0, 0.0]])).sum().backward()
    assert torch.isfinite(pred.grad).all()


# ---------------------------------------------------------------- assignment

def reference_positives(detect, heads, targets, anchor_t=4.0):
    """Plain-loop YOLOv5 assignment: (level, image, anchor, row, column) for every positive."""
    positives = []
    for level, head in enumerate(heads):
        height, width = head.shape[2:]
        for image, _, cx, cy, w, h in targets.tolist():
            gx, gy, gw, gh = cx * width, cy * height, w * width, h * height
            for anchor, (aw, ah) in enumerate(detect.anchors[level].tolist()):
                if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                    continue
                column, row = int(gx), int(gy)
                cells = [(row, column)]
                if gx % 1 < 0.5 and gx > 1:
                    cells.append((row, column - 1))
                if gy % 1 < 0.5 and gy > 1:
                    cells.append((row - 1, column))
                if gx % 1 > 0.5 and gx < width - 1:
                    cells.append((row, column + 1))
                if gy % 1 > 0.5 and gy < height - 1:
                    cells.append((row + 1, column))
                positives += [(level, int(image), anchor, r, c) for r, c in cells]
    return sorted(positives)


def test_assignment_matches_loop_reference():
    detect = make_detect(nc=3)
    heads = random_heads(detect, batch=3, size=128)
    targets = random_targets(batch=3, count=25, nc=3, min_size=0.02, max_size=0.9)
    assigned = DetectionLoss(detect).build_targets(heads, targets)
    got = sorted((level, *map(int, row)) for level, (image, anchor, gj, gi, *_) in enumerate(assigned)
                 for row in zip(image, anchor, gj, gi))
    expected = reference_positives(detect, heads, targets)
    assert len(expected) > 25 and got == expected


def test_assignment_target_box_and_class():
    detect = make_detect(nc=3, strides=(4.0,))
    heads = random_heads(detect, batch=1, size=64)  # one 16 x 16 level
    # centre at (4.25, 6.75) cells, size = anchor 1 (16 x 30 px = 4 x 7.5 cells)
    targets = torch.tensor([[0, 2, 4.25 / 16, 6.75 / 16, 4 / 16, 7.5 / 16]])
    image, anchor, gj, gi, box, anchor_wh, cls = DetectionLoss(detect).build_targets(heads, targets)[0]
    # all three anchors pass the ratio test; each gets its own cell, the left and the lower neighbour
    assert sorted(zip(anchor.tolist(), gj.tolist(), gi.tolist())) == [
        (a, r, c) for a in range(3) for r, c in sorted([(6, 4), (6, 3), (7, 4)])]
    own = (anchor == 1) & (gj == 6) & (gi == 4)
    torch.testing.assert_close(box[own], torch.tensor([[0.25, 0.75, 4.0, 7.5]]))
    torch.testing.assert_close(anchor_wh[own], torch.tensor([[4.0, 7.5]]))
    left = (anchor == 1) & (gi == 3)
    torch.testing.assert_close(box[left][:, :2], torch.tensor([[1.25, 0.75]]))
    assert cls.tolist() == [2] * 9 and image.tolist() == [0] * 9


# ---------------------------------------------------------------- loss values

def test_gains_follow_yolov5_scaling_with_detector_input_size():
    one_level = DetectionLoss(make_detect(nc=8, strides=(4.0,)), img_size=512)
    assert (one_level.box_gain, one_level.cls_gain) == (pytest.approx(0.15), pytest.approx(0.15))
    assert one_level.obj_gain == pytest.approx(3 * (512 / 640) ** 2)  # 1.92, not 7.68 (B8)
    assert one_level.balance == [4.0]
    three = DetectionLoss(make_detect(nc=8), hyp={"box": 0.05, "obj": 1.0, "cls": 0.5}, img_size=640)
    assert (three.box_gain, three.obj_gain, three.cls_gain) == (0.05, 1.0, pytest.approx(0.05))
    assert three.balance == [4.0, 1.0, 0.4]
    detect = make_detect()
    heads, targets = random_heads(detect), random_targets(2, 6, 3)
    items_640 = DetectionLoss(detect, img_size=640)(heads, targets)[1]
    items_1280 = DetectionLoss(detect, img_size=1280)(heads, targets)[1]
    torch.testing.assert_close(items_1280, items_640 * torch.tensor([1.0, 4.0, 1.0]))


def test_loss_finite_positive_and_differentiable():
    detect = make_detect()
    heads = [h.requires_grad_() for h in random_heads(detect, batch=2)]
    targets = random_targets(batch=2, count=8, nc=3)
    total, items = DetectionLoss(detect)(heads, targets)
    assert total.ndim == 0 and torch.isfinite(total) and total > 0
    assert items.shape == (3,) and (items > 0).all() and not items.requires_grad
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)  # batch-size scaling
    total.backward()
    assert all(torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0 for h in heads)


def test_no_targets_gives_only_objectness():
    detect = make_detect()
    total, items = DetectionLoss(detect)(random_heads(detect), torch.zeros(0, 6))
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    assert total.item() == pytest.approx(items[1].item() * 2, rel=1e-6)


def test_single_class_has_no_class_loss():
    detect = make_detect(nc=1)
    _, items = DetectionLoss(detect)(random_heads(detect), random_targets(2, 5, nc=1))
    assert items[2] == 0 and items[0] > 0


def test_bad_targets_raise():
    detect = make_detect()
    loss = DetectionLoss(detect)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        loss(random_heads(detect), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="image indices"):
        loss(random_heads(detect, batch=2), torch.tensor([[2, 0, 0.5, 0.5, 0.1, 0.1]]))


def test_per_image_loss_is_each_image_alone():
    detect = make_detect()
    heads = random_heads(detect, batch=3)
    targets = random_targets(batch=3, count=9, nc=3)
    targets = targets[targets[:, 0] != 1]  # image 1 has no labels
    loss = DetectionLoss(detect)
    per_image, items = loss(heads, targets, per_image=True)
    assert per_image.shape == (3,)
    torch.testing.assert_close(items, loss(heads, targets)[1])
    for image in range(3):
        alone = targets[targets[:, 0] == image].clone()
        alone[:, 0] = 0
        expected, _ = loss([h[image:image + 1] for h in heads], alone)  # batch 1: scale 1
        torch.testing.assert_close(per_image[image], expected)


def test_per_image_sums_to_batch_loss_for_identical_images():
    detect = make_detect()
    heads = [h.repeat(4, 1, 1, 1) for h in random_heads(detect, batch=1)]
    one = random_targets(batch=1, count=5, nc=3)
    targets = torch.cat([torch.cat((torch.full((5, 1), float(i)), one[:, 1:]), 1) for i in range(4)])
    loss = DetectionLoss(detect)
    per_image, _ = loss(heads, targets, per_image=True)
    total, _ = loss(heads, targets)
    torch.testing.assert_close(per_image.sum(), total)
    torch.testing.assert_close(per_image, per_image[:1].expand(4))


def test_optimising_free_heads_reduces_loss():
    torch.manual_seed(0)
    detect = make_detect(nc=3, strides=(4.0, 8.0))
    heads = [torch.nn.Parameter(h * 0.1) for h in random_heads(detect, batch=2, size=64)]
    targets = random_targets(batch=2, count=6, nc=3)
    loss = DetectionLoss(detect, img_size=64)
    optimiser = torch.optim.Adam(heads, lr=0.05)
    first_total, first_items = loss(heads, targets)
    for _ in range(50):
        optimiser.zero_grad()
        total, items = loss(heads, targets)
        total.backward()
        optimiser.step()
    assert total < 0.3 * first_total
    assert (items < first_items).all()
