"""More bad input (issue 15): unwritable destinations, non-finite options, recipe values, bounded readers.

Same contract as tests/test_bad_input.py: one line on stderr naming the file or the CLI option, exit code 2,
nothing half-written. These cases need no trained model; the one export runs a 64 px sample without parity.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bad_input import assert_user_error  # the one-line, exit-2 contract, checked one way

from ghost_deploy.bitplan import BitPlan
from ghost_deploy.cli import main
from ghost_deploy.contract import ParityMeta, Receipt
from ghost_deploy.engines.receipt import load_receipt
from ghost_deploy.errors import DEBUG, UserError
from ghost_deploy.io import read_user_yaml, remove_stale_temps, write_json_atomic
from ghost_deploy.recipe import RECIPES_DIR, load_recipe


def cli(*args):
    try:
        return CliRunner().invoke(main, [str(arg) for arg in args])
    finally:
        DEBUG["on"] = False


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The id of a process that has exited (reaped), so it runs no more."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


# ------------------------------------------------------------------------------------------ unwritable destinations
def test_write_below_a_regular_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    for destination in (blocker / "plan.json", blocker / "deeper" / "plan.json"):
        with pytest.raises(UserError, match=f"cannot write here: {blocker} is a file, not a folder") as caught:
            write_json_atomic(destination, {"x": 1})
        assert caught.value.path == str(destination) and "\n" not in caught.value.line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_write_below_a_regular_file_through_the_cli(tmp_path):
    annotations = tmp_path / "annotation1024.txt"
    annotations.write_text("00000001 100 100 0.5 90 110 110 90 90 90 110 110 1 1 0\n")
    blocker = tmp_path / "labels"
    blocker.write_text("")
    result = cli("data", "convert-vedai", annotations, blocker / "out")
    assert_user_error(result, blocker / "out", f"cannot write here: {blocker} is a file, not a folder")


def test_write_into_proc_fails_with_one_line():
    with pytest.raises(UserError, match="cannot write here: ") as caught:
        write_json_atomic("/proc/ghost-test/plan.json", {"x": 1})
    assert caught.value.path == "/proc/ghost-test/plan.json"


def test_write_onto_a_folder(tmp_path):
    (tmp_path / "plan.json").mkdir()
    with pytest.raises(UserError, match="cannot write here: Is a directory"):
        write_json_atomic(tmp_path / "plan.json", {"x": 1})
    assert hidden_files(tmp_path) == []


def test_write_into_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o555 folder is still writable")
        with pytest.raises(UserError, match="cannot write here: Permission denied"):
            write_json_atomic(folder / "plan.json", {"x": 1})
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_full_disk_leaves_no_temp(tmp_path, monkeypatch, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(Path, "write_bytes", full)
    destination = tmp_path / "report.json"
    with pytest.raises(UserError) as caught:
        write_json_atomic(destination, {"x": 1})
    assert caught.value.line() == f"{destination}: cannot write here: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead, mine = dead_pid(), os.getpid()
    stale = [f".plan.json.{dead}.abcd1234.tmp", f".ghost.onnx.{dead}.checking.onnx"]
    kept = [f".plan.json.{mine}.abcd1234.tmp", ".notes.txt", f"plan.json.{dead}.abcd1234.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("")
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_export_removes_a_killed_exports_checking_onnx(tmp_path):
    assert cli("sample", "ghost-p", "--img-size", "64", "--bits", "8", "--nc", "2", "--out",
               tmp_path / "m.safetensors").exit_code == 0
    stale = tmp_path / f".m.onnx.{dead_pid()}.checking.onnx"
    stale.write_bytes(b"half an ONNX")
    result = cli("export", "--onnx", tmp_path / "m.safetensors", "--no-parity", "--no-simplify", "--no-progress")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (tmp_path / "m.onnx").is_file()
    assert hidden_files(tmp_path) == []


# ------------------------------------------------------------------------------------------ finite numbers
OPTION_CASES = {
    "bench-max-regression-nan": (["bench", "--max-regression", "nan"], "--max-regression", "nan is not a finite number"),
    "bench-max-map-drop-inf": (["bench", "--max-map-drop", "inf"], "--max-map-drop", "inf is not a finite number"),
    "bench-warmup-cv-nan": (["bench", "--warmup-cv", "nan"], "--warmup-cv", "nan is not a finite number"),
    "bench-max-regression-negative": (["bench", "--max-regression", "-0.1"], "--max-regression", "must be >= 0"),
    "plan-avg-bits-nan": (["plan", "x.safetensors", "--out", "p.json", "--avg-bits", "nan"], "--avg-bits",
                          "nan is not a finite number"),
    "plan-size-mb-zero": (["plan", "x.safetensors", "--out", "p.json", "--size-mb", "0"], "--size-mb", "must be > 0"),
    "plan-threshold-inf": (["plan", "x.safetensors", "--out", "p.json", "--threshold", "-inf"], "--threshold",
                           "-inf is not a finite number"),
    "calib-low-nan": (["calib", "coverage", "--weights", "w", "--calib", "c", "--low", "nan"], "--low",
                      "nan is not a finite number"),
    "train-epochs-0": (["train", "--epochs", "0"], "--epochs", "0 must be an integer >= 1"),
    "calib-seed-negative": (["calib", "make", "--seed", "-1"], "--seed", "-1 must be an integer >= 0"),
    "synth-seed-negative": (["data", "synth", "--seed", "-1"], "--seed", "-1 must be an integer >= 0"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_value_is_one_line(tmp_path, case):
    args, option, problem = OPTION_CASES[case]
    result = cli(*args)
    assert_user_error(result, option, problem)


# ------------------------------------------------------------------------------------------ recipe values
RECIPE_CASES = {
    "lr0-negative": ("teacher: {lr0: -0.01}", "teacher.lr0: must be a number > 0, got -0.01"),
    "epochs-text": ("teacher: {epochs: ten}", "teacher.epochs: must be an integer >= 1, got 'ten'"),
    "batch-size-0": ("ghost: {batch_size: 0}", "ghost.batch_size: must be an integer >= 1, got 0"),
    "input-mode-thermal": ("input_mode: thermal", "input_mode: must be one of rgb, ir, rgb+ir, got 'thermal'"),
    "img-size-100": ("img_size: 100", "img_size: must be a multiple of 16"),
    "seed-negative": ("seed: -1", "seed: must be an integer >= 0, got -1"),
    "bool-as-string": ("sr: 'false'", "sr: must be true or false, got 'false'"),
    "lr0-as-text": ("ghost: {lr0: 1e-3}", "ghost.lr0: must be a number > 0, got '1e-3' (YAML reads 1e-3 as text"),
    "open-rate-above-1": ("ghost: {distill: {random_open_rate: 1.5}}",
                          "ghost.distill.random_open_rate: must be a number in [0, 1], got 1.5"),
    "det-weight-negative": ("ghost: {distill: {det_weight: -1}}", "ghost.distill.det_weight: must be a number >= 0"),
    "switch-unknown": ("ghost: {distill: {switch: sometimes}}", "ghost.distill.switch: must be true, false or one of"),
    "section-not-mapping": ("teacher: 5", "teacher: must be a mapping of epochs,"),
    "bit-range-reversed": ("ghost: {plan: {bit_min: 6, bit_max: 4}}", "ghost.plan.bit_min: 6 is above"),
    "model-unknown": ("model: ghost-xl", "model: must be one of ghost-s,"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_value_is_checked_when_read(tmp_path, case):
    text, problem = RECIPE_CASES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\n{text}\n")
    out = tmp_path / "run"
    assert_user_error(cli("train", "--recipe", recipe, "--out", out), recipe, problem)
    assert not out.exists()


@pytest.mark.parametrize("switch", [True, False, "learned", "random", "off"])
def test_recipe_accepts_every_switch_mode(tmp_path, switch):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(f"name: ok\nghost: {{distill: {{switch: {json.dumps(switch)}, det_weight: 0.5, "
                      "random_open_rate: 0}}\n")
    assert load_recipe(recipe)["ghost"]["distill"]["switch"] == switch


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_training_recipe_loads(name):
    assert load_recipe(name)["name"] == name


# ------------------------------------------------------------------------------------------ bounded readers
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))
READER_CASES = {
    "billion-laughs": (BILLION_LAUGHS.encode(), "recipe expands to more than 1000000 nodes through aliases"),
    "nested-100000": (b"a: " + b"[" * 100000, "recipe is nested more than 64 levels deep"),
    "recursive-alias": (b"a: &a [*a]\n", "recipe is nested more than 64 levels deep"),
    "latin-1": ("name: caf\u00e9\n".encode("latin-1"), "recipe is not UTF-8 text (byte 0xe9 at offset 9)"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_recipe_reader_is_bounded(tmp_path, case):
    content, problem = READER_CASES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    assert_user_error(cli("train", "--recipe", recipe, "--out", tmp_path / "run"), recipe, problem)


def test_utf8_bom_is_accepted(tmp_path):
    recipe = tmp_path / "bom.yaml"
    recipe.write_bytes(b"\xef\xbb\xbfname: bom\nimg_size: 64\n")
    assert load_recipe(recipe)["img_size"] == 64
    assert read_user_yaml(recipe, "recipe") == {"name": "bom", "img_size": 64}


def test_oversized_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(UserError, match="recipe is larger than 16 MB"):
        read_user_yaml(big, "recipe")


BENCH_CASES = {
    "no-backends": ({"format": "ghost-deploy/bench/v1"}, "backends is missing"),
    "number-as-string": ({"format": "ghost-deploy/bench/v1", "backends": [
        {"name": "ort", "latency": [{"batch": 1, "infer": {"p50_ms": "fast", "p99_ms": 2.0}}]}]},
        "backends[0].latency[0].infer.p50_ms must be a number, got \"fast\""),
    "backend-not-object": ({"format": "ghost-deploy/bench/v1", "backends": ["ort"]},
                           "backends[0] must be an object, got \"ort\""),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES) + ["nested-100000"])
def test_bench_compare_bad_result(tmp_path, case):
    old = tmp_path / "old.json"
    if case == "nested-100000":
        old.write_text("[" * 100000 + "]" * 100000)
        problem = "bench result is nested more than 64 levels deep"
    else:
        content, problem = BENCH_CASES[case]
        old.write_text(json.dumps(content))
    result = cli("bench", "--compare", old, "--against", old)
    assert_user_error(result, old, problem)


PLAN_LAYER = '{"weight_bits": 4, "act_bits": 8, "params": 1, "macs": 1}'


@pytest.mark.parametrize("text, problem", [
    ('{"layers": {"model.0.conv": %s, "model.0.conv": %s}}' % (PLAN_LAYER, PLAN_LAYER),
     "key 'model.0.conv' appears twice in one object"),
    ('{"layers": {"model.0.conv": %s}, "layer": {}}' % PLAN_LAYER, "unknown key 'layer' (known: format,"),
], ids=["layer-twice", "unknown-top-level-key"])
def test_bit_plan_refuses_duplicates_and_unknown_keys(tmp_path, text, problem):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        BitPlan.load(path)
    assert caught.value.path == str(path) and problem in caught.value.problem


def test_receipt_and_parity_meta_decoders_name_the_key(tmp_path):
    receipt = tmp_path / "model.receipt.json"
    receipt.write_text("[]")
    with pytest.raises(UserError, match="not a ghost-deploy engine receipt"):
        load_receipt(receipt)
    with pytest.raises(UserError, match="receipt 'hashes' must be dict or null, got list"):
        Receipt.from_dict({"schema": "ghost-deploy/engine-receipt/1", "hashes": []}, source=receipt)
    with pytest.raises(UserError, match="parity set meta 'img_size' must be int or null, got str"):
        ParityMeta.from_dict({"input_names": ["rgb"], "output_names": ["out"], "img_size": "64"}, source="p.npz")
    with pytest.raises(UserError, match="parity set meta must be a JSON object"):
        ParityMeta.from_dict([], source="p.npz")


# ------------------------------------------------------------------------------------------ ignored options
@pytest.mark.parametrize("option", ["--teacher", "--bit-plan"])
def test_train_teacher_stage_refuses_ghost_options(tmp_path, option):
    out = tmp_path / "run"
    result = cli("train", "--stage", "teacher", option, tmp_path / "x", "--out", out)
    assert_user_error(result, option, "has no effect with --stage teacher")
    assert not out.exists()


def test_build_engine_timing_cache_in_a_missing_folder(tmp_path):
    cache = tmp_path / "nowhere" / "timing.cache"
    result = cli("build-engine", "--onnx", tmp_path / "m.onnx", "--timing-cache", cache, "--out", tmp_path / "e")
    assert_user_error(result, "--timing-cache", f"{cache}: no such file, and its folder")
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------ messages that misled
def _synth_copy(tmp_path) -> Path:
    import shutil

    from ghost_deploy.data.synth import ensure_synthetic_dataset

    source = ensure_synthetic_dataset(root=tmp_path / "synth", n_train=2, n_val=1, n_test=1, img_size=64)
    copy = tmp_path / "copy"
    shutil.copytree(source.parent, copy)
    return copy


def test_images_folder_that_is_a_file_is_named_as_such(tmp_path):
    import shutil

    from ghost_deploy.data.dataset import Dataset, load_dataset_yaml

    root = _synth_copy(tmp_path)
    shutil.rmtree(root / "images")
    (root / "images").write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder") as info:
        Dataset(load_dataset_yaml(root / "data.yaml"), "train", 64, augment=False, strict=True)
    assert info.value.path == str(root / "images")


def test_symlink_loop_is_not_called_a_missing_partner(tmp_path):
    from ghost_deploy.data.dataset import Dataset, load_dataset_yaml

    root = _synth_copy(tmp_path)
    ir = sorted((root / "images").glob("*_ir.png"))[0]
    ir.unlink()
    ir.symlink_to(ir.name)  # points at itself: a loop
    with pytest.raises(UserError, match="symlink that does not resolve") as info:
        Dataset(load_dataset_yaml(root / "data.yaml"), "train", 64, augment=False, strict=True)
    assert info.value.path == str(ir)


def test_onnx_without_its_external_data_says_so(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from ghost_deploy.onnx_graph import load_onnx

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    assert load_onnx(path).graph.initializer[0].name == "w"
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(UserError, match="external weight data file m.onnx.data is missing"):
        load_onnx(path)


def _corrupt_pixels_keep_header(path: Path) -> None:
    """A PNG whose header (size) reads fine but whose pixel data does not decode: found only at load time."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    kind = data.index(b"IDAT")
    length = struct.unpack(">I", data[kind - 4:kind])[0]
    body = kind + 4
    data[body + 2:body + min(length, 66)] = bytes(min(length, 66) - 2)  # zlib stream broken, checksum made valid
    data[body + length:body + length + 4] = struct.pack(">I", zlib.crc32(bytes(data[kind:body + length])))
    path.write_bytes(bytes(data))


def test_decode_failure_after_indexing_skips_the_sample_without_strict(tmp_path):
    from ghost_deploy.data.dataset import Dataset, DataWarning, load_dataset_yaml

    root = _synth_copy(tmp_path)
    spec = load_dataset_yaml(root / "data.yaml")
    probe = Dataset(spec, "train", 64, augment=False)
    bad = sorted(probe.samples, key=lambda s: s.key)[0]
    _corrupt_pixels_keep_header(bad.images["rgb"])
    lenient = Dataset(spec, "train", 64, augment=False)
    assert lenient.skipped == []  # the header still reads: indexing cannot see it
    with pytest.warns(DataWarning, match=r"skipped 1 bad sample\(s\): .*_co.png: "):
        items = [lenient[index] for index in range(len(lenient))]
    assert len(items) == len(lenient) and len(lenient.skipped) == 1  # the next good sample stood in
    strict = Dataset(spec, "train", 64, augment=False, strict=True)
    index = [s.key for s in strict.samples].index(bad.key)
    with pytest.raises(UserError, match="_co.png"):
        strict[index]


def test_worker_user_error_arrives_as_the_user_error(tmp_path):
    import torch

    from ghost_deploy.data.dataset import Dataset, collate, load_dataset_yaml

    root = _synth_copy(tmp_path)
    spec = load_dataset_yaml(root / "data.yaml")
    dataset = Dataset(spec, "train", 64, augment=False, strict=True)
    _corrupt_pixels_keep_header(dataset.samples[0].images["rgb"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(UserError) as info:
        list(loader)
    assert "\n" not in info.value.line() and info.value.line().endswith(info.value.problem)
    assert "_co.png" in info.value.line()
