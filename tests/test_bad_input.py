"""Bad input through the real CLI: one line naming the file, exit code 2, no traceback, nothing half-written.

Every row of docs/bad-input.md is one test (or one parametrized case) here. Most cases run in-process with
click's CliRunner on `ghost_deploy.cli.main` (fast); the cases whose stderr format matters end to end (a
skipped sample's warning, --debug) run `python -m ghost_deploy` in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ghost_deploy
from ghost_deploy.errors import UserError
from ghost_deploy.checkpoint import save_checkpoint
from ghost_deploy.cli import main
from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml
from ghost_deploy.errors import DEBUG
from ghost_deploy.recipe import load_recipe
from ghost_deploy.train.loop import checkpoint_meta

RECIPE = """
name: tiny
model: ghost-p
input_mode: rgb+ir
img_size: 64
seed: 0
teacher: {epochs: 1, batch_size: 4, nominal_batch: 4, warmup_epochs: 0}
ghost: {epochs: 1, batch_size: 4, nominal_batch: 4, calib_batches: 1}
"""
SAMPLE = "00000001"  # a train id of the synthetic set; every corrupted dataset breaks this one sample


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny RGB+IR set, an FP32 teacher, an 8-bit GHOST checkpoint, its export, and broken copies of each."""
    root = tmp_path_factory.mktemp("bad_input")
    data = ensure_synthetic_dataset(root=root / "synth", n_train=8, n_val=4, n_test=4, img_size=64)
    recipe_path = root / "tiny.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path)
    spec = load_dataset_yaml(data)
    torch.manual_seed(0)
    teacher = ghost_deploy.build_model("ghost-p", nc=spec.nc).eval()
    save_checkpoint(root / "teacher.safetensors", teacher, checkpoint_meta(recipe, spec, "teacher", str(data), teacher))

    from ghost_deploy.quant import calibrate_activations, quantize_model, uniform_plan

    student = ghost_deploy.build_model("ghost-p", nc=spec.nc)
    student.load_state_dict(teacher.state_dict())
    plan = uniform_plan(student, 8, 8, image_size=64)
    student = quantize_model(student, plan)
    calibrate_activations(student, [(torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64))])
    save_checkpoint(root / "ghost.safetensors", student.eval(),
                    checkpoint_meta(recipe, spec, "ghost", str(data), student, bit_plan=plan))

    from ghost_deploy.export import export_onnx

    exported = export_onnx(root / "ghost.safetensors", root / "export" / "ghost.onnx", simplify=False, progress=False)
    assert exported.passed and exported.parity_set_path is not None
    plan.save(root / "plan.json")
    return {"root": root, "data": data, "recipe": recipe_path, "teacher": root / "teacher.safetensors",
            "ghost": root / "ghost.safetensors", "onnx": exported.onnx_path, "parity": exported.parity_set_path,
            "plan": root / "plan.json", "layers": list(plan.layers)}


def broken_dataset(fx, name: str, damage) -> Path:
    """A copy of the tiny set with `damage(folder)` applied; returns its data.yaml."""
    folder = fx["root"] / "datasets" / name
    if not folder.exists():
        shutil.copytree(fx["data"].parent, folder)
        damage(folder)
    return folder / "data.yaml"


def _truncate_png(folder: Path) -> None:
    image = folder / "images" / f"{SAMPLE}_co.png"
    image.write_bytes(image.read_bytes()[:300])


def _shrink_ir(folder: Path) -> None:
    image = folder / "images" / f"{SAMPLE}_ir.png"
    Image.open(image).resize((32, 32)).save(image)


def _drop_ir(folder: Path) -> None:
    (folder / "images" / f"{SAMPLE}_ir.png").unlink()


def _label(text: str):
    return lambda folder: (folder / "labels" / f"{SAMPLE}.txt").write_text(text)


def _drop_yaml_key(key: str):
    def damage(folder: Path) -> None:
        yaml_path = folder / "data.yaml"
        yaml_path.write_text("".join(line + "\n" for line in yaml_path.read_text().splitlines()
                                     if not line.startswith(f"{key}:")))
    return damage


def broken_checkpoint(fx, kind: str) -> Path:
    """The teacher checkpoint with one thing wrong (`kind`); a path that does not exist for 'absent'."""
    path = fx["root"] / "checkpoints" / f"{kind}.safetensors"
    if path.exists() or kind == "absent":
        return path
    path.parent.mkdir(exist_ok=True)
    source = fx["teacher"]
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    first = sorted(tensors)[0]
    floating = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    if kind == "missing-tensor":
        save_file({k: v for k, v in tensors.items() if k != first}, str(path), metadata=metadata)
    elif kind == "extra-tensor":
        save_file({**tensors, "model.bogus.weight": torch.zeros(3)}, str(path), metadata=metadata)
    elif kind == "nan":
        poisoned = tensors[floating].clone()
        poisoned.view(-1)[0] = float("nan")
        save_file({**tensors, floating: poisoned}, str(path), metadata=metadata)
    elif kind == "wrong-shape":
        save_file({**tensors, floating: torch.zeros(2, 2)}, str(path), metadata=metadata)
    elif kind == "foreign":
        save_file(tensors, str(path))  # plain safetensors, no ghost-deploy header
    elif kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(kind)
    return path


def broken_plan(fx, kind: str) -> Path:
    path = fx["root"] / "plans" / f"{kind}.json"
    if path.exists() or kind == "absent":
        return path
    path.parent.mkdir(exist_ok=True)
    plan = json.loads(fx["plan"].read_text())
    second = fx["layers"][1]
    if kind == "unknown-layer":
        plan["layers"]["model.99.conv"] = dict(plan["layers"][second])
    elif kind == "bits-9":
        plan["layers"][second]["weight_bits"] = 9
    elif kind == "bits-1":
        plan["layers"][second]["weight_bits"] = 1
    elif kind == "missing-layer":
        del plan["layers"][second]
    elif kind == "not-json":
        path.write_text("{ not json")
        return path
    path.write_text(json.dumps(plan))
    return path


def broken_onnx(fx, kind: str) -> Path:
    """An ONNX in its own folder with the export's parity set beside it (so only the ONNX is wrong)."""
    folder = fx["root"] / "onnx" / kind
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True)
    if kind == "foreign":
        x = helper.make_tensor_value_info("rgb", TensorProto.FLOAT, [1, 3, 64, 64])
        y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 64, 64])
        graph = helper.make_graph([helper.make_node("Relu", ["rgb"], ["out"])], "not_ours", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    elif kind == "edited":
        model = onnx.load(str(fx["onnx"]))
        index = next(i for i, init in enumerate(model.graph.initializer) if init.data_type == TensorProto.FLOAT)
        values = numpy_helper.to_array(model.graph.initializer[index]).copy()
        values.flat[0] += 1.0
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, model.graph.initializer[index].name))
        onnx.save(model, str(path))
    elif kind == "corrupt":
        path.write_bytes(fx["onnx"].read_bytes()[:1000])
    elif kind == "no-parity-set":
        shutil.copyfile(fx["onnx"], path)
        return path
    else:
        raise ValueError(kind)
    shutil.copyfile(fx["parity"], folder / "model.parity.npz")
    return path


# ------------------------------------------------------------------------------------------ helpers
def cli(*args):
    """Run the real CLI in-process; restores the global state its --debug flag and warning hook touch."""
    saved = warnings.showwarning
    try:
        return CliRunner().invoke(main, [str(arg) for arg in args])
    finally:
        warnings.showwarning = saved
        DEBUG["on"] = False


def assert_user_error(result, path, *fragments) -> str:
    """Exit 2 from a UserError (not a crash), and stderr is exactly one line naming `path` and the problem."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def assert_no_files(folder: Path) -> None:
    """Nothing written under `folder` (an empty folder is allowed), temp files included."""
    written = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    assert not written, written


def assert_only(folder: Path, *names: str) -> None:
    """`folder` holds exactly `names` (the inputs the test put there): no output, no hidden temp file."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def run_subprocess(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ghost_deploy", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_args(fx, out: Path, *extra):
    return ["train", "--recipe", fx["recipe"], "--out", out, "--no-progress", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------ train: data
BAD_SAMPLES = {
    "truncated-png": (_truncate_png, f"images/{SAMPLE}_co.png", "corrupt or unreadable image"),
    "ir-size-differs": (_shrink_ir, f"images/{SAMPLE}_ir.png", "size 32x32 differs from its RGB partner"),
    "ir-partner-missing": (_drop_ir, f"images/{SAMPLE}_ir.png", "missing IR partner of"),
    "label-4-columns": (_label("0 0.5 0.5 0.1\n"), f"labels/{SAMPLE}.txt", "line 1: expected 5 columns"),
    "label-nan": (_label("0 nan 0.5 0.1 0.1\n"), f"labels/{SAMPLE}.txt", "line 1: cx is nan (not finite)"),
    "label-negative": (_label("0 -0.5 0.5 0.1 0.1\n"), f"labels/{SAMPLE}.txt", "line 1: cx -0.5 outside [0, 1]"),
    "label-out-of-range": (_label("0 0.5 1.5 0.1 0.1\n"), f"labels/{SAMPLE}.txt", "line 1: cy 1.5 outside [0, 1]"),
    "label-class-ge-nc": (_label("5 0.5 0.5 0.1 0.1\n"), f"labels/{SAMPLE}.txt", "line 1: class 5 >= nc 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_train_strict_bad_sample(fx, tmp_path, case):
    damage, relative, problem = BAD_SAMPLES[case]
    data = broken_dataset(fx, case, damage)
    out = tmp_path / "run"
    result = cli(*train_args(fx, out, "--stage", "teacher", "--data", data, "--strict"))
    assert_user_error(result, data.parent / relative, problem)
    assert not out.exists()


def test_train_skips_bad_sample_with_warning(fx, tmp_path):
    """Without --strict a corrupt image is skipped: one warning line with the count, and training completes."""
    data = broken_dataset(fx, "truncated-png", _truncate_png)
    out = tmp_path / "run"
    done = run_subprocess(*train_args(fx, out, "--stage", "teacher", "--data", data))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    warning_lines = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning_lines) == 1, done.stderr
    assert "[train]: skipped 1 bad sample(s)" in warning_lines[0]
    assert f"{SAMPLE}_co.png: corrupt or unreadable image" in warning_lines[0]
    assert (out / "teacher" / "weights" / "best.safetensors").is_file()


def test_train_empty_label_file_is_valid(fx, tmp_path):
    """An empty label file means an image without objects: not an error, even with --strict."""
    data = broken_dataset(fx, "label-empty", _label(""))
    out = tmp_path / "run"
    result = cli(*train_args(fx, out, "--stage", "teacher", "--data", data, "--strict"))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert (out / "teacher" / "weights" / "best.safetensors").is_file()


@pytest.mark.parametrize("key", ["val", "nc"])
def test_train_dataset_yaml_missing_key(fx, tmp_path, key):
    data = broken_dataset(fx, f"no-{key}", _drop_yaml_key(key))
    out = tmp_path / "run"
    assert_user_error(cli(*train_args(fx, out, "--stage", "teacher", "--data", data)), data, f"missing key '{key}'")
    assert not out.exists()


def test_train_dataset_yaml_not_found(fx, tmp_path):
    data = tmp_path / "nowhere" / "data.yaml"
    out = tmp_path / "run"
    assert_user_error(cli(*train_args(fx, out, "--stage", "teacher", "--data", data)), data, "dataset yaml not found")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ train: recipe
def test_train_unknown_recipe(tmp_path):
    out = tmp_path / "run"
    assert_user_error(cli("train", "--recipe", "no-such-recipe", "--out", out), "no-such-recipe",
                      "no such recipe file or name (known: demo")
    assert not out.exists()


def test_train_recipe_unknown_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\nteacher: {epoch: 3}\n")
    out = tmp_path / "run"
    assert_user_error(cli("train", "--recipe", recipe, "--out", out), recipe, "unknown recipe key teacher.epoch")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ train: teacher, plan
BAD_CHECKPOINTS = {
    "absent": "no such checkpoint",
    "missing-tensor": "checkpoint does not match the model: missing 1 tensors",
    "extra-tensor": "checkpoint does not match the model: 1 unexpected tensors (e.g. bogus.weight)",
    "nan": "has non-finite values (NaN or inf)",
    "wrong-shape": "has shape (2, 2), model expects",
    "foreign": "safetensors file has no ghost-deploy metadata (not one of our checkpoints)",
    "truncated": "not a readable safetensors checkpoint",
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_train_bad_teacher_checkpoint(fx, tmp_path, kind):
    checkpoint = broken_checkpoint(fx, kind)
    out = tmp_path / "run"
    result = cli(*train_args(fx, out, "--stage", "ghost", "--teacher", checkpoint, "--data", fx["data"]))
    assert_user_error(result, checkpoint, BAD_CHECKPOINTS[kind])
    assert_no_files(out)


BAD_PLANS = {
    "absent": "bit plan not found",
    "unknown-layer": "unknown layer 'model.99.conv': not a conv of this model",
    "bits-9": "weight_bits 9 is not allowed (use 2..8, or 32/null for float)",
    "bits-1": "weight_bits 1 is not allowed (use 2..8, or 32/null for float)",
    "missing-layer": "is missing from the plan",
    "not-json": "not valid JSON",
}


@pytest.mark.parametrize("kind", sorted(BAD_PLANS))
def test_train_bad_bit_plan(fx, tmp_path, kind):
    plan = broken_plan(fx, kind)
    out = tmp_path / "run"
    result = cli(*train_args(fx, out, "--stage", "ghost", "--teacher", fx["teacher"], "--bit-plan", plan,
                             "--data", fx["data"]))
    assert_user_error(result, plan, BAD_PLANS[kind])
    assert_no_files(out)  # the plan is checked before bit_plan.json, calibration or any epoch


# ------------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("kind", ["absent", "nan", "foreign", "extra-tensor"])
def test_plan_bad_checkpoint(fx, tmp_path, kind):
    checkpoint = broken_checkpoint(fx, kind)
    out = tmp_path / "plan.json"
    assert_user_error(cli("plan", checkpoint, "--out", out), checkpoint, BAD_CHECKPOINTS[kind])
    assert_only(tmp_path)


# ------------------------------------------------------------------------------------------ export
EXPORT_CASES = {**{kind: BAD_CHECKPOINTS[kind] for kind in ("absent", "missing-tensor", "nan", "foreign", "truncated")},
                "fp32-without---fp32": "checkpoint has no bit plan (an FP32 model): export it with --fp32 (fp32=True from Python)"}


@pytest.mark.parametrize("kind", sorted(EXPORT_CASES))
def test_export_bad_checkpoint(fx, tmp_path, kind):
    source = fx["teacher"] if kind == "fp32-without---fp32" else broken_checkpoint(fx, kind)
    checkpoint = tmp_path / "model.safetensors"
    if source.exists():
        shutil.copyfile(source, checkpoint)
    assert_user_error(cli("export", "--onnx", checkpoint, "--no-progress"), checkpoint, EXPORT_CASES[kind])
    assert_only(tmp_path, *(["model.safetensors"] if source.exists() else []))  # no ONNX, report, parity set or temp


def test_export_bad_parity_dataset(fx, tmp_path):
    """The dataset is read after the graph is built: the ONNX being checked must not survive the error."""
    data = broken_dataset(fx, "no-val", _drop_yaml_key("val"))
    checkpoint = tmp_path / "ghost.safetensors"
    shutil.copyfile(fx["ghost"], checkpoint)
    result = cli("export", "--onnx", checkpoint, "--data", data, "--no-progress", "--no-simplify")
    assert_user_error(result, data, "missing key 'val'")
    assert_only(tmp_path, "ghost.safetensors")


# ------------------------------------------------------------------------------------------ build-engine
BAD_ONNX = {
    "foreign": "not a ghost-deploy export (no ghost.format metadata)",
    "edited": "graph or ghost.* metadata changed after export (hash mismatch)",
    "corrupt": "cannot read ONNX",
}


@pytest.mark.parametrize("kind", sorted(BAD_ONNX))
def test_build_engine_bad_onnx(fx, tmp_path, kind):
    onnx_path = broken_onnx(fx, kind)
    out = tmp_path / "engine"
    assert_user_error(cli("build-engine", "--onnx", onnx_path, "--out", out), onnx_path, BAD_ONNX[kind])
    assert not out.exists()


def test_build_engine_onnx_not_found(tmp_path):
    onnx_path = tmp_path / "missing.onnx"
    out = tmp_path / "engine"
    assert_user_error(cli("build-engine", "--onnx", onnx_path, "--out", out), onnx_path, "ONNX file not found")
    assert not out.exists()


def test_build_engine_missing_parity_set(fx, tmp_path):
    onnx_path = broken_onnx(fx, "no-parity-set")
    out = tmp_path / "engine"
    result = cli("build-engine", "--onnx", onnx_path, "--out", out)
    assert_user_error(result, onnx_path.with_name("model.parity.npz"), "parity set not found")
    assert not out.exists()


def test_build_engine_unknown_target(fx, tmp_path):
    out = tmp_path / "engine"
    result = cli("build-engine", "--onnx", fx["onnx"], "--target", "jetson-tx2", "--out", out)
    assert_user_error(result, "--target", "unknown target 'jetson-tx2'; known targets: jetson,")
    assert not out.exists()


def test_build_engine_error_end_to_end(fx, tmp_path):
    """The real process: one line on stderr and no traceback; with --debug the traceback is shown."""
    onnx_path = broken_onnx(fx, "foreign")
    out = tmp_path / "engine"
    done = run_subprocess("build-engine", "--onnx", onnx_path, "--out", out)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {onnx_path}: {BAD_ONNX['foreign']}: build engines from the ONNX "
                                        "`ghost-deploy export` wrote"]
    debug = run_subprocess("--debug", "build-engine", "--onnx", onnx_path, "--out", out)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "UserError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"error: {onnx_path}: not a ghost-deploy export")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ bench
BENCH = ["--iterations", "1", "--warmup-max", "1", "--no-plots", "--no-accuracy", "--no-progress"]


@pytest.mark.parametrize("kind", ["absent", "missing-tensor", "nan", "foreign"])
def test_bench_bad_checkpoint(fx, tmp_path, kind):
    checkpoint = broken_checkpoint(fx, kind)
    out = tmp_path / "bench"
    assert_user_error(cli("bench", "--checkpoint", checkpoint, "--out", out, *BENCH), checkpoint, BAD_CHECKPOINTS[kind])
    assert not out.exists()


BENCH_ONNX = {
    "foreign": "not a ghost-deploy export (no ghost.* metadata), so its classes, strides and anchors are unknown",
    "edited": "graph or ghost.* metadata changed after export (hash mismatch)",
    "corrupt": "cannot read ONNX",
}


@pytest.mark.parametrize("kind", sorted(BENCH_ONNX))
def test_bench_bad_onnx(fx, tmp_path, kind):
    onnx_path = broken_onnx(fx, kind)
    out = tmp_path / "bench"
    assert_user_error(cli("bench", "--onnx", onnx_path, "--out", out, *BENCH), onnx_path, BENCH_ONNX[kind])
    assert not out.exists()


def test_bench_onnx_not_found(tmp_path):
    onnx_path = tmp_path / "missing.onnx"
    out = tmp_path / "bench"
    assert_user_error(cli("bench", "--onnx", onnx_path, "--out", out, *BENCH), onnx_path, "ONNX file not found")
    assert not out.exists()


@pytest.mark.parametrize("content, problem", [
    ("{nope", "not valid JSON"),
    ('{"format": "something-else"}', "not a ghost-deploy bench result"),
], ids=["not-json", "not-a-bench-result"])
def test_bench_compare_bad_json(fx, tmp_path, content, problem):
    """A bad --compare file is refused before the (long) run, so no bench.json is written for nothing."""
    old = tmp_path / "old.json"
    old.write_text(content)
    out = tmp_path / "bench"
    result = cli("bench", "--checkpoint", fx["teacher"], "--compare", old, "--out", out, *BENCH)
    assert_user_error(result, old, problem)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ data convert-vedai
VEDAI_LINE = "00000001 100 100 0.5 90 110 110 90 90 90 110 110 1 1 0\n"
VEDAI_CASES = {
    "short-line": (VEDAI_LINE + VEDAI_LINE.rsplit(" ", 1)[0] + "\n", "line 2: expected 15 fields"),
    "unknown-class": (VEDAI_LINE.replace(" 1 1 0", " 99 1 0"), "line 1: unknown VEDAI class 99"),
    "non-finite": (VEDAI_LINE.replace("100 100", "nan 100"), "line 1: non-finite coordinate"),
    "bad-id": ("car" + VEDAI_LINE[8:], "line 1: image id 'car' is not a number of at most 8 digits"),
}


@pytest.mark.parametrize("case", sorted(VEDAI_CASES))
def test_convert_vedai_malformed(tmp_path, case):
    text, problem = VEDAI_CASES[case]
    annotations = tmp_path / "annotation1024.txt"
    annotations.write_text(text)
    labels = tmp_path / "labels"
    assert_user_error(cli("data", "convert-vedai", annotations, labels), annotations, problem)
    assert not labels.exists()


def test_convert_vedai_missing_file(tmp_path):
    annotations = tmp_path / "annotation1024.txt"
    labels = tmp_path / "labels"
    assert_user_error(cli("data", "convert-vedai", annotations, labels), annotations, "annotation file not found")
    assert not labels.exists()


# ------------------------------------------------------------------------------------------ never destroy (issue 15)
def test_synth_never_replaces_a_folder_it_did_not_make(tmp_path):
    """A user's folder that happens to hold a manifest.json is not ours: refused, nothing deleted."""
    from ghost_deploy.data import ensure_synthetic_dataset

    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"params": {}}')
    (mine / "notes.txt").write_text("precious")
    result = cli("data", "synth", "--root", mine)
    assert_user_error(result, mine, "not a synthetic dataset folder made by ghost-deploy")
    assert (mine / "notes.txt").read_text() == "precious"
    # one it made is found again; once a user adds a file to it, it is no longer replaced either
    made = tmp_path / "made"
    ensure_synthetic_dataset(root=made, n_train=2, n_val=1, n_test=1, img_size=64)
    assert ensure_synthetic_dataset(root=made, n_train=2, n_val=1, n_test=1, img_size=64) == made / "data.yaml"
    (made / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not a synthetic dataset folder"):
        ensure_synthetic_dataset(root=made, n_train=3, n_val=1, n_test=1, img_size=64)
    assert (made / "mine.txt").exists()


def test_export_refuses_to_overwrite_its_own_checkpoint(fx):
    checkpoint = fx["ghost"]
    before = Path(checkpoint).read_bytes()
    assert_user_error(cli("export", "--onnx", checkpoint, "--out", checkpoint), "--out", "would overwrite the checkpoint")
    assert Path(checkpoint).read_bytes() == before


def test_train_refuses_a_folder_holding_a_run(tmp_path):
    from ghost_deploy.train.loop import prepare_run_folder

    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.safetensors").write_bytes(b"x")
    (run / "results.csv").write_text("epoch\n1\n")
    with pytest.raises(UserError, match="holds a run already .*--resume continues it, --force replaces it"):
        prepare_run_folder(run, resume=False, overwrite=False)
    assert (run / "weights" / "best.safetensors").exists()
    with pytest.raises(UserError, match="cannot resume: no train_state"):
        prepare_run_folder(tmp_path / "empty", resume=True, overwrite=False)
    prepare_run_folder(run, resume=False, overwrite=True)  # --force / the pipeline's own stage folder
    assert not (run / "results.csv").exists() and not (run / "weights" / "best.safetensors").exists()
