"""Residual-branch output quantizers (`output_bits`): the plan, the model, and the integer CPU form they allow."""
import importlib.util
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ghost_deploy.bitplan import FLOAT_BITS, BitPlan, size_mb
from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.cli import main
from ghost_deploy.engines import build
from ghost_deploy.errors import UserError
from ghost_deploy.export import export_onnx
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.model import build_model
from ghost_deploy.quant import act_quantizers, quantize_model, uniform_plan
from ghost_deploy.quant.plans import residual_branch_ends, with_residual_outputs
from ghost_deploy.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 64


@pytest.fixture(scope="module")
def model():
    return build_model("ghost-p", nc=3, input_mode="rgb+ir").eval()


def test_only_the_last_conv_of_each_residual_branch_gets_an_output_quantizer(model):
    ends = residual_branch_ends(model)
    # the backbone C3s add (shortcut), the neck C3s do not (YOLOv5's shapes)
    assert ends and all(name.endswith(".cv2.conv") and ".m." in name for name in ends)
    assert not any(name.startswith(("model.13.", "model.17.", "model.20.", "model.23.")) for name in ends)
    plan = with_residual_outputs(uniform_plan(model, 6, 8, image_size=IMG), model)
    assert {name for name, layer in plan.layers.items() if layer.output_bits != FLOAT_BITS} == set(ends)
    assert all(plan.layers[name].output_bits == 8 for name in ends)
    # a float block input (act_bits 32) leaves the branch float: the add's other operand has no grid
    float_inputs = uniform_plan(model, 6, None, image_size=IMG)
    assert all(layer.output_bits == FLOAT_BITS for layer in with_residual_outputs(float_inputs, model).layers.values())


def test_output_bits_round_trip_and_stay_out_of_plans_without_them(model, tmp_path):
    plain = uniform_plan(model, 6, 8, image_size=IMG)
    assert not any("output_bits" in layer for layer in plain.to_dict()["layers"].values())
    plan = with_residual_outputs(plain, model)
    plan.save(tmp_path / "plan.json")
    assert BitPlan.load(tmp_path / "plan.json").layers == plan.layers
    # one float32 scale more per output quantizer in the deployable size
    assert size_mb(plan) - size_mb(plain) == pytest.approx(4 * len(residual_branch_ends(model)) / 1e6)
    data = json.loads((tmp_path / "plan.json").read_text())
    name = next(iter(residual_branch_ends(model)))
    data["layers"][name]["output_bits"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="output_bits 9 is not allowed"):
        BitPlan.load(tmp_path / "bad.json")


def test_quantized_model_puts_the_branch_output_on_its_grid(model):
    plan = with_residual_outputs(uniform_plan(model, 8, 8, image_size=IMG), model)
    student = quantize_model(build_model("ghost-p", nc=3, input_mode="rgb+ir").eval(), plan)
    name = next(iter(residual_branch_ends(model)))
    block = student.get_submodule(name.rpartition(".")[0])
    quantizer = act_quantizers(student)[name.rpartition(".")[0].replace(".", "_")]
    assert block.__dict__["output_quantizer"] is quantizer
    seen = []
    block.register_forward_hook(lambda module, args, output: seen.append(output))
    student(torch.rand(1, 3, IMG, IMG), torch.rand(1, 1, IMG, IMG))
    codes = seen[0] / quantizer.scale.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= quantizer.qmax


def test_cpu_form_runs_residual_branches_and_adds_in_integers(tmp_path):
    # Parity images: the embedded set's (the default). On noise images this random ghost-p drifts past the
    # OpenVINO engine budget with or without residual outputs (integer requantization, as ORT's kernels do).
    results = {}
    for residual in (False, True):
        sample, plan = build_sample_model("ghost-p", 3, img_size=IMG, weight_bits=(3, 8), seed=4,
                                          residual_outputs=residual)
        checkpoint = save_sample_checkpoint(tmp_path / f"r{int(residual)}.safetensors", model_name="ghost-p", nc=3,
                                            img_size=IMG, model=sample, plan=plan, parity={"images": 2})
        # the checkpoint rebuilds the output quantizers from its plan, scales and all
        loaded, header = model_from_checkpoint(checkpoint, with_sr=False)
        assert set(act_quantizers(loaded)) == set(act_quantizers(sample))
        result = export_onnx(checkpoint, tmp_path / f"r{int(residual)}.cpu.onnx", target="cpu", progress=False)
        assert result.passed, result.parity.failures
        assert result.report["parity"]["exact_arithmetic"]["bit_identical"]
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"r{int(residual)}.ort.onnx")
        ort.InferenceSession(str(result.onnx_path), options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
        results[residual] = (result.report["cpu_form"], ops)
    if importlib.util.find_spec("openvino") is not None:
        # the pairing handed out (residual CPU form on OpenVINO) proven on that compiler: built, parity-checked
        built = build(tmp_path / "r1.cpu.onnx", "openvino-cpu", tmp_path / "engine", require_export=True, progress=False)
        assert built["status"] == "engine" and built["exit_code"] == 0
    ends = residual_branch_ends(build_model("ghost-p", nc=3, input_mode="rgb+ir"))
    plain, residual = results[False][0], results[True][0]
    assert set(ends) <= set(plain["float_convs"])  # without: their adds are float, so are the convs
    assert not set(ends) & set(residual["float_convs"]) and set(ends) <= set(residual["integer_convs"])
    assert all(name.startswith("model.24.") for name in residual["float_convs"])  # only the Detect convs
    assert results[True][1].count("QLinearAdd") == len(ends) and "Add" not in results[True][1]
    assert results[False][1].count("QLinearAdd") == 0


def test_recipe_key_is_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nghost:\n  plan:\n    residual_outputs: yes please\n")
    with pytest.raises(UserError, match="ghost.plan.residual_outputs"):
        load_recipe(str(recipe))
    recipe.write_text("name: r\nghost:\n  plan:\n    residual_outputs: true\n")
    assert load_recipe(str(recipe))["ghost"]["plan"]["residual_outputs"] is True


def test_plan_and_sample_commands_take_the_option(tmp_path):
    runner = CliRunner()
    checkpoint = tmp_path / "s.safetensors"
    result = runner.invoke(main, ["sample", "ghost-p", "--img-size", "64", "--bits", "6", "--residual-outputs",
                                  "--out", str(checkpoint)])
    assert result.exit_code == 0, result.output
    header_plan = model_from_checkpoint(checkpoint, with_sr=False)[1].bit_plan
    assert sum(layer.output_bits == 8 for layer in header_plan.layers.values()) == 7
    result = runner.invoke(main, ["plan", str(checkpoint), "--residual-outputs", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "(output 8-bit)" in result.output
    layers = json.loads((tmp_path / "p.json").read_text())["layers"]
    assert sum(entry.get("output_bits") == 8 for entry in layers.values()) == 7
