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
    "mosaic-2": ("hyp: {mosaic: 2}", "hyp.mosaic: must be a number in [0, 1], got 2"),
    "iou-thres-nan": ("eval: {iou_thres: .nan}", "eval.iou_thres: must be a number in [0, 1], got nan"),
    "lr0-inf": ("teacher: {lr0: .inf}", "teacher.lr0: must be a number > 0, got inf"),
    "parity-images-0": ("parity: {images: 0}", "parity.images: must be an integer >= 1, got 0"),
    "optimizer-adam": ("teacher: {optimizer: adam}", "teacher.optimizer: must be one of sgd, adamw, got 'adam'"),
    "amp-fp8": ("amp: fp8", "amp: must be one of auto, off, bf16, fp16, got 'fp8'"),
    "workers-negative": ("workers: -1", "workers: must be an integer >= 0, got -1"),
    "open-bounds-reversed": ("ghost: {distill: {open_bounds: [0.9, 0.1]}}",
                             "ghost.distill.open_bounds: must be two numbers [low, high] with 0 <= low <= high <= 1"),
    "min-cosine-2": ("parity: {min_cosine: 2}", "parity.min_cosine: must be a number in [-1, 1], got 2"),
    "name-empty": ("name: ''", "name: must be a name without '/' (the run folder is runs/<name>), got ''"),
    "name-a-path": ("name: ../elsewhere", "name: must be a name without '/'"),
    "img-size-8": ("img_size: 8", "img_size: must be an integer >= 16, got 8"),
    "epochs-fraction": ("teacher: {epochs: 2.5}", "teacher.epochs: must be an integer >= 1, got 2.5"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_value_is_checked_when_read(tmp_path, case):
    text, problem = RECIPE_CASES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text if text.startswith("name:") else f"name: bad\n{text}\n")
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


# ------------------------------------------------------------------------------------------ artifacts of one tiny model
@pytest.fixture(scope="module")
def arts(tmp_path_factory, one_torch_thread):
    """A 64 px RGB+IR set (5 classes), ghost-p samples at 8 bits and FP32, a ghost-n sample, q's export and plans."""
    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.data.calib import make_calib_set
    from ghost_deploy.data.synth import ensure_synthetic_dataset
    from ghost_deploy.export import export_onnx
    from ghost_deploy.export.sample import make_sample

    root = tmp_path_factory.mktemp("more")
    data = ensure_synthetic_dataset(root=root / "ds", n_train=2, n_val=1, n_test=1, img_size=64)
    made = {name: make_sample(model, root / f"{name}.safetensors", img_size=64, bits=bits, nc=5)
            for name, model, bits in (("q", "ghost-p", "8"), ("f", "ghost-p", "fp32"), ("n", "ghost-n", "8"))}
    exported = export_onnx(made["q"], root / "export" / "q.onnx", simplify=False, progress=False, data=data)
    read_meta(made["n"]).bit_plan.save(root / "n-plan.json")
    make_calib_set(data, 1, out_dir=root / "calib", name="c1")
    return {"root": root, "data": data, **made, "onnx": exported.onnx_path, "parity": exported.parity_set_path,
            "n_plan": root / "n-plan.json"}


def with_header(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint `source` whose header JSON `change(header)` edited (the tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as handle:
        header = json.loads(handle.metadata()["ghost"])
    change(header)
    save_file(load_file(str(source)), str(target), metadata={"ghost": json.dumps(header)})
    return target


def files_under(folder: Path) -> list[str]:
    """Every file and folder under `folder` (temp files included): what a refused command must leave as it was."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(folder: Path, args, named, *problem) -> str:
    """The CLI refuses `args` with one line naming `named` (exit 2), and nothing under `folder` changed."""
    before = files_under(folder)
    line = assert_user_error(cli(*args), named, *problem)
    assert files_under(folder) == before, (before, files_under(folder))
    return line


# ------------------------------------------------------------------------------------------ a checkpoint's dataset
def test_a_checkpoint_records_its_dataset_absolute(arts, tmp_path, monkeypatch):
    """Trained with a relative --data, the header holds the absolute path: any folder can export it."""
    import ghost_deploy
    from ghost_deploy.data import load_dataset_yaml
    from ghost_deploy.recipe import load_recipe
    from ghost_deploy.train.loop import checkpoint_meta

    monkeypatch.chdir(arts["data"].parent.parent)
    relative = Path(arts["data"].parent.name) / "data.yaml"
    model = ghost_deploy.build_model("ghost-p", nc=5)
    header = checkpoint_meta(load_recipe("demo"), load_dataset_yaml(relative), "teacher", str(relative), model)
    assert header.data == str(arts["data"].absolute()) and Path(header.data).is_absolute()
    checkpoint = with_header(arts["f"], tmp_path / "f.safetensors", lambda h: h.update(data=header.data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("export", "--onnx", checkpoint, "--fp32", "--no-simplify", "--no-progress", "--out", "f.onnx")
    assert result.exit_code == 0, result.output
    report = json.loads((elsewhere / "f.export.json").read_text())
    assert str(arts["data"].absolute()) in json.dumps(report)  # the parity images came from the recorded dataset


OLD_RELATIVE = {  # command (after the checkpoint), the option the message names
    "export": (["export", "--fp32", "--no-simplify", "--no-progress", "--out", "x.onnx", "--onnx"],
               "pass --data YAML or --parity-images DIR"),
    "bench": (["bench", *"--iterations 1 --warmup-max 1 --no-plots --no-progress --out b --checkpoint".split()],
              "pass --data YAML, or --no-accuracy to time without mAP"),
    "train-ghost": (["train", "--stage", "ghost", "--out", "run", "--no-progress", "--teacher"], "pass --data YAML"),
}


@pytest.mark.parametrize("command", sorted(OLD_RELATIVE))
def test_an_old_checkpoints_relative_dataset_is_named_with_the_option(arts, tmp_path, monkeypatch, command):
    """An old checkpoint holds --data as typed ("ds/data.yaml"); from another folder it is not found: one line
    naming the checkpoint and the dataset, and the option that names it instead. Nothing is written."""
    checkpoint = with_header(arts["f"], tmp_path / "old.safetensors", lambda h: h.update(data="ds/data.yaml"))
    monkeypatch.chdir(tmp_path)
    args, hint = OLD_RELATIVE[command]
    result = cli(*args, checkpoint)
    assert_user_error(result, checkpoint, "was trained on the dataset ds/data.yaml, a path relative to the folder "
                                          "training ran in, not found from here", hint)
    assert files_under(tmp_path) == ["old.safetensors"]


def test_an_old_relative_dataset_that_resolves_here_still_works(arts, tmp_path, monkeypatch):
    checkpoint = with_header(arts["f"], tmp_path / "old.safetensors",
                             lambda h: h.update(data=f"{arts['data'].parent.name}/data.yaml"))
    monkeypatch.chdir(arts["data"].parent.parent)
    from ghost_deploy.checkpoint import read_meta

    assert read_meta(checkpoint).dataset(checkpoint) == f"{arts['data'].parent.name}/data.yaml"


# ------------------------------------------------------------------------------------------ pipeline: refused at start
TINY_RECIPE = ("name: tiny\nmodel: ghost-p\nimg_size: 64\nteacher: {epochs: 1, batch_size: 2}\n"
               "ghost: {epochs: 1, batch_size: 2, calib_batches: 1}\n")


def _pipeline_case(arts, tmp_path, case) -> tuple[list, str, str]:
    """(extra arguments, what the line names, a fragment of the problem) for one bad pipeline start."""
    out, data = tmp_path / "run", arts["data"]
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    if case == "ledger-not-json":
        out.mkdir()
        (out / "pipeline.json").write_text("{nope")
    if case == "ledger-wrong-shape":
        out.mkdir()
        (out / "pipeline.json").write_text('{"teacher": []}')
    if case == "someone-elses-run":
        (out / "teacher" / "weights").mkdir(parents=True)
        (out / "teacher" / "weights" / "best.safetensors").write_bytes(b"a run of `train`")
    rgb_only = tmp_path / "rgb.yaml"
    rgb_only.write_text(data.read_text().replace("modalities: [rgb, ir]", "modalities: [rgb]")
                        .replace("path: .", f"path: {data.parent}"))
    return {
        "unknown-target": (["--target", "jetson-tx2"], "--target", "unknown target 'jetson-tx2'"),
        "cpu-target": (["--target", "openvino-cpu"], "--target", "the pipeline's engine target is a TensorRT device"),
        "bench-iterations-0": (["--bench-iterations", "0"], "--bench-iterations", "0 must be an integer >= 1"),
        "bench-iterations-text": (["--bench-iterations", "many"], "--bench-iterations", "'many' is not an integer"),
        "dataset-missing": (["--data", tmp_path / "nowhere.yaml"], tmp_path / "nowhere.yaml", "dataset yaml not found"),
        "dataset-not-yaml": (["--data", blocker], blocker, "a dataset yaml must be a mapping"),
        "dataset-lacks-ir": (["--data", rgb_only], rgb_only, "input mode rgb+ir needs modalities ['ir', 'rgb']"),
        "out-is-a-file": (["--out", blocker], "--out", f"{blocker} is a file, not a folder"),
        "out-below-a-file": (["--out", blocker / "run"], blocker / "run",
                             f"cannot write here: {blocker} is a file, not a folder"),
        "out-in-proc": (["--out", "/proc/ghost-run"], "/proc/ghost-run", "cannot write here"),
        "ledger-not-json": ([], out / "pipeline.json", "not valid JSON"),
        "ledger-wrong-shape": ([], out / "pipeline.json", "not a pipeline ledger"),
        "someone-elses-run": ([], out, "holds a run the pipeline did not make (teacher/weights/best.safetensors)"),
    }[case]


PIPELINE_CASES = ["unknown-target", "cpu-target", "bench-iterations-0", "bench-iterations-text", "dataset-missing",
                  "dataset-not-yaml", "dataset-lacks-ir", "out-is-a-file", "out-below-a-file", "out-in-proc",
                  "ledger-not-json", "ledger-wrong-shape", "someone-elses-run"]


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_refuses_bad_options_before_any_training(arts, tmp_path, monkeypatch, case):
    from ghost_deploy import pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline, "train_teacher", no_training)
    monkeypatch.setattr(pipeline, "train_ghost", no_training)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    extra, named, problem = _pipeline_case(arts, tmp_path, case)
    before = files_under(tmp_path)
    options = ["--recipe", recipe, "--out", tmp_path / "run", "--data", arts["data"], "--no-progress"]
    assert_user_error(cli("pipeline", *options, *extra), named, problem)
    assert files_under(tmp_path) == before  # no ledger, no stage folder, nothing replaced


def test_pipeline_force_replaces_a_ledger_that_is_not_one(arts, tmp_path, monkeypatch):
    from ghost_deploy import pipeline

    started = []
    monkeypatch.setattr(pipeline, "train_teacher", lambda *a, **k: started.append(1) or (_ for _ in ()).throw(
        UserError("stop", "here")))
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text("{nope")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    result = cli("pipeline", "--recipe", recipe, "--out", out, "--data", arts["data"], "--force", "--no-progress")
    assert_user_error(result, "stop", "here")
    assert started and json.loads((out / "pipeline.json").read_text()) == {}


# ------------------------------------------------------------------------------------------ checkpoint headers
def _anchors(header):
    header["anchors_pixels"][0][0][0] += 1.0


HEADER_CASES = {  # change to the header of the 8-bit ghost-p sample -> the problem named
    "model-unknown": (lambda h: h.update(model="ghost-q"), "checkpoint metadata 'model': unknown model 'ghost-q'"),
    "input-mode-unknown": (lambda h: h.update(input_mode="thermal"),
                           "checkpoint metadata 'input_mode': must be one of rgb, ir, rgb+ir, got 'thermal'"),
    "img-size-not-a-multiple": (lambda h: h.update(img_size=33), "'img_size': must be a positive multiple of 16 "
                                                                 "(the deepest stride of ghost-p), got 33"),
    "img-size-text": (lambda h: h.update(img_size="64"), "'img_size': must be a positive multiple of 16"),
    "img-size-missing": (lambda h: h.pop("img_size"), "'img_size': must be a positive multiple of 16"),
    "input-names-misfit": (lambda h: h.update(input_names=["rgb"]),
                           "'input_names' ['rgb'] do not fit input_mode rgb+ir (inputs ['rgb', 'ir'])"),
    "strides-differ": (lambda h: h.update(strides=[8, 16, 32]),
                       "'strides' [8, 16, 32] does not match the model's [4.0, 8.0, 16.0]"),
    "anchors-differ": (_anchors, "'anchors_pixels' [[[11.0, 13.0]"),
    "data-not-text": (lambda h: h.update(data=5), "checkpoint metadata 'data' must be str or null, got int"),
    "sr-not-bool": (lambda h: h.update(sr="yes"), "checkpoint metadata 'sr' must be bool, got str"),
    "names-count": (lambda h: h.update(names=["car"]), "checkpoint metadata: nc is 5 but 1 class names are listed"),
    "another-models-name": (lambda h: h.update(model="ghost-n"), "has shape (8,), model expects (16,)"),
    "format-unknown": (lambda h: h.update(format="yolo/v5"), "unknown checkpoint format 'yolo/v5'"),
    "recipe-not-mapping": (lambda h: h.update(recipe=[]), "checkpoint metadata 'recipe' must be dict, got list"),
    "bit-plan-a-list": (lambda h: h.update(bit_plan=[]), "not a bit plan: expected a JSON object with a 'layers'"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_checkpoint_header_is_checked_before_the_model_is_built(arts, tmp_path, case):
    change, problem = HEADER_CASES[case]
    checkpoint = with_header(arts["q"], tmp_path / "h.safetensors", change)
    refused(tmp_path, ["plan", checkpoint, "--out", tmp_path / "plan.json"], checkpoint, problem)


@pytest.mark.parametrize("case", ["img-size-text", "input-names-misfit", "strides-differ"])
def test_export_refuses_the_header_it_used_to_crash_on_or_accept(arts, tmp_path, case):
    """(was: a TypeError, a KeyError deep in the export, or an ONNX written from a text img_size)"""
    change, problem = HEADER_CASES[case]
    checkpoint = with_header(arts["q"], tmp_path / "h.safetensors", change)
    refused(tmp_path, ["export", "--onnx", checkpoint, "--no-progress", "--no-simplify"], checkpoint, problem)


def test_a_header_without_strides_gets_the_models(arts, tmp_path):
    from ghost_deploy.checkpoint import model_from_checkpoint

    checkpoint = with_header(arts["q"], tmp_path / "h.safetensors", lambda h: h.update(strides=[], anchors_pixels=[]))
    model, header = model_from_checkpoint(checkpoint)
    assert header.strides == model.detect.stride.tolist() and len(header.anchors_pixels) == 3


# ------------------------------------------------------------------------------------------ sample, plan
def sample_cases(tmp_path):
    out = tmp_path / "s.safetensors"
    return {
        "img-size-not-a-multiple": (["ghost-p", "--img-size", "33", "--out", out], "--img-size",
                                    "33 must be a multiple of 16 (the deepest stride of ghost-p)"),
        "img-size-huge": (["ghost-p", "--img-size", "100000", "--out", out], "--img-size",
                          "100000 must be an integer in 32..2048"),
        "nc-0": (["ghost-p", "--nc", "0", "--out", out], "--nc", "0 must be an integer in 1..10000"),
        "nc-huge": (["ghost-p", "--nc", "100000000", "--out", out], "--nc", "must be an integer in 1..10000"),
        "model-unknown": (["ghost-q", "--out", out], "MODEL", "unknown model 'ghost-q' (known: ghost-s,"),
        "out-is-a-folder": (["ghost-p", "--out", tmp_path], "--out", f"{tmp_path} is a folder, not a file"),
        "out-empty": (["ghost-p", "--out", ""], "--out", "an empty path is not a file"),
    }


@pytest.mark.parametrize("case", ["img-size-not-a-multiple", "img-size-huge", "nc-0", "nc-huge", "model-unknown",
                                  "out-is-a-folder", "out-empty"])
def test_sample_refuses_bad_options_in_one_line(tmp_path, case):
    args, named, problem = sample_cases(tmp_path)[case]
    refused(tmp_path, ["sample", *args], named, problem)


@pytest.mark.parametrize("case", ["out-is-the-checkpoint", "act-bits-9", "out-is-a-folder"])
def test_plan_refuses_bad_options(arts, tmp_path, case):
    checkpoint = tmp_path / "q.safetensors"
    checkpoint.write_bytes(arts["q"].read_bytes())
    args, named, problem = {
        "out-is-the-checkpoint": (["--out", checkpoint], "--out",
                                  "would overwrite the checkpoint the plan is made for"),
        "act-bits-9": (["--out", tmp_path / "p.json", "--act-bits", "9"], "--act-bits", "9 must be an integer in 2..8"),
        "out-is-a-folder": (["--out", tmp_path], "--out", "is a folder, not a file"),
    }[case]
    refused(tmp_path, ["plan", checkpoint, *args], named, problem)
    assert checkpoint.read_bytes() == arts["q"].read_bytes()


# ------------------------------------------------------------------------------------------ export
def export_cases(arts, tmp_path):
    q, f, missing = arts["q"], arts["f"], tmp_path / "nowhere.yaml"
    calib = tmp_path / "c1.yaml"
    return {
        "out-not-onnx": (["--onnx", q, "--out", tmp_path / "q.parity.npz"], "--out", "must end in .onnx"),
        "bit-plan-without-weights": (["--onnx", q, "--bit-plan", arts["n_plan"]], "--bit-plan", "is read only for PTQ"),
        "calibrator-without-weights": (["--onnx", q, "--calibrator", "max"], "--calibrator", "is read only for PTQ"),
        "calib-without-weights": (["--onnx", q, "--calib", calib], "--calib", "with --onnx it would be ignored"),
        "opset-text": (["--onnx", q, "--opset", "seventeen"], "--opset", "'seventeen' is not an integer"),
        "parity-count-0": (["--onnx", q, "--parity-count", "0"], "--parity-count", "0 must be an integer >= 1"),
        "parity-images-a-file": (["--onnx", q, "--parity-images", arts["onnx"]], arts["onnx"],
                                 "is a file, not a folder of images (nor a calibration manifest .yaml)"),
        "parity-manifest-missing": (["--onnx", q, "--parity-images", missing], missing,
                                    "calibration set manifest not found (--parity-images)"),
        "parity-data-missing": (["--onnx", q, "--data", missing], missing,
                                "dataset YAML for the parity images not found (--data)"),
        "fp32-and-int4": (["--onnx", f, "--fp32", "--int4-weights"], "--int4-weights", "an FP32 export has no integer"),
        "ptq-opset-before-ptq": (["--weights", f, "--calib", calib, "--opset", "9"], "--opset",
                                 "must be an integer in 13..21"),
        "ptq-out-before-ptq": (["--weights", f, "--calib", calib, "--out", tmp_path / "x.txt"], "--out",
                               "x.txt must end in .onnx"),
    }


EXPORT_EARLY = ["out-not-onnx", "bit-plan-without-weights", "calibrator-without-weights", "calib-without-weights",
                "opset-text", "parity-count-0", "parity-images-a-file", "parity-manifest-missing",
                "parity-data-missing", "fp32-and-int4", "ptq-opset-before-ptq", "ptq-out-before-ptq"]


@pytest.mark.parametrize("case", EXPORT_EARLY)
def test_export_refuses_before_it_builds_anything(arts, tmp_path, case):
    """Refused before PTQ or the graph build: no ONNX, no report, no parity set, no .ptq checkpoint beside --weights."""
    args, named, problem = export_cases(arts, tmp_path)[case]
    before = files_under(arts["root"])
    refused(tmp_path, ["export", *args, "--no-progress", "--no-simplify"], named, problem)
    assert files_under(arts["root"]) == before


# ------------------------------------------------------------------------------------------ build-engine
def engine_cases(arts, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    profile = tmp_path / "board.yaml"
    other = arts["f"]
    return {
        "out-below-a-file": (["--out", blocker / "e"], blocker / "e", f"cannot write here: {blocker} is a file"),
        "out-in-proc": (["--out", "/proc/ghost-engine"], "/proc/ghost-engine", "cannot write here"),
        "out-is-a-file": (["--out", blocker], "--out", f"{blocker} is a file, not a folder"),
        "onnx-is-a-folder": (["--onnx", tmp_path], tmp_path, "is a folder, expected an .onnx file"),
        "parity-set-not-npz": (["--parity-set", blocker], blocker, "not a readable parity set .npz (not a NumPy .npz "
                                                                   "archive)"),
        "checkpoint-missing": (["--checkpoint", tmp_path / "gone.safetensors"], tmp_path / "gone.safetensors",
                               "no such checkpoint"),
        "checkpoint-of-another-model": (["--checkpoint", other], other, "is not the checkpoint q.onnx was exported "
                                        "from (its sha256 differs from the one the export recorded)"),
        "checkpoint-is-a-folder": (["--checkpoint", tmp_path], tmp_path, "is a folder, expected a .safetensors"),
        "target-yaml-invalid": (["--target", profile], profile, "invalid YAML: while parsing a flow sequence"),
        "target-without-kind": (["--target", blocker.with_suffix(".yaml")], blocker.with_suffix(".yaml"),
                                "kind must be one of jetson, dgpu, openvino, not None"),
        "opt-level-9": (["--opt-level", "9"], "--opt-level", "9 must be an integer in 0..5"),
        "dla-core-negative": (["--dla-core", "-1"], "--dla-core", "-1 must be an integer >= 0"),
    }


ENGINE_CASES = ["out-below-a-file", "out-in-proc", "out-is-a-file", "onnx-is-a-folder", "parity-set-not-npz",
                "checkpoint-missing", "checkpoint-of-another-model", "checkpoint-is-a-folder", "target-yaml-invalid",
                "target-without-kind", "opt-level-9", "dla-core-negative"]


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_build_engine_refuses_in_one_line(arts, tmp_path, case):
    cases = engine_cases(arts, tmp_path)
    (tmp_path / "board.yaml").write_text("name: [unclosed\n")
    (tmp_path / "notes.yaml").write_text("name: board\n")
    args, named, problem = cases[case]
    options = {"--onnx": arts["onnx"], "--out": tmp_path / "engine", "--target": "jetson-orin-nano"}
    options.update(zip(args[::2], args[1::2]))
    refused(tmp_path, ["build-engine", *[item for pair in options.items() for item in pair]], named, problem)


def test_build_engine_refuses_a_parity_set_of_another_model(arts, tmp_path):
    from ghost_deploy.export import export_onnx

    fp32 = export_onnx(arts["f"], tmp_path / "f.onnx", fp32=True, simplify=False, progress=False, data=arts["data"])
    args = ["build-engine", "--onnx", arts["onnx"], "--parity-set", fp32.parity_set_path, "--out", tmp_path / "e"]
    refused(tmp_path, args, arts["onnx"], "does not match its parity set f.parity.npz", "the parity set is another "
                                                                                        "model's")


# ------------------------------------------------------------------------------------------ bench
BENCH_QUICK = ["--iterations", "1", "--warmup-max", "1", "--no-plots", "--no-progress"]


def bench_cases(arts, tmp_path):
    blocker, q = tmp_path / "notes.txt", arts["q"]
    blocker.write_text("a file")
    old = tmp_path / "b" / "bench.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"format": "ghost-deploy/bench/v1", "backends": []}))
    binary = tmp_path / "data.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    return {
        "out-below-a-file": (["--checkpoint", q, "--out", blocker / "b"], blocker / "b",
                             f"cannot write here: {blocker} is a file, not a folder"),
        "out-in-proc": (["--checkpoint", q, "--out", "/proc/ghost-bench"], "/proc/ghost-bench", "cannot write here"),
        "out-is-a-file": (["--checkpoint", q, "--out", blocker], "--out", f"{blocker} is a file, not a folder"),
        "device-unknown": (["--checkpoint", q, "--device", "tpu"], "--device", "'tpu' is not a device (use cpu, cuda"),
        "engine-missing": (["--engine", tmp_path / "m.engine"], tmp_path / "m.engine", "engine file not found"),
        "engine-is-a-folder": (["--engine", tmp_path], tmp_path, "is a folder, expected an engine file"),
        "engine-alone": (["--engine", blocker], blocker, "an engine does not record the model's classes, strides and "
                                                         "anchors: pass the checkpoint (--checkpoint) or the exported"),
        "onnx-is-a-folder": (["--onnx", tmp_path], tmp_path, "is a folder, expected an .onnx file"),
        "run-is-a-file": (["--run", blocker], blocker, "is a file, not a run folder"),
        "compare-is-the-output": (["--checkpoint", q, "--compare", old, "--out", old.parent], "--out",
                                  "would overwrite the baseline given as --compare"),
        "iterations-0": (["--checkpoint", q, "--iterations", "0"], "--iterations", "0 must be an integer >= 1"),
        "batch-0": (["--checkpoint", q, "--batch", "0"], "--batch", "0 must be an integer >= 1"),
        "max-images-0": (["--checkpoint", q, "--max-images", "0"], "--max-images", "0 must be an integer >= 1"),
        "warmup-max-0": (["--checkpoint", q, "--warmup-max", "0"], "--warmup-max", "0 must be an integer >= 1"),
        "data-is-a-folder": (["--checkpoint", q, "--data", tmp_path], tmp_path, "dataset yaml is a folder, not a file"),
        "data-binary": (["--checkpoint", q, "--data", binary], binary, "dataset yaml is not UTF-8 text (byte 0x80"),
    }


@pytest.mark.parametrize("case", ["out-below-a-file", "out-in-proc", "out-is-a-file", "device-unknown",
                                  "engine-missing", "engine-is-a-folder", "engine-alone", "onnx-is-a-folder",
                                  "run-is-a-file", "compare-is-the-output", "iterations-0", "batch-0", "max-images-0",
                                  "warmup-max-0", "data-is-a-folder", "data-binary"])
def test_bench_refuses_before_it_times_anything(arts, tmp_path, case):
    args, named, problem = bench_cases(arts, tmp_path)[case]
    out = [] if "--out" in args else ["--out", tmp_path / "bench"]
    timing = [item for option in ("--iterations", "--warmup-max") if option not in args for item in (option, "1")]
    refused(tmp_path, ["bench", *args, *out, *timing, "--no-plots", "--no-progress"], named, problem)


def test_bench_refuses_forms_of_two_models(arts, tmp_path):
    """ghost-n and ghost-p at the same size and classes: the head's strides or inputs give it away."""
    from ghost_deploy.export.sample import make_sample

    other = make_sample("ghost-p", tmp_path / "other.safetensors", img_size=64, bits="8", nc=2)
    args = ["bench", "--checkpoint", other, "--onnx", arts["onnx"], "--out", tmp_path / "bench", *BENCH_QUICK]
    refused(tmp_path, args, arts["onnx"], "nc is 5 but", "bench compares forms of one model")


# ------------------------------------------------------------------------------------------ train
def train_cases(arts, tmp_path):
    blocker, data = tmp_path / "notes.txt", arts["data"]
    blocker.write_text("a file")
    recipe = tmp_path / "list.yaml"
    recipe.write_text("[img_size, 64]\n")
    ghost = ["--stage", "ghost", "--data", data, "--out", tmp_path / "run"]
    teacher = ["--stage", "teacher", "--data", data]
    return {
        "out-below-a-file": ([*teacher, "--out", blocker / "run"], blocker / "run" / "teacher",
                             f"cannot write here: {blocker} is a file, not a folder"),
        "out-in-proc": ([*teacher, "--out", "/proc/ghost-run"], "/proc/ghost-run/teacher", "cannot write here"),
        "out-empty": ([*teacher, "--out", ""], "--out", "an empty path is not a folder"),
        "device-unknown": ([*teacher, "--out", tmp_path / "run", "--device", "tpu"], "--device",
                           "'tpu' is not a device"),
        "nproc-0": ([*teacher, "--out", tmp_path / "run", "--nproc", "0"], "--nproc", "0 must be an integer >= 1"),
        "teacher-is-quantized": ([*ghost, "--teacher", arts["q"]], arts["q"],
                                 "is a quantized checkpoint (stage 'ghost'); the teacher is the FP32 model"),
        "bit-plan-of-another-model": ([*ghost, "--teacher", arts["f"], "--bit-plan", arts["n_plan"]], arts["n_plan"],
                                      "layer 'model.0.conv' has 16 output channels in the plan, 8 in this model: "
                                      "the plan was made for another model (ghost-n)"),
        "recipe-a-list": (["--recipe", recipe, "--out", tmp_path / "run"], recipe, "a recipe must be a YAML mapping"),
    }


@pytest.mark.parametrize("case", ["out-below-a-file", "out-in-proc", "out-empty", "device-unknown", "nproc-0",
                                  "teacher-is-quantized", "bit-plan-of-another-model", "recipe-a-list"])
def test_train_refuses_before_the_first_epoch(arts, tmp_path, case):
    args, named, problem = train_cases(arts, tmp_path)[case]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    base = [] if "--recipe" in args else ["--recipe", recipe]
    refused(tmp_path, ["train", *base, *args, "--no-progress"], named, problem)


def test_train_ghost_refuses_a_teacher_of_other_classes(arts, tmp_path):
    from ghost_deploy.export.sample import make_sample

    teacher = make_sample("ghost-p", tmp_path / "two-classes.safetensors", img_size=64, bits="fp32", nc=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    args = ["train", "--recipe", recipe, "--stage", "ghost", "--teacher", teacher, "--data", arts["data"], "--out",
            tmp_path / "run", "--no-progress"]
    refused(tmp_path, args, arts["data"], "has 5 classes, the teacher", "was trained on 2: distil on the teacher's "
                                                                        "dataset (--data)")


# ------------------------------------------------------------------------------------------ calib
def calib_cases(arts, tmp_path):
    data, blocker = tmp_path / "ds" / "data.yaml", tmp_path / "notes.txt"
    blocker.write_text("a file")
    manifest = tmp_path / "c1.yaml"
    manifest.write_text((arts["root"] / "calib" / "c1.yaml").read_text())
    coverage = ["coverage", "--weights", arts["q"], "--calib", manifest]
    return {
        "manifest-onto-the-dataset-yaml": (["make", "--data", data, "--out-dir", data.parent, "--name", "data",
                                            "--n", "1", "--force"], data,
                                           "exists and is not a calibration set manifest: it is never replaced (not "
                                           "even with --force)"),
        "out-dir-is-a-file": (["make", "--data", data, "--out-dir", blocker], "--out-dir", "is a file, not a folder"),
        "n-0": (["make", "--data", data, "--n", "0"], "--n", "0 must be an integer >= 1"),
        "brightness-bins-0": (["make", "--data", data, "--brightness-bins", "0"], "--brightness-bins",
                              "0 must be an integer >= 1"),
        "json-is-the-manifest": ([*coverage, "--json", manifest], "--json",
                                 "would overwrite the manifest given as --calib"),
        "json-is-the-checkpoint": ([*coverage, "--json", arts["q"]], "--json",
                                   "would overwrite the checkpoint given as --weights"),
        "json-is-a-folder": ([*coverage, "--json", tmp_path], "--json", "is a folder, not a file"),
    }


@pytest.mark.parametrize("case", ["manifest-onto-the-dataset-yaml", "out-dir-is-a-file", "n-0", "brightness-bins-0",
                                  "json-is-the-manifest", "json-is-the-checkpoint", "json-is-a-folder"])
def test_calib_refuses_in_one_line_and_replaces_nothing(arts, tmp_path, case):
    import shutil

    shutil.copytree(arts["data"].parent, tmp_path / "ds")
    args, named, problem = calib_cases(arts, tmp_path)[case]
    refused(tmp_path, ["calib", *args], named, problem)


# ------------------------------------------------------------------------------------------ data
VEDAI_LINE = "00000001 100 100 0.5 90 110 110 90 90 90 110 110 1 1 0\n"


def data_cases(tmp_path):
    annotations, small = tmp_path / "annotation1024.txt", tmp_path / "annotation512.txt"
    annotations.write_text(VEDAI_LINE)
    small.write_text(VEDAI_LINE)
    empty, ids = tmp_path / "empty.txt", tmp_path / "fold01.txt"
    empty.write_text("")
    ids.write_text("00000001\ncar\n")
    labels = tmp_path / "labels"
    return {
        "image-size-disagrees-with-the-file": (["convert-vedai", small, labels], "--image-size",
                                               "1024, but annotation512.txt holds coordinates of 512 px images: "
                                               "pass --image-size 512"),
        "empty-annotation-file": (["convert-vedai", empty, labels], empty, "no annotation line: nothing to convert"),
        "labels-dir-is-a-file": (["convert-vedai", annotations, annotations], "LABELS_DIR",
                                 f"{annotations} is a file, not a folder"),
        "ids-is-a-folder": (["convert-vedai", annotations, labels, "--ids", tmp_path], "--ids", "is a folder, not a"),
        "images-is-a-file": (["convert-vedai", annotations, labels, "--images", ids], "--images", "is a file, not a"),
        "id-list-with-a-word": (["convert-vedai", annotations, labels, "--ids", ids], ids,
                                "image id 'car' is not a number of at most 8 digits"),
        "synth-root-empty": (["synth", "--root", ""], "--root", "an empty path is not a folder"),
    }


@pytest.mark.parametrize("case", ["image-size-disagrees-with-the-file", "empty-annotation-file", "labels-dir-is-a-file",
                                  "ids-is-a-folder", "images-is-a-file", "id-list-with-a-word", "synth-root-empty"])
def test_data_commands_refuse_in_one_line(tmp_path, case):
    args, named, problem = data_cases(tmp_path)[case]
    refused(tmp_path, ["data", *args], named, problem)


# ------------------------------------------------------------------------------------------ dataset YAML, labels
def _yaml_edit(replace: str, by: str):
    return lambda text: text.replace(replace, by)


DATASET_YAML_CASES = {  # edit of the synthetic set's data.yaml -> problem
    "nc-0": (_yaml_edit("nc: 5", "nc: 0"), "key 'nc': expected a positive integer, got 0"),
    "nc-text": (_yaml_edit("nc: 5", "nc: '5'"), "key 'nc': expected a positive integer, got '5'"),
    "names-count": (_yaml_edit("names: [car, car_running, truck, van, boat]", "names: [car]"),
                    "key 'names': 1 names but nc is 5"),
    "names-twice": (_yaml_edit("truck, van", "truck, truck"), "key 'names': class names must be unique"),
    "modality-unknown": (_yaml_edit("modalities: [rgb, ir]", "modalities: [rgb, depth]"),
                         "key 'modalities': unknown modality 'depth' (expected rgb, ir)"),
    "modalities-empty": (_yaml_edit("modalities: [rgb, ir]", "modalities: []"),
                         "key 'modalities': expected a non-empty list such as [rgb, ir], got []"),
    "split-list-missing": (_yaml_edit("train: train.txt", "train: nowhere.txt"), "key 'train': "),
    "root-missing": (_yaml_edit("path: .", "path: nowhere"), "key 'path': dataset root"),
    "ir-only-class-unknown": (_yaml_edit("ir_only_classes: [car_running]", "ir_only_classes: [plane]"),
                              "key 'ir_only_classes': 'plane' is not one of the class names"),
    "a-list": (lambda text: "- car\n- truck\n", "a dataset yaml must be a mapping of keys"),
}


@pytest.mark.parametrize("case", sorted(DATASET_YAML_CASES))
def test_dataset_yaml_that_is_not_what_it_claims(arts, tmp_path, case):
    import shutil

    edit, problem = DATASET_YAML_CASES[case]
    folder = tmp_path / "ds"
    shutil.copytree(arts["data"].parent, folder)
    data = folder / "data.yaml"
    data.write_text(edit(data.read_text()))
    line = refused(tmp_path, ["calib", "make", "--data", data, "--out-dir", tmp_path / "calib", "--n", "1"], data,
                   problem)
    if case == "split-list-missing":  # one place tried, named once (was: "X or X does not exist")
        assert line.endswith(f"{folder.absolute() / 'nowhere.txt'} does not exist"), line


LABEL_CASES = {
    "class-negative": ("-1 0.5 0.5 0.1 0.1\n", "line 1: class -1 < 0"),
    "class-fraction": ("1.5 0.5 0.5 0.1 0.1\n", "line 1: class 1.5 is not an integer"),
    "not-a-number": ("car 0.5 0.5 0.1 0.1\n", "line 1: 'car' is not a number"),
    "coordinate-inf": ("0 inf 0.5 0.1 0.1\n", "line 1: cx is inf (not finite)"),
    "width-zero": ("0 0.5 0.5 0 0.1\n", "line 1: w 0 <= 0"),
    "height-above-1": ("0 0.5 0.5 0.1 1.5\n", "line 1: h 1.5 outside [0, 1]"),
    "comma-separated": ("0,0.5,0.5,0.1,0.1\n", "line 1: expected 5 columns (cls cx cy w h), got 1"),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_train_strict_refuses_a_bad_label_row(arts, tmp_path, case):
    import shutil

    text, problem = LABEL_CASES[case]
    folder = tmp_path / "ds"
    shutil.copytree(arts["data"].parent, folder)
    label = folder / "labels" / "00000001.txt"
    label.write_text(text)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    args = ["train", "--recipe", recipe, "--stage", "teacher", "--data", folder / "data.yaml", "--strict", "--out",
            tmp_path / "run", "--no-progress"]
    refused(tmp_path, args, label.absolute(), problem)
