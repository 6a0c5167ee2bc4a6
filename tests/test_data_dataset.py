"""Dataset indexing, reading, items, collate and the seeded loader, on tiny VEDAI-layout folders."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ghost_deploy.data import augment
from ghost_deploy.data.dataset import DataWarning, Dataset, collate, load_dataset_yaml
from ghost_deploy.train.loop import make_loader
from ghost_deploy.data.images import read_ir, read_rgb
from ghost_deploy.errors import UserError

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "vedai-real"
NO_HSV = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}


def write_pair(folder: Path, image_id: str, rgb: np.ndarray, ir_mode: str = "L", labels: str = "0 0.5 0.5 0.25 0.25\n"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "images" / f"{image_id}_co.png")
    ir = rgb[..., 0]
    if ir_mode == "RGB":  # VEDAI style: one grey band replicated into three channels
        ir = np.repeat(ir[..., None], 3, axis=2)
    Image.fromarray(ir).save(folder / "images" / f"{image_id}_ir.png")
    (folder / "labels" / f"{image_id}.txt").write_text(labels)


def random_rgb(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_dataset(tmp_path: Path, count: int = 6, modalities=("rgb", "ir"), hr: bool = False, **extra) -> Path:
    root = tmp_path / "ds"
    for index in range(count):
        image_id = f"{index:08d}"
        rgb = random_rgb(index)
        write_pair(root, image_id, rgb, ir_mode="RGB" if index % 2 else "L")
        if hr:
            big = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
            write_pair(root / "hr", image_id, big)
    (root / "train.txt").write_text("".join(f"{i:08d}\n" for i in range(count)))
    (root / "val.txt").write_text("images/00000000\nimages/00000001\n")
    doc = {"path": "ds", "train": "train.txt", "val": "val.txt", "nc": 2, "names": ["a", "b"],
           "modalities": list(modalities)} | ({"hr": "hr"} if hr else {}) | extra
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grey_replicated_ir_reads_as_one_channel(tmp_path):
    rgb = random_rgb(0)
    write_pair(tmp_path, "a", rgb, ir_mode="RGB")
    ir = read_ir(tmp_path / "images" / "a_ir.png")
    assert ir.shape == (48, 64) and (ir == rgb[..., 0]).all()
    write_pair(tmp_path, "b", rgb, ir_mode="L")
    assert (read_ir(tmp_path / "images" / "b_ir.png") == rgb[..., 0]).all()
    assert (read_rgb(tmp_path / "images" / "b_co.png") == rgb).all()  # RGB order, not BGR


def test_items_shapes_and_letterboxed_labels(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path))
    dataset = Dataset(spec, "val", 64)
    item = dataset[1]
    assert item["rgb"].shape == (3, 64, 64) and item["ir"].shape == (1, 64, 64)
    assert item["rgb"].dtype == torch.float32 and 0 <= item["rgb"].min() and item["rgb"].max() <= 1
    assert item["shape"] == (48, 64)
    # 64x48 letterboxed into 64x64: 8 rows of padding on top, so y shrinks towards the centre
    np.testing.assert_allclose(item["labels"].numpy(), [[0, 0, 0.5, 0.5, 0.25, 0.25 * 48 / 64]], atol=1e-6)
    assert (item["ir"][0, 8:56] * 255).round().to(torch.uint8).numpy().tolist() == random_rgb(1)[..., 0].tolist()
    assert torch.equal(item["ir"][0], item["rgb"][0])  # IR was made from R


def test_rgb_only_dataset_has_no_ir(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, modalities=["rgb"]))
    item = Dataset(spec, "train", 64)[0]
    assert "ir" not in item and item["rgb"].shape == (3, 64, 64)


def test_plain_names_for_single_modality(tmp_path):
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(random_rgb(0)).save(root / "images" / "P0001.jpg")
    (root / "labels" / "P0001.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"path": "plain", "train": "images", "val": "images", "nc": 2,
                                    "names": ["a", "b"], "modalities": ["rgb"]}))
    dataset = Dataset(load_dataset_yaml(path), "train", 64)
    assert len(dataset) == 1 and dataset[0]["labels"][0, 1] == 1


def test_augmented_items_keep_modalities_aligned(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path))
    dataset = Dataset(spec, "train", 64, augment=True, hyp=NO_HSV | {"flipud": 0.5, "degrees": 5.0})
    for index in range(len(dataset)):
        item = dataset[index]
        assert (item["ir"][0] - item["rgb"][0]).abs().max() <= 1 / 255 + 1e-6
        assert item["labels"].shape[1] == 6 and ((item["labels"][:, 2:] >= 0) & (item["labels"][:, 2:] <= 1)).all()


def test_with_hr_returns_2x_targets_and_lr_is_their_mean(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, hr=True))
    dataset = Dataset(spec, "train", 64, augment=True, hyp=NO_HSV, with_hr=True)
    item = dataset[2]
    assert item["hr_rgb"].shape == (3, 128, 128) and item["hr_ir"].shape == (1, 128, 128)
    assert item["rgb"].shape == (3, 64, 64)
    mean = torch.nn.functional.avg_pool2d(item["hr_rgb"][None], 2)[0]
    assert (mean - item["rgb"]).abs().max() <= 0.5 / 255 + 1e-6
    assert (item["hr_ir"][0] - item["hr_rgb"][0]).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(UserError, match="with_hr needs the 'hr' key"):
        Dataset(load_dataset_yaml(make_dataset(tmp_path / "nohr")), "train", 64, with_hr=True)


def corrupt(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """Break sample 00000003 in one way; returns (the file that must be named, a problem fragment)."""
    images = tmp_path / "ds" / "images"
    if kind == "missing_ir":
        target = images / "00000003_ir.png"
        target.unlink()
        return target, "missing IR partner of 00000003_co.png"
    if kind == "truncated":
        target = images / "00000003_co.png"
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return target, "corrupt or unreadable image"
    if kind == "not_png":
        target = images / "00000003_ir.png"
        target.write_bytes(b"this is not an image")
        return target, "corrupt or unreadable image"
    if kind == "size_mismatch":
        target = images / "00000003_ir.png"
        Image.fromarray(np.zeros((40, 64), np.uint8)).save(target)
        return target, "size 64x40 differs from its RGB partner 00000003_co.png (64x48)"
    if kind == "bad_label":
        target = tmp_path / "ds" / "labels" / "00000003.txt"
        target.write_text("0 0.5 0.5 0.1 0.1\n9 0.5 0.5 0.1 0.1\n")
        return target, "line 2: class 9 >= nc 2"
    if kind == "missing_label":
        target = tmp_path / "ds" / "labels" / "00000003.txt"
        target.unlink()
        return target, "label file not found"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_ir", "truncated", "not_png", "size_mismatch", "bad_label", "missing_label"])
def test_bad_sample_skipped_with_warning_or_strict_error(tmp_path, kind):
    spec = load_dataset_yaml(make_dataset(tmp_path))
    target, problem = corrupt(tmp_path, kind)
    with pytest.warns(DataWarning, match="skipped 1 bad sample"):
        dataset = Dataset(spec, "train", 64, strict=False)
    assert len(dataset) == 5
    assert len(dataset.skipped) == 1
    path, found = dataset.skipped[0]
    assert path == str(target) and problem in found
    with pytest.raises(UserError) as info:
        Dataset(spec, "train", 64, strict=True)
    assert info.value.path == str(target) and problem in info.value.problem


def test_good_dataset_warns_nothing(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Dataset(spec, "train", 64, strict=True).skipped == []


def test_all_samples_bad_is_user_error(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, count=2))
    for index in range(2):
        (tmp_path / "ds" / "images" / f"{index:08d}_ir.png").unlink()
    with pytest.warns(DataWarning), pytest.raises(UserError, match="no usable samples"):
        Dataset(spec, "train", 64)


def test_collate_batches_targets_with_image_index(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path))
    dataset = Dataset(spec, "train", 64)
    batch = collate([dataset[0], dataset[1], dataset[2]])
    assert batch["rgb"].shape == (3, 3, 64, 64) and batch["ir"].shape == (3, 1, 64, 64)
    assert batch["targets"].shape == (3, 6) and batch["targets"][:, 0].tolist() == [0, 1, 2]
    assert len(batch["paths"]) == 3 and batch["shapes"] == [(48, 64)] * 3


def batches(loader, epochs: int = 2):
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # as the training loop does
        out.append([(b["rgb"].clone(), b["targets"].clone(), list(b["paths"])) for b in loader])
    return out


def same(first, second) -> bool:
    return all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        for epoch_a, epoch_b in zip(first, second) for a, b in zip(epoch_a, epoch_b)
    )


def test_loader_is_deterministic_given_seed_and_shuffles(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, count=8))
    dataset = Dataset(spec, "train", 64, augment=True)
    run_a = batches(make_loader(dataset, 4, shuffle=True, seed=7))
    run_b = batches(make_loader(dataset, 4, shuffle=True, seed=7))
    run_c = batches(make_loader(dataset, 4, shuffle=True, seed=8))
    assert same(run_a, run_b)
    assert not same(run_a, run_c)
    order = [path for batch in run_a[0] for path in batch[2]]
    assert sorted(order) == sorted(set(order)) and len(order) == 8
    assert order != sorted(order)  # shuffled (reference never shuffled, bug B5)
    assert not torch.equal(run_a[0][0][0], run_a[1][0][0])  # epochs differ


def test_loader_same_batches_with_worker_processes(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, count=8))
    dataset = Dataset(spec, "train", 64, augment=True)
    in_process = batches(make_loader(dataset, 2, shuffle=True, seed=3), epochs=1)
    workers = batches(make_loader(dataset, 2, shuffle=True, seed=3, workers=2), epochs=1)
    assert same(in_process, workers)


def test_set_epoch_changes_augmentation_of_integer_indices(tmp_path):
    spec = load_dataset_yaml(make_dataset(tmp_path, count=4))
    dataset = Dataset(spec, "train", 64, augment=True)
    first = dataset[1]["rgb"]
    assert torch.equal(first, dataset[1]["rgb"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[1]["rgb"])
    dataset.set_epoch(0)
    assert torch.equal(first, dataset[1]["rgb"])


real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real VEDAI subset not found at {REAL}")


@real
def test_real_vedai_subset_loads():
    spec = load_dataset_yaml(REPO / "training" / "data" / "vedai-real.yaml")
    sizes = {split: len(Dataset(spec, split, 512, strict=True)) for split in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 10, "test": 11}
    val = Dataset(spec, "val", 512, strict=True)
    item = val[0]
    assert item["rgb"].shape == (3, 512, 512) and item["ir"].shape == (1, 512, 512)
    label_rows = np.loadtxt(REAL / "VEDAI" / "labels" / f"{Path(item['path']).name[:8]}.txt", ndmin=2)
    np.testing.assert_allclose(item["labels"][:, 1:].numpy(), label_rows, atol=1e-6)


@real
def test_real_vedai_hr_ids_are_2x2_means():
    spec = load_dataset_yaml(REPO / "training" / "data" / "vedai-real.yaml")
    train = Dataset(spec, "train", 512, strict=True)
    assert all(s.from_hr for s in train.samples)
    sample = train.samples[3]
    index = train.samples.index(sample)
    hr = read_rgb(sample.images["rgb"])
    expected = augment.downsample2x(hr)
    assert torch.equal(train[index]["rgb"], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    with_hr = Dataset(spec, "train", 256, augment=True, with_hr=True, strict=True)
    item = with_hr[0]
    assert len(with_hr) == 8 and item["hr_rgb"].shape == (3, 512, 512) and item["ir"].shape == (1, 256, 256)
