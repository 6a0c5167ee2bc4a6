"""compare.py and parityset.py: numpy-only comparator and the parity-set file."""
import json
import zipfile

import numpy as np
import pytest

from ghost_deploy.parity.compare import Budgets, box_iou, compare_outputs
from ghost_deploy.errors import UserError
from ghost_deploy.parity.parityset import load_parity_set, save_parity_set


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    return {"p3": rng.normal(size=(2, 18, 8, 8)).astype(np.float32),
            "p4": rng.normal(size=(2, 18, 4, 4)).astype(np.float32)}


def _dets_fn(boxes_per_image):
    """A detection_fn that returns fixed detections keyed by which dict it is given."""
    def detect(outputs):
        return boxes_per_image[outputs["which"].item()]
    return detect


def test_identical_outputs_pass():
    ref = _outputs()
    report = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, Budgets(), output_scales={"p3": 0.05})
    assert report.passed, report.failures
    assert report.outputs["p3"]["max_abs_error"] == 0.0
    assert report.outputs["p3"]["max_abs_error_in_output_scale"] == 0.0
    assert report.outputs["p4"]["max_abs_error_in_output_scale"] is None
    assert report.outputs["p3"]["min_cosine_per_image"] == pytest.approx(1.0)
    json.dumps(report.to_dict())
    assert "PASSED" in report.format_table()


def test_perturbed_output_fails_and_is_named():
    ref = _outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["p4"][1] = np.random.default_rng(5).normal(size=cand["p4"][1].shape)  # second image garbage
    report = compare_outputs(ref, cand, Budgets())
    assert not report.passed
    assert len(report.failures) == 1 and "'p4'" in report.failures[0] and "worst image 1" in report.failures[0]
    assert report.worst_outputs[0] == "p4"
    assert report.outputs["p4"]["cosine_per_image"][0] == pytest.approx(1.0)
    assert "FAILED" in report.format_table()


def test_abs_error_budget_in_scale_units():
    ref = _outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["p3"][0, 0, 0, 0] += 0.1  # two scale steps of 0.05: cosine stays high
    budgets = Budgets(min_cosine=0.99, max_abs_error_in_output_scale=1.0)
    report = compare_outputs(ref, cand, budgets, output_scales={"p3": 0.05})
    assert not report.passed and "2.00 scale steps" in report.failures[0]
    assert compare_outputs(ref, cand, Budgets(min_cosine=0.99, max_abs_error_in_output_scale=2.5),
                           output_scales={"p3": 0.05}).passed


def test_missing_shape_and_nan_are_failures():
    ref = _outputs()
    assert "missing from candidate" in compare_outputs(ref, {"p3": ref["p3"]}).failures[0]
    bad_shape = compare_outputs(ref, {"p3": ref["p3"], "p4": ref["p4"][:1]})
    assert "shape" in bad_shape.failures[0]
    json.dumps(bad_shape.to_dict())
    nan = {k: v.copy() for k, v in ref.items()}
    nan["p3"][0, 0, 0, 0] = np.nan
    report = compare_outputs(ref, nan)
    assert not report.passed and "NaN" in report.failures[0]
    json.dumps(report.to_dict())


def test_shifted_box_counts_missing_and_extra():
    ref_dets = [np.array([[10, 10, 50, 50, 0.9, 1], [60, 60, 90, 90, 0.8, 2]], dtype=np.float64)]
    shifted = ref_dets[0].copy()
    shifted[0, [0, 2]] += 8  # IoU 0.67 < 0.95
    detect = _dets_fn({0: ref_dets, 1: [shifted]})
    report = compare_outputs({"which": np.array(0)}, {"which": np.array(0)}, Budgets(), detection_fn=None)
    assert report.passed
    report = compare_outputs({"which": np.array([0])}, {"which": np.array([1])},
                             Budgets(min_cosine=-1.0), detection_fn=detect)
    assert report.detections["matched"] == 1
    assert report.detections["missing"] == 1 and report.detections["extra"] == 1
    assert any("missing" in f for f in report.failures) and any("extra" in f for f in report.failures)
    assert "missing 1" in report.format_table()
    lenient = Budgets(min_cosine=-1.0, allow_missing=1, allow_extra=1)
    assert compare_outputs({"which": np.array([0])}, {"which": np.array([1])}, lenient, detection_fn=detect).passed


def test_score_delta_and_class_mismatch():
    ref = [np.array([[10, 10, 50, 50, 0.9, 1]])]
    lower = [np.array([[10, 10, 50, 50, 0.85, 1]])]
    other_class = [np.array([[10, 10, 50, 50, 0.9, 3]])]
    budgets = Budgets(min_cosine=-1.0)
    report = compare_outputs({"which": np.array([0])}, {"which": np.array([1])}, budgets,
                             detection_fn=_dets_fn({0: ref, 1: lower}))
    assert report.detections["max_score_delta"] == pytest.approx(0.05)
    assert report.failures == ["detection score changed by 0.0500 > 0.02"]
    report = compare_outputs({"which": np.array([0])}, {"which": np.array([1])}, budgets,
                             detection_fn=_dets_fn({0: ref, 1: other_class}))
    assert report.detections["missing"] == 1 and report.detections["extra"] == 1
    below = [np.array([[10, 10, 50, 50, 0.1, 1]])]  # below score_threshold: neither missing nor extra
    report = compare_outputs({"which": np.array([0])}, {"which": np.array([1])}, budgets,
                             detection_fn=_dets_fn({0: below, 1: [np.zeros((0, 6))]}))
    assert report.passed


def test_box_iou():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_budgets_from_dict():
    assert Budgets.from_dict({"min_cosine": 0.99}).min_cosine == 0.99
    assert Budgets.from_dict(None) == Budgets()
    with pytest.raises(UserError, match="min_cos"):
        Budgets.from_dict({"min_cos": 0.9})


def _meta():
    return {"image_paths": ["a.png"], "image_sha256": ["0" * 64], "strides": [8, 16],
            "anchors_pixels": [[10, 13, 16, 30], [30, 61, 62, 45]], "nc": 4, "names": ["a", "b", "c", "d"],
            "budgets": Budgets().to_dict()}


def test_parity_set_round_trip(tmp_path):
    inputs = {"rgb": np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)}
    outputs = _outputs()
    path = tmp_path / "parity.npz"
    digest = save_parity_set(path, inputs, outputs, _meta())
    assert len(digest) == 64 and not list(tmp_path.glob(".*tmp"))
    loaded = load_parity_set(path)
    assert loaded.sha256 == digest
    assert loaded.input_names == ["rgb"] and loaded.output_names == ["p3", "p4"]
    np.testing.assert_array_equal(loaded.inputs["rgb"], inputs["rgb"])
    np.testing.assert_array_equal(loaded.outputs["p4"], outputs["p4"])
    assert loaded.meta.strides == [8, 16] and loaded.meta.nc == 4


def test_parity_set_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_parity_set(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="corrupt.npz"):
        load_parity_set(corrupt)
    no_meta = tmp_path / "no_meta.npz"
    with open(no_meta, "wb") as handle:
        np.savez(handle, **{"input/rgb": np.zeros(3), "output/p3": np.zeros(3)})
    with pytest.raises(UserError, match="no 'meta'"):
        load_parity_set(no_meta)
    path = tmp_path / "p.npz"
    save_parity_set(path, {"rgb": np.zeros((1, 3, 4, 4))}, {"p3": np.zeros((1, 2)), "p4": np.zeros(1)}, _meta())
    for dropped, message in (("output/", "no 'output/<name>'"), ("output/p4", r"missing: \['p4'\]")):
        cut = tmp_path / "cut.npz"
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(cut, "w") as zout:
            for item in zin.infolist():
                if not item.filename.startswith(dropped):
                    zout.writestr(item, zin.read(item.filename))
        with pytest.raises(UserError, match=message):
            load_parity_set(cut)
    with pytest.raises(UserError, match="input_names"):
        save_parity_set(path, {"rgb": np.zeros(3)}, {"p3": np.zeros(3)}, {"input_names": ["ir"]})


def _image(predictions, anchors, classes):
    """ImageDetections whose detections are the given anchors' predictions, scored for the given classes."""
    from ghost_deploy.parity.compare import ImageDetections

    predictions = np.asarray(predictions, dtype=np.float64)
    empty = ImageDetections(np.zeros((0, 6)), np.zeros(0, np.int64), predictions)
    boxes = empty.at(np.asarray(anchors), np.asarray(classes, dtype=np.float64))
    return ImageDetections(boxes, np.asarray(anchors), predictions)


def test_near_tied_boxes_that_nms_picks_differently_still_match_at_their_anchors():
    from ghost_deploy.parity.compare import compare_detections

    # two anchors see one object with scores 0.50 / 0.49; the candidate's 0.49 / 0.50 makes NMS keep the other
    box_a, box_b = [10, 10, 30, 30], [11, 12, 31, 33]  # IoU 0.79 with each other: different boxes
    reference = [[*box_a, 1.0, 0.50, 0.0], [*box_b, 1.0, 0.49, 0.0]]
    candidate = [[*box_a, 1.0, 0.49, 0.0], [*box_b, 1.0, 0.50, 0.0]]
    report = compare_detections([_image(reference, [0], [0])], [_image(candidate, [1], [0])], Budgets())
    assert (report["matched"], report["missing"], report["extra"]) == (1, 0, 0)
    assert report["max_score_delta"] == pytest.approx(0.01)
    # the old rule (boxes only) calls the same pair one missing and one extra
    bare = compare_detections([np.array([[*box_a, 0.50, 0]])], [np.array([[*box_b, 0.50, 0]])], Budgets())
    assert (bare["missing"], bare["extra"]) == (1, 1)
    # a real change at the anchor is still caught: the box moved, or the score fell
    moved = [[*box_b, 1.0, 0.50, 0.0], [*box_b, 1.0, 0.49, 0.0]]
    report = compare_detections([_image(reference, [0], [0])], [_image(moved, [1], [0])], Budgets())
    assert report["missing"] == 1
    faded = [[*box_a, 1.0, 0.40, 0.0], [*box_b, 1.0, 0.30, 0.0]]
    report = compare_detections([_image(reference, [0], [0])], [_image(faded, [], [])], Budgets())
    assert report["matched"] == 1 and report["max_score_delta"] == pytest.approx(0.10)


def test_nms_reports_the_anchor_each_detection_came_from():
    from ghost_deploy.eval.postprocess import non_max_suppression_np

    pred = np.zeros((1, 5, 7), np.float32)  # (cx, cy, w, h, obj, cls0, cls1)
    pred[0, 3] = [20, 20, 10, 10, 0.9, 0.9, 0.1]
    pred[0, 1] = [21, 20, 10, 10, 0.8, 0.9, 0.1]  # suppressed by anchor 3
    pred[0, 4] = [60, 60, 10, 10, 0.7, 0.2, 0.8]
    (boxes, anchors), = non_max_suppression_np(pred, conf_thres=0.25, iou_thres=0.45, with_anchors=True)
    assert anchors.tolist() == [3, 4]
    np.testing.assert_array_equal(boxes, non_max_suppression_np(pred, conf_thres=0.25, iou_thres=0.45)[0])
