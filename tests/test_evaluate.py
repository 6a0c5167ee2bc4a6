"""Decoding, NMS (torch vs NumPy), and COCO-style mAP (hand cases and a pycocotools cross-check)."""
import contextlib
import io
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ghost_deploy.eval.boxes import box_iou, box_iou_np, xywh2xyxy, xyxy2xywh
from ghost_deploy.eval.evaluate import (MeanAP, decode_heads, evaluate_detections, format_ap_table,
                                   non_max_suppression, targets_to_pixels)
from ghost_deploy.eval.postprocess import decode_heads_np, non_max_suppression_np

ANCHORS_PIXELS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def make_detect(nc=2, strides=(4.0, 8.0, 16.0)):
    """Detect-like namespace with YOLOv5's attributes (anchors in grid units)."""
    nl = len(strides)
    stride = torch.tensor(strides)
    anchors = torch.tensor(ANCHORS_PIXELS[:nl], dtype=torch.float32).view(nl, 3, 2) / stride.view(-1, 1, 1)
    return SimpleNamespace(nc=nc, na=3, nl=nl, no=nc + 5, stride=stride, anchors=anchors)


def random_heads(detect, batch=2, size=32, scale=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, detect.na * detect.no, int(size // s), int(size // s), generator=generator) * scale
            for s in detect.stride.tolist()]


# ---------------------------------------------------------------- decoding

def test_decode_hand_case_and_anchor_major_layout():
    detect = make_detect(nc=2)
    heads = [torch.zeros(1, 21, 8, 8), torch.zeros(1, 21, 4, 4), torch.zeros(1, 21, 2, 2)]
    heads[0][0, 1 * 7 + 4, 2, 3] = 10.0  # anchor 1, obj channel, row 2, column 3
    pred = decode_heads(heads, detect)
    assert pred.shape == (1, 3 * (64 + 16 + 4), 7)
    index = 1 * 64 + 2 * 8 + 3
    # zero logits: xy = (2*0.5 - 0.5 + cell) * stride, wh = anchor pixels
    torch.testing.assert_close(pred[0, index, :4], torch.tensor([3.5 * 4, 2.5 * 4, 16.0, 30.0]))
    assert pred[0, index, 4] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())
    assert (pred[0, :, 4] == 0.5).sum() == pred.shape[1] - 1
    last = 3 * 64 + 3 * 16 + 2 * 4 + 1 * 2 + 1  # level 2, anchor 2, row 1, column 1
    torch.testing.assert_close(pred[0, last, :4], torch.tensor([1.5 * 16, 1.5 * 16, 373.0, 326.0]))


def test_decode_numpy_twin_matches_torch():
    detect = make_detect(nc=3)
    heads = random_heads(detect, batch=2, size=64)
    expected = decode_heads(heads, detect).numpy()
    anchors_pixels = (detect.anchors * detect.stride.view(-1, 1, 1)).numpy()
    got = decode_heads_np([h.numpy() for h in heads], detect.stride.tolist(), anchors_pixels, nc=3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_box_helpers_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    xywh = rng.uniform(5, 50, (6, 4)).astype(np.float32)
    xyxy = xywh2xyxy(xywh)
    np.testing.assert_allclose(xyxy2xywh(xyxy), xywh, rtol=1e-6)
    np.testing.assert_array_equal(xywh2xyxy(torch.from_numpy(xywh)).numpy(), xyxy)
    np.testing.assert_array_equal(box_iou(torch.from_numpy(xyxy), torch.from_numpy(xyxy[:3])).numpy(),
                                  box_iou_np(xyxy, xyxy[:3]))
    square = np.array([[0, 0, 10, 10]], dtype=np.float64)
    others = np.array([[5, 0, 15, 10], [10, 10, 20, 20], [0, 0, 10, 10], [3, 3, 3, 3]], dtype=np.float64)
    np.testing.assert_allclose(box_iou_np(square, others), [[1 / 3, 0, 1, 0]])
    assert box_iou_np(others[3:], others[3:])[0, 0] == 0  # degenerate box: no division by zero


def test_postprocess_does_not_import_torch():
    code = "import sys, ghost_deploy.eval.postprocess; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- NMS

def xywh_pred(rows, nc):
    """Rows of (cx, cy, w, h, obj, cls...) as a (1, n, 5+nc) tensor."""
    return torch.tensor([rows], dtype=torch.float32).view(1, -1, 5 + nc)


def test_nms_hand_case():
    pred = xywh_pred([
        [50, 50, 20, 20, 0.9, 1.0, 0.0],   # kept (class 0, score .9)
        [51, 50, 20, 20, 0.8, 1.0, 0.0],   # IoU ~.9 with the first, same class: suppressed
        [51, 50, 20, 20, 0.7, 0.0, 1.0],   # same place, other class: kept
        [150, 150, 10, 10, 0.6, 0.5, 0.5],  # alone, both classes above conf: two detections (multi-label)
        [10, 10, 4, 4, 0.0005, 1.0, 0.0],  # obj below conf_thres: dropped
    ], nc=2)
    (det,) = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.6)
    expected = torch.tensor([[40, 40, 60, 60, 0.9, 0], [41, 40, 61, 60, 0.7, 1],
                             [145, 145, 155, 155, 0.3, 0], [145, 145, 155, 155, 0.3, 1]])
    torch.testing.assert_close(det, expected)
    (single,) = non_max_suppression(pred, multi_label=False)
    assert single.shape == (3, 6) and single[:, 5].tolist() == [0, 1, 0]
    (capped,) = non_max_suppression(pred, max_det=2)
    torch.testing.assert_close(capped, expected[:2])
    (loose,) = non_max_suppression(pred, iou_thres=0.95)  # IoU .905 < .95: the duplicate survives
    assert len(loose) == 5


def test_nms_empty_image():
    pred = torch.zeros(2, 10, 7)
    out = non_max_suppression(pred)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
    assert [o.shape for o in non_max_suppression_np(pred.numpy())] == [(0, 6), (0, 6)]


@pytest.mark.parametrize("multi_label", [True, False])
def test_nms_numpy_twin_identical(multi_label):
    rng = np.random.default_rng(1)
    nc, batch, count = 4, 3, 1500
    centres = rng.uniform(20, 236, size=(batch, 40, 2))  # clusters force plenty of suppression
    pred = np.zeros((batch, count, 5 + nc), dtype=np.float32)
    pick = rng.integers(0, 40, size=(batch, count))
    pred[..., :2] = np.take_along_axis(centres, pick[..., None], 1) + rng.normal(0, 4, (batch, count, 2))
    pred[..., 2:4] = rng.uniform(8, 40, (batch, count, 2))
    pred[..., 4:] = rng.uniform(0, 1, (batch, count, 1 + nc)) ** 3
    torch_out = non_max_suppression(torch.from_numpy(pred), conf_thres=0.01, iou_thres=0.5, max_det=100,
                                    multi_label=multi_label)
    numpy_out = non_max_suppression_np(pred, conf_thres=0.01, iou_thres=0.5, max_det=100, multi_label=multi_label)
    for t, n in zip(torch_out, numpy_out):
        assert 0 < len(n) <= 100
        np.testing.assert_array_equal(t.numpy(), n)


def test_nms_runs_on_decoded_heads():
    detect = make_detect(nc=2)
    heads = random_heads(detect, batch=2, size=64)
    out = non_max_suppression(decode_heads(heads, detect), max_det=50)
    assert all(o.shape[1] == 6 and 0 < len(o) <= 50 for o in out)
    assert all((o[:-1, 4] >= o[1:, 4]).all() for o in out)


# ---------------------------------------------------------------- mAP: hand cases

def gt_array(rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def det_array(rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


GT_FOUR = gt_array([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30], [0, 40, 40, 50, 50], [0, 60, 60, 70, 70]])


def test_map_perfect_predictions():
    targets = [GT_FOUR, gt_array([[1, 5, 5, 25, 45]])]
    predictions = [np.concatenate((g[:, 1:], np.full((len(g), 1), 0.9), g[:, :1]), 1) for g in targets]
    result = evaluate_detections(predictions, targets, nc=2)
    assert result["mAP50"] == pytest.approx(1.0) and result["mAP50_95"] == pytest.approx(1.0)
    assert result["precision"] == pytest.approx(1.0) and result["recall"] == pytest.approx(1.0)
    assert result["per_class"]["labels"] == [4, 1]


def test_map_half_missed():
    # 2 of 4 labels found at precision 1: recall points 0, .01, .., .50 score 1 -> AP = 51/101
    predictions = [det_array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 0]])]
    result = evaluate_detections(predictions, [GT_FOUR], nc=1)
    assert result["mAP50"] == pytest.approx(51 / 101)
    assert result["mAP50_95"] == pytest.approx(51 / 101)
    assert result["precision"] == pytest.approx(1.0) and result["recall"] == pytest.approx(0.5)


def test_map_false_positive_ranked_first():
    # FP (.9), TP (.8), TP (.7) for 2 labels: precision 0, 1/2, 2/3; the envelope is 2/3 at every recall
    targets = [gt_array([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]])]
    predictions = [det_array([[100, 100, 110, 110, 0.9, 0], [0, 0, 10, 10, 0.8, 0], [20, 20, 30, 30, 0.7, 0]])]
    assert evaluate_detections(predictions, targets, nc=1)["mAP50"] == pytest.approx(2 / 3)
    # FP last instead: precision 1 up to recall 1 -> AP 1
    predictions[0][0, 4] = 0.1
    assert evaluate_detections(predictions, targets, nc=1)["mAP50"] == pytest.approx(1.0)


def test_map_localisation_and_duplicates():
    # IoU 0.72: a true positive at thresholds .50 .. .70 (5 of 10); the duplicate is a FP at every threshold
    targets = [gt_array([[0, 0, 0, 100, 100]])]
    predictions = [det_array([[0, 0, 100, 72, 0.9, 0], [0, 0, 100, 72, 0.5, 0]])]
    result = evaluate_detections(predictions, targets, nc=1)
    assert result["mAP50"] == pytest.approx(1.0)
    assert result["mAP50_95"] == pytest.approx(0.5)


def test_map_class_handling():
    # class 0: perfect; class 1: labels but no detection (AP 0, counted); class 2: detections, no labels (ignored)
    targets = [gt_array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]])]
    predictions = [det_array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 2]])]
    result = evaluate_detections(predictions, targets, nc=3)
    assert result["mAP50"] == pytest.approx(0.5)
    assert result["per_class"]["ap50"] == [pytest.approx(1.0), 0.0, None]
    assert result["per_class"]["labels"] == [1, 1, 0]
    # a class mismatch never matches, even at IoU 1
    mismatched = [det_array([[0, 0, 10, 10, 0.9, 1]])]
    assert evaluate_detections(mismatched, [targets[0][:1]], nc=2)["mAP50"] == 0.0
    with pytest.raises(ValueError, match="class outside"):
        evaluate_detections([det_array([[0, 0, 10, 10, 0.9, 5]])], targets, nc=3)


def test_meanap_accumulates_like_one_shot():
    predictions, targets = synthetic_set(np.random.default_rng(3), images=6, nc=3)
    metric = MeanAP(nc=3)
    metric.update(predictions[:2], targets[:2])
    metric.update([torch.from_numpy(p) for p in predictions[2:]], [torch.from_numpy(t) for t in targets[2:]])
    assert metric.compute() == evaluate_detections(predictions, targets, nc=3)


def test_targets_to_pixels():
    targets = torch.tensor([[1, 2, 0.5, 0.5, 0.5, 0.25], [0, 1, 0.25, 0.5, 0.1, 0.1]])
    gt = targets_to_pixels(targets, batch_size=3, width=200, height=100)
    np.testing.assert_allclose(gt[0], [[1, 40, 45, 60, 55]])
    np.testing.assert_allclose(gt[1], [[2, 50, 37.5, 150, 62.5]])
    assert gt[2].shape == (0, 5)


def test_format_ap_table():
    targets = [gt_array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]])]
    result = evaluate_detections([det_array([[0, 0, 10, 10, 0.9, 0]])], targets, nc=3)
    table = format_ap_table(result, ["car", "pickup", "boat"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "labels", "P", "R", "AP50", "AP50:95"]
    assert lines[1].split() == ["all", "2", "0.500", "0.500", "0.500", "0.500"]
    assert lines[2].split() == ["car", "1", "1.000", "1.000", "1.000", "1.000"]
    assert lines[4].split() == ["boat", "0", "-", "-", "-", "-"]
    with pytest.raises(ValueError):
        format_ap_table(result, ["car"])


# ---------------------------------------------------------------- mAP: cross-check with pycocotools

def synthetic_set(rng, images, nc):
    """Random labels; detections = jittered copies (some missed, some duplicated, wrong classes) + FPs."""
    predictions, targets = [], []
    for _ in range(images):
        count = rng.integers(1, 8)
        xy = rng.uniform(0, 200, (count, 2))
        gt = np.concatenate((rng.integers(0, nc, (count, 1)), xy, xy + rng.uniform(8, 60, (count, 2))), 1)
        rows = []
        for label in gt:
            for _ in range(rng.integers(0, 3)):  # 0 (missed), 1 or 2 (duplicate) detections
                box = label[1:] + rng.normal(0, 0.08 * (label[3] - label[1]), 4)
                cls = label[0] if rng.uniform() < 0.9 else rng.integers(0, nc)
                rows.append([*box, rng.uniform(0.05, 1), cls])
        for _ in range(rng.integers(0, 5)):  # false positives
            x, y = rng.uniform(0, 220, 2)
            rows.append([x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50), rng.uniform(0.01, 0.8),
                         rng.integers(0, nc)])
        predictions.append(np.array(rows, dtype=np.float64).reshape(-1, 6))
        targets.append(gt)
    return predictions, targets


def coco_map(predictions, targets, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 300, "height": 300} for i in range(len(targets))]
    annotations = [{"id": len(images) * 100 + k, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                   for i, gt in enumerate(targets) for k, (c, x1, y1, x2, y2) in enumerate(gt.tolist())]
    for k, annotation in enumerate(annotations):
        annotation["id"] = k + 1
    detections = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                  for i, det in enumerate(predictions) for x1, y1, x2, y2, s, c in det.tolist()]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {"images": images, "annotations": annotations,
                                "categories": [{"id": c + 1, "name": str(c)} for c in range(nc)]}
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[1], evaluator.stats[0]  # AP50, AP50:95 at area 'all', maxDets 100


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(seed)
    nc = 3
    predictions, targets = synthetic_set(rng, images=10, nc=nc)
    assert max(len(p) for p in predictions) < 100  # COCO's maxDets=100 must not bind
    coco_ap50, coco_ap = coco_map(predictions, targets, nc)
    result = evaluate_detections(predictions, targets, nc=nc)
    assert 0.05 < result["mAP50"] < 0.99  # a non-trivial case
    # same matching, ordering and interpolation as COCOeval, so agreement is to rounding, not just 0.01
    assert result["mAP50"] == pytest.approx(coco_ap50, abs=1e-9)
    assert result["mAP50_95"] == pytest.approx(coco_ap, abs=1e-9)
