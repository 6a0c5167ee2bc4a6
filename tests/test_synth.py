"""The embedded synthetic dataset: deterministic, atomic, loadable, and car_running differs from car only in IR."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ghost_deploy.data import synth
from ghost_deploy.data.dataset import Dataset, load_dataset_yaml
from ghost_deploy.data.images import read_ir, read_rgb
from ghost_deploy.errors import UserError
from ghost_deploy.io import sha256_file

SMALL = {"n_train": 6, "n_val": 3, "n_test": 2, "img_size": 64}


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"  # the manifest records the generation time
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = synth.ensure_synthetic_dataset(tmp_path / "a", seed=3, **SMALL).parent
    second = synth.ensure_synthetic_dataset(tmp_path / "b", seed=3, **SMALL).parent
    other = synth.ensure_synthetic_dataset(tmp_path / "c", seed=4, **SMALL).parent
    hashes = tree_hashes(first)
    assert len(hashes) == 2 * 11 + 11 + 3 + 1  # pairs, labels, split lists, data.yaml
    assert hashes == tree_hashes(second)
    different = {name for name, digest in tree_hashes(other).items() if hashes.get(name) != digest}
    assert any(name.endswith("_co.png") for name in different)


def test_layout_loads_and_is_reused(tmp_path):
    yaml_path = synth.ensure_synthetic_dataset(tmp_path / "s", **SMALL)
    spec = load_dataset_yaml(yaml_path)
    assert spec.names == synth.CLASS_NAMES and spec.ir_only_classes == ("car_running",)
    assert spec.modalities == ("rgb", "ir") and spec.hr_root is None
    for split, count in (("train", 6), ("val", 3), ("test", 2)):
        dataset = Dataset(spec, split, 64, strict=True)
        assert len(dataset) == count
        assert all(2 <= len(labels) <= 8 for labels in dataset.labels[:1])
    item = Dataset(spec, "train", 64, augment=True)[0]
    assert item["rgb"].shape == (3, 64, 64) and item["ir"].shape == (1, 64, 64)
    stamp = (yaml_path.parent / "images" / "00000000_co.png").stat().st_mtime_ns
    assert synth.ensure_synthetic_dataset(tmp_path / "s", **SMALL) == yaml_path
    assert (yaml_path.parent / "images" / "00000000_co.png").stat().st_mtime_ns == stamp


def test_hr_variant_is_2x_and_images_are_its_mean(tmp_path):
    yaml_path = synth.ensure_synthetic_dataset(tmp_path / "h", hr=True, **(SMALL | {"n_train": 2, "n_val": 1, "n_test": 0}))
    root = yaml_path.parent
    spec = load_dataset_yaml(yaml_path)
    assert spec.hr_root == root / "hr" and spec.test is None
    hr = read_rgb(root / "hr" / "images" / "00000000_co.png").astype(np.float64)
    lr = read_rgb(root / "images" / "00000000_co.png")
    assert hr.shape == (128, 128, 3) and lr.shape == (64, 64, 3)
    assert np.abs(hr.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3)) - lr).max() <= 0.5
    item = Dataset(spec, "train", 64, with_hr=True, strict=True)[1]
    assert item["hr_ir"].shape == (1, 128, 128)


def test_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = synth.render_tile

    def failing(rng, size):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(rng, size)

    monkeypatch.setattr(synth, "render_tile", failing)
    with pytest.raises(RuntimeError):
        synth.ensure_synthetic_dataset(tmp_path / "x", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temp build folder


def test_other_parameters_replace_old_set_but_never_a_foreign_folder(tmp_path):
    root = synth.ensure_synthetic_dataset(tmp_path / "s", seed=1, **SMALL).parent
    synth.ensure_synthetic_dataset(root, seed=2, **SMALL)
    assert '"seed": 2' in (root / "manifest.json").read_text()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a synthetic dataset folder"):
        synth.ensure_synthetic_dataset(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_root_honours_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOST_DEPLOY_CACHE", str(tmp_path / "cache"))
    yaml_path = synth.ensure_synthetic_dataset(seed=5, **SMALL)
    assert yaml_path.parent.parent == tmp_path / "cache"
    assert yaml_path.parent.name.startswith("synth-v2-seed5")


def test_car_running_is_drawn_like_car_in_rgb_and_hot_in_ir():
    """Same geometry and look: RGB identical, IR differs (hot engine under the hood)."""
    rng = np.random.default_rng(0)
    geometry = synth._sample_geometry(rng, synth._Canvas(128), "car")
    look = synth._sample_look(rng, "car")
    planes = []
    for running in (False, True):
        canvas = synth._Canvas(128)
        canvas.rgb[:] = 90
        canvas.ir[:] = 0.45
        synth.draw_vehicle(canvas, "car", (64.0, 64.0), 0.7, geometry, look, running=running, shadow=(1.0, 0.0))
        planes.append((canvas.rgb.copy(), canvas.ir.copy()))
    (rgb_parked, ir_parked), (rgb_running, ir_running) = planes
    assert np.array_equal(rgb_parked, rgb_running)
    assert (ir_running - ir_parked).max() > 0.4


def test_ir_only_class_statistics_match_in_rgb_and_differ_in_ir(tmp_path):
    """Over a generated set: car and car_running share sizes and RGB looks; IR peak heat separates them."""
    root = synth.ensure_synthetic_dataset(tmp_path / "stats", n_train=60, n_val=1, n_test=0, img_size=128).parent
    stats = {0: [], 1: []}
    for label_file in sorted((root / "labels").glob("*.txt")):
        rows = np.loadtxt(label_file, ndmin=2)
        rgb = read_rgb(root / "images" / f"{label_file.stem}_co.png").astype(np.float64)
        ir = read_ir(root / "images" / f"{label_file.stem}_ir.png").astype(np.float64)
        for cls, cx, cy, w, h in rows:
            if int(cls) not in stats:
                continue
            x1, x2 = int(round((cx - w / 2) * 128)), int(round((cx + w / 2) * 128))
            y1, y2 = int(round((cy - h / 2) * 128)), int(round((cy + h / 2) * 128))
            stats[int(cls)].append((w * h, rgb[y1:y2, x1:x2].mean(), ir[y1:y2, x1:x2].max()))
    parked, running = np.array(stats[0]), np.array(stats[1])
    assert len(parked) > 40 and len(running) > 40
    for column, tolerance in ((0, 0.2), (1, 0.15)):  # box area, mean RGB brightness: same distribution
        assert math.isclose(parked[:, column].mean(), running[:, column].mean(), rel_tol=tolerance)
    assert np.median(running[:, 2]) > np.median(parked[:, 2]) + 60  # hot engine in IR
