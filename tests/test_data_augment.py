"""RGB, IR and HR stay pixel-aligned, and labels follow the pixels, under every augmentation."""
from __future__ import annotations

import numpy as np
import pytest

from ghost_deploy.data import augment
from ghost_deploy.data.augment import DEFAULT_HYP, PAD_VALUE, boxes_from_labels, compose, downsample2x

NO_HSV = {**DEFAULT_HYP, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}


def painted_sample(seed: int, height: int = 48, width: int = 64):
    """RGB noise (G = 0) with solid objects (G = 255, R = object code); IR is exactly the R channel."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[..., 1] = 0
    labels = []
    for code in range(3):
        w, h = int(rng.integers(6, 14)), int(rng.integers(6, 14))
        x = int(rng.integers(0, width - w)) if code != 2 else width - w  # one object touches the border
        y = 2 + code * 15
        rgb[y:y + h, x:x + w] = (object_code(code), 255, 0)
        labels.append([code, (x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
    images = {"rgb": rgb, "ir": rgb[..., 0].copy()}
    return images, boxes_from_labels(np.array(labels), height, width)


def object_code(code: int) -> int:
    return 60 + 50 * code


def make_loader(size: int, seed: int = 0):
    def load(index):
        images, boxes = painted_sample(seed + index)
        return augment.resize_long_side(images, boxes, size)
    return load


def check_aligned(images):
    rgb, ir = images["rgb"].astype(int), images["ir"].astype(int)
    assert ir.shape == rgb.shape[:2]
    assert np.abs(ir - rgb[..., 0]).max() <= 1


def check_boxes_cover_objects(images, boxes):
    rgb = images["rgb"]
    core = rgb[..., 1] > 200
    covered = np.zeros_like(core)
    for cls, x1, y1, x2, y2, _ in boxes:
        covered[max(0, int(np.floor(y1)) - 1):int(np.ceil(y2)) + 1, max(0, int(np.floor(x1)) - 1):int(np.ceil(x2)) + 1] = True
        top, bottom = int(np.ceil(y1)) + 1, int(np.floor(y2)) - 1
        left, right = int(np.ceil(x1)) + 1, int(np.floor(x2)) - 1
        if bottom > top and right > left:
            inner = rgb[top:bottom, left:right]
            # the inside of a box is its own object: solid, with that object's code in R
            assert (inner[..., 1] > 200).mean() > 0.9
            assert np.abs(inner[..., 0].astype(int) - object_code(int(cls))).max() <= 2
    assert not (core & ~covered).any(), "object pixels outside every label box"


@pytest.mark.parametrize("seed", range(12))
def test_mosaic_affine_flip_keep_rgb_ir_aligned_and_boxes_on_objects(seed):
    hyp = {**NO_HSV, "mosaic": 1.0, "fliplr": 0.5, "flipud": 0.5, "degrees": 10.0 if seed % 3 == 0 else 0.0}
    rng = np.random.default_rng(seed)
    images, boxes = compose(make_loader(64, seed), 0, 5, 64, hyp, rng, augment=True, min_side=0.0)
    assert images["rgb"].shape == (64, 64, 3)
    check_aligned(images)
    if hyp["degrees"] == 0:  # with rotation a box is the hull of a turned rectangle, not its pixels
        # keep every fragment, so that each visible object pixel must have a box
        rng = np.random.default_rng(seed)
        images, boxes = compose(make_loader(64, seed), 0, 5, 64, hyp, rng, augment=True, min_side=0.0, min_visible=0.0)
        check_boxes_cover_objects(images, boxes)


@pytest.mark.parametrize("seed", range(6))
def test_letterbox_affine_without_mosaic_keeps_alignment(seed):
    hyp = {**NO_HSV, "mosaic": 0.0, "fliplr": 1.0, "flipud": 0.0}
    images, boxes = compose(make_loader(64, seed), 0, 1, 64, hyp, np.random.default_rng(seed), augment=True)
    check_aligned(images)
    assert len(boxes) > 0


def test_eval_letterbox_is_exact_padding():
    images, boxes = compose(make_loader(64), 0, 1, 64, NO_HSV, np.random.default_rng(0), augment=False)
    source, source_boxes = painted_sample(0)
    top = (64 - 48) // 2
    assert (images["rgb"][top:top + 48] == source["rgb"]).all()
    assert (images["rgb"][:top] == PAD_VALUE).all() and (images["ir"][top + 48:] == PAD_VALUE).all()
    np.testing.assert_allclose(boxes[:, [2, 4]], source_boxes[:, [2, 4]] + top)
    check_boxes_cover_objects(images, boxes)


def test_hsv_changes_rgb_only():
    hyp = {**DEFAULT_HYP, "mosaic": 0.0, "translate": 0.0, "scale": 0.0, "fliplr": 0.0, "hsv_v": 0.9}
    images, _ = compose(make_loader(64), 0, 1, 64, hyp, np.random.default_rng(3), augment=True)
    plain, _ = compose(make_loader(64), 0, 1, 64, NO_HSV | {"mosaic": 0.0, "translate": 0.0, "scale": 0.0, "fliplr": 0.0},
                       np.random.default_rng(3), augment=True)
    assert (images["ir"] == plain["ir"]).all()
    assert not (images["rgb"] == plain["rgb"]).all()


def test_hr_pipeline_then_downsample_matches_lr_geometry():
    """Augment at 2x then take the 2x2 mean: the LR input and the HR target show the same scene."""
    def load_hr(index):
        images, boxes = painted_sample(index, 96, 128)
        return augment.resize_long_side(images, boxes, 128)
    hr, boxes = compose(load_hr, 0, 3, 128, NO_HSV, np.random.default_rng(1), augment=True, min_side=4.0)
    lr = {key: downsample2x(value) for key, value in hr.items()}
    assert lr["rgb"].shape == (64, 64, 3) and lr["ir"].shape == (64, 64)
    check_aligned(lr)
    expected = hr["rgb"].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(lr["rgb"] - expected).max() <= 0.5 + 1e-9


def test_keep_visible_drops_mostly_outside_boxes():
    boxes = np.array([
        [0, 0, 0, 10, 10, 100.0],   # fully visible
        [1, 0, 0, 2, 10, 100.0],    # 20 % visible -> dropped
        [2, 0, 0, 5, 10, 100.0],    # 50 % visible -> kept
        [3, 0, 0, 10, 1.5, 15.0],   # thinner than 2 px -> dropped
    ])
    kept = augment.keep_visible(boxes, min_side=2.0)
    assert kept[:, 0].tolist() == [0, 2]


def test_downsample2x_is_rounded_mean():
    array = np.array([[0, 1, 10, 10], [1, 1, 10, 11]], dtype=np.uint8)
    assert downsample2x(array).tolist() == [[1, 10]]
