"""Cases from the held-out bad-input catalogue (issue 15) that failed against 0.4.0: each now one line, exit 2."""
from __future__ import annotations

import pytest
from test_bad_input import assert_user_error  # the one-line, exit-2 contract
from test_bad_input_more import cli

from ghost_deploy.data.synth import ensure_synthetic_dataset
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.quant import uniform_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    teacher = save_sample_checkpoint(root / "teacher.safetensors", model_name="ghost-p", nc=5, img_size=64,
                                     weight_bits=None)
    quantized = save_sample_checkpoint(root / "ghost.safetensors", model_name="ghost-p", nc=5, img_size=64,
                                       weight_bits=6)
    other_classes = save_sample_checkpoint(root / "teacher-nc3.safetensors", model_name="ghost-p", nc=3,
                                           img_size=64, weight_bits=None)
    ghost_n, _ = build_sample_model("ghost-n", 5, img_size=64, weight_bits=None)
    uniform_plan(ghost_n, 6, 8, image_size=64).save(root / "plan-ghost-n.json")
    return {"root": root, "teacher": teacher, "quantized": quantized, "nc3": other_classes,
            "plan_n": root / "plan-ghost-n.json"}


@pytest.mark.parametrize("stage", ["teacher", "ghost"])
def test_a_device_that_is_not_one_is_refused_before_the_run_folder(checkpoints, tmp_path, stage):
    extra = ["--teacher", checkpoints["teacher"]] if stage == "ghost" else []
    result = cli("train", "--stage", stage, *extra, "--device", "tpu", "--epochs", "1", "--out", tmp_path / "run")
    assert_user_error(result, "--device", "'tpu' is not a device")
    assert not (tmp_path / "run").exists()


def test_a_quantized_checkpoint_is_not_a_teacher(checkpoints, tmp_path):
    result = cli("train", "--stage", "ghost", "--teacher", checkpoints["quantized"], "--epochs", "1",
                 "--out", tmp_path / "run")
    assert_user_error(result, checkpoints["quantized"], "is a quantized checkpoint")
    assert not (tmp_path / "run").exists()


def test_a_teacher_of_other_classes_is_refused_before_the_run_folder(checkpoints, tmp_path):
    # the embedded set has 5 classes
    result = cli("train", "--stage", "ghost", "--teacher", checkpoints["nc3"], "--epochs", "1",
                 "--out", tmp_path / "run")
    line = assert_user_error(result, ensure_synthetic_dataset(seed=0), "has 5 classes", "trained on 3")
    assert str(checkpoints["nc3"]) in line
    assert not (tmp_path / "run").exists()


def test_a_bit_plan_of_another_model_is_refused_though_its_layer_names_match(checkpoints, tmp_path):
    result = cli("train", "--stage", "ghost", "--teacher", checkpoints["teacher"], "--bit-plan", checkpoints["plan_n"],
                 "--epochs", "1", "--out", tmp_path / "run")
    assert_user_error(result, checkpoints["plan_n"], "the plan was made for another model (ghost-n)")


@pytest.mark.parametrize("args,where,fragment", [
    (["ghost-p", "--img-size", "50"], "--img-size", "must be a multiple of 16"),
    (["ghost-q", "--img-size", "64"], "MODEL", "unknown model 'ghost-q'"),
])
def test_sample_checks_its_model_and_size_first(tmp_path, args, where, fragment):
    result = cli("sample", *args, "--out", tmp_path / "s.safetensors")
    assert_user_error(result, where, fragment)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_an_empty_recipe_is_refused_not_trained_on_defaults(tmp_path, text):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    result = cli("train", "--stage", "teacher", "--recipe", recipe, "--epochs", "1", "--out", tmp_path / "run")
    assert_user_error(result, recipe, "empty recipe")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,option,fragment", [
    (["--avg-bits", "1"], "--avg-bits", "unreachable"),
    (["--avg-bits", "4", "--size-mb", "0.3"], "--avg-bits", "give one budget, not --avg-bits and --size-mb"),
    (["--avg-bits", "4", "--threshold", "0.2"], "--threshold", "give one or the other"),
])
def test_plan_budget_options_name_themselves(checkpoints, tmp_path, args, option, fragment):
    result = cli("plan", checkpoints["teacher"], "--out", tmp_path / "p.json", *args)
    assert_user_error(result, option, fragment)
    assert not list(tmp_path.iterdir())


def test_int4_weights_with_an_explicit_lower_opset_is_refused(checkpoints, tmp_path):
    result = cli("export", "--onnx", checkpoints["quantized"], "--int4-weights", "--opset", "17", "--no-parity",
                 "--out", tmp_path / "m.onnx")
    assert_user_error(result, "--opset", "INT4 weights need opset 21")
    assert not list(tmp_path.iterdir())


def test_verify_names_what_it_was_given(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not read")
    assert_user_error(cli("build-engine", "--verify", tmp_path / "model.onnx"), "--verify", "is an ONNX, not an engine")
    assert_user_error(cli("build-engine", "--verify", tmp_path / "nope.engine"), "--verify", "no such engine or receipt")
    (tmp_path / "lone.engine").write_bytes(b"x")
    assert_user_error(cli("build-engine", "--verify", tmp_path / "lone.engine"), tmp_path / "lone.receipt.json",
                      "no receipt beside the engine lone.engine")


def test_fp16_on_the_cpu_is_refused_before_any_folder(tmp_path):
    result = cli("train", "--stage", "teacher", "--amp", "fp16", "--device", "cpu", "--epochs", "1",
                 "--out", tmp_path / "run")
    assert_user_error(result, "--amp", "fp16 autocast needs a CUDA device")
    assert not (tmp_path / "run").exists()
