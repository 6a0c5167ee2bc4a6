"""Calibration-set manifests: reproducible choice, hash checks, stratification, paired sensors, range coverage."""
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from ghost_deploy.cli.calib import calib_group
from ghost_deploy.data.calib import _largest_remainder, calib_batches, load_calib_set, load_pair_arrays, make_calib_set
from ghost_deploy.parity.inputs import parity_inputs_from_manifest
from ghost_deploy.quant.coverage import range_coverage
from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml, parse_label_file
from ghost_deploy.data.dataset import Dataset
from ghost_deploy.errors import UserError
from ghost_deploy.io import sha256_file
from ghost_deploy.model import build_model
from ghost_deploy.train.loop import make_loader

IMG = 64


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_data")
    return ensure_synthetic_dataset(root=root / "synth", n_train=24, n_val=4, n_test=4, img_size=IMG)


def test_manifest_reproducible(data_yaml, tmp_path):
    first = make_calib_set(data_yaml, 6, name="set", out_dir=tmp_path / "a")
    second = make_calib_set(data_yaml, 6, name="set", out_dir=tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    make_calib_set(data_yaml, 6, name="set", out_dir=tmp_path / "a")  # same content again: allowed
    one, two = load_calib_set(first), load_calib_set(second)
    assert [p.key for p in one.pairs] == [p.key for p in two.pairs]
    assert [p.sha256 for p in one.pairs] == [p.sha256 for p in two.pairs]
    assert len(one) == 6 and len({p.key for p in one.pairs}) == 6
    for pair in one.pairs:
        assert set(pair.images) == {"rgb", "ir"}
        for modality, path in pair.images.items():
            assert pair.sha256[modality] == sha256_file(path)
    other_seed = load_calib_set(make_calib_set(data_yaml, 6, name="seed1", seed=1, out_dir=tmp_path / "a"))
    assert [p.key for p in other_seed.pairs] != [p.key for p in one.pairs]


def test_edited_image_refused_with_one_line(data_yaml, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_yaml.parent, copy)
    manifest = make_calib_set(copy / "data.yaml", 4, name="edit", out_dir=tmp_path)
    pair = load_calib_set(manifest).pairs[2]
    target = pair.images["ir"]
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    with pytest.raises(UserError) as error:
        load_calib_set(manifest)
    assert error.value.path == str(target)
    assert "changed" in error.value.problem and "\n" not in str(error.value)

    result = CliRunner().invoke(calib_group, ["make", "--data", str(copy / "data.yaml"), "--n", "4", "--name", "edit",
                                              "--out-dir", str(tmp_path)])
    assert result.exit_code == 2  # a different set under the same name is refused, not silently replaced
    assert result.output.count("\n") == 1 and "edit.yaml" in result.output

    target.unlink()
    with pytest.raises(UserError, match="missing"):
        load_calib_set(manifest)


def test_other_content_not_overwritten_without_force(data_yaml, tmp_path):
    make_calib_set(data_yaml, 4, name="x", out_dir=tmp_path)
    with pytest.raises(UserError, match="different calibration set"):
        make_calib_set(data_yaml, 5, name="x", out_dir=tmp_path)
    assert len(load_calib_set(make_calib_set(data_yaml, 5, name="x", out_dir=tmp_path, force=True))) == 5


def test_stratification_covers_every_class_present(data_yaml, tmp_path):
    spec = load_dataset_yaml(data_yaml)
    split = Dataset(spec, "train", IMG)
    present = {int(c) for labels in split.labels for c in labels[:, 0]}
    assert len(present) >= 4
    calib_set = load_calib_set(make_calib_set(data_yaml, len(present), name="cover", out_dir=tmp_path))
    chosen = {int(c) for pair in calib_set.pairs for c in parse_label_file(pair.label, spec.nc)[:, 0]}
    assert chosen == present
    for cls, name in enumerate(spec.names):  # the manifest's counts are the label files' counts
        row = calib_set.classes[name]
        labels = [parse_label_file(pair.label, spec.nc) for pair in calib_set.pairs]
        assert row["images"] == sum((lab[:, 0] == cls).any() for lab in labels)
        assert row["instances"] == sum(int((lab[:, 0] == cls).sum()) for lab in labels)
        assert row["split_images"] == sum((lab[:, 0] == cls).any() for lab in split.labels)
    strata = calib_set.selection["strata"]
    assert sum(row["set"] for row in strata.values()) == len(calib_set)
    assert sum(row["split"] for row in strata.values()) == len(split)
    assert set(calib_set.selection["brightness"]["inner_edges"]) == {"rgb", "ir"}


def test_n_above_split_takes_every_pair_and_bad_n_is_refused(data_yaml, tmp_path):
    calib_set = load_calib_set(make_calib_set(data_yaml, 100, split="val", name="all", out_dir=tmp_path))
    assert len(calib_set) == 4 and calib_set.selection["requested"] == 100
    with pytest.raises(UserError, match="positive"):
        make_calib_set(data_yaml, 0, out_dir=tmp_path)
    with pytest.raises(UserError, match="name"):
        make_calib_set(data_yaml, 2, name="../escape", out_dir=tmp_path)


def test_largest_remainder_respects_room_and_total():
    want = {("a",): 2.6, ("b",): 1.2, ("c",): 0.2}
    room = {("a",): 2, ("b",): 5, ("c",): 1}
    out = _largest_remainder(want, room, 4)
    assert sum(out.values()) == 4 and all(out[k] <= room[k] for k in out)
    assert _largest_remainder({("a",): 0.0}, {("a",): 3}, 2) == {("a",): 2}


def test_both_sensors_of_a_pair_load_together(data_yaml, tmp_path):
    calib_set = load_calib_set(make_calib_set(data_yaml, 5, split="val", name="pairs", out_dir=tmp_path))
    batches = calib_batches(calib_set, IMG, batch_size=2, input_names=("rgb", "ir"))
    rows = [tuple(t[i] for t in batch) for batch in batches for i in range(len(batch[0]))]
    assert len(batches) == 2 and len(rows) == 4
    val = Dataset(load_dataset_yaml(data_yaml), "val", IMG)  # validation's letterboxed tensors of the same ids
    by_key = {sample.key: index for index, sample in enumerate(val.samples)}
    for pair, (rgb, ir) in zip(calib_set.pairs, rows):
        assert rgb.shape == (3, IMG, IMG) and ir.shape == (1, IMG, IMG)
        item = val[by_key[pair.key]]
        assert torch.equal(rgb, item["rgb"]) and torch.equal(ir, item["ir"])
    ir_only = next(iter(calib_batches(calib_set, IMG, 4, ("ir",))))
    assert len(ir_only) == 1 and ir_only[0].shape == (4, 1, IMG, IMG)
    parity = parity_inputs_from_manifest(calib_set.path, ["rgb", "ir"], IMG, limit=3)
    assert parity.count == 3 and parity.inputs["ir"].shape == (3, 1, IMG, IMG)
    assert parity.sha256[1] == [calib_set.pairs[1].sha256["rgb"], calib_set.pairs[1].sha256["ir"]]
    np.testing.assert_array_equal(parity.inputs["rgb"][0], load_pair_arrays(calib_set.pairs[0], ["rgb"], IMG)["rgb"])


def test_rgb_only_set_refused_for_a_two_sensor_model(data_yaml, tmp_path):
    manifest = make_calib_set(data_yaml, 2, name="rgbonly", out_dir=tmp_path)
    data = yaml.safe_load(manifest.read_text())
    data["modalities"] = ["rgb"]
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="no ir images"):
        calib_batches(load_calib_set(manifest), IMG, 2, ("rgb", "ir"))


def test_range_coverage_of_a_float_model(data_yaml, tmp_path):
    torch.manual_seed(0)
    model = build_model("ghost-n", nc=5, input_mode="rgb+ir").eval()
    spec = load_dataset_yaml(data_yaml)
    split = make_loader(Dataset(spec, "val", IMG), 4, False, 0)
    small = load_calib_set(make_calib_set(data_yaml, 1, split="val", name="one", out_dir=tmp_path))
    coverage = range_coverage(model, small, split, img_size=IMG)
    assert "input" in coverage and len(coverage) > 20
    assert all(0 < value <= 1 for value in coverage.values())
    everything = load_calib_set(make_calib_set(data_yaml, 4, split="val", name="every", out_dir=tmp_path))
    assert all(value == 1.0 for value in range_coverage(model, everything, split, img_size=IMG).values())
