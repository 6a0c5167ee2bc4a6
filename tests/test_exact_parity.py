"""Exact-arithmetic parity: integer accumulation on both sides makes a correct export bit-identical."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from ghost_deploy.parity.compare import Budgets
from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.export.reference import check_exact_parity
from ghost_deploy.export import export_onnx
from ghost_deploy.cli.export import export_command
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.parity.parityset import load_parity_set
from ghost_deploy.checkpoint import model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 64


@pytest.fixture(scope="module")
def rounding(tmp_path_factory, write_image_pairs):
    """A sample model off the power-of-two grid: float32 sums now round differently in PyTorch and ORT."""
    root = tmp_path_factory.mktemp("exact")
    images = write_image_pairs(root / "images", count=2, seed=11)
    model, plan = build_sample_model(img_size=IMG, weight_bits=(3, 8), seed=8, exact_grid=False)
    # a zero max-abs-error budget: only bit-identical outputs pass it
    checkpoint = save_sample_checkpoint(root / "rounding.safetensors", img_size=IMG, model=model, plan=plan,
                                        parity={"images": 2, "max_abs_error_in_output_scale": 0.0})
    return {"root": root, "images": images, "checkpoint": checkpoint}


def test_float32_rounding_fails_a_zero_budget_that_exact_arithmetic_meets(rounding):
    root = rounding["root"]
    with pytest.raises(ParityError) as caught:
        export_onnx(rounding["checkpoint"], root / "float32.onnx", parity_images=rounding["images"],
                    parity_arithmetic="float32", progress=False)
    report = caught.value.report["parity"]
    assert any("max abs error" in failure for failure in report["report"]["failures"])
    exact = report["exact_arithmetic"]
    assert exact["bit_identical"] is True and exact["passed"] is True and exact["exact_convs"] == 62
    assert report["arithmetic"] == "float32"
    assert "exact arithmetic: bit-identical outputs" in str(caught.value)

    result = export_onnx(rounding["checkpoint"], root / "exact.onnx", parity_images=rounding["images"],
                         parity_arithmetic="exact", progress=False)
    assert result.passed and result.exact.bit_identical and not result.parity.passed
    saved = load_parity_set(result.parity_set_path)  # engines are held to the exact reference
    assert saved.meta.arithmetic == "exact" and "exactly" in saved.meta.reference
    for name, value in result.exact.reference_outputs.items():
        np.testing.assert_array_equal(saved.outputs[name], value)


def test_a_parity_section_given_to_export_replaces_the_checkpoints(rounding):
    """The pipeline passes its run's recipe section: budgets and arithmetic come from it, not the checkpoint."""
    root = rounding["root"]
    loose = {"images": 1, "min_cosine": 0.99, "max_abs_error_in_output_scale": None, "arithmetic": "float32"}
    result = export_onnx(rounding["checkpoint"], root / "loose.onnx", parity_images=rounding["images"],
                         parity_config=loose, progress=False)
    assert result.passed and result.parity.budgets["min_cosine"] == 0.99 and result.report["parity"]["arithmetic"] == "float32"
    assert result.report["parity"]["source"].startswith("1 images from")
    exact = export_onnx(rounding["checkpoint"], root / "exact-config.onnx", parity_images=rounding["images"],
                        parity_config={**loose, "min_cosine": 0.9999, "max_abs_error_in_output_scale": 0.0,
                                       "arithmetic": "exact"}, progress=False)
    assert exact.passed and exact.report["parity"]["arithmetic"] == "exact" and exact.exact.bit_identical


def test_exact_arithmetic_sees_a_wrong_scale(rounding):
    root = rounding["root"]
    result = export_onnx(rounding["checkpoint"], root / "ok.onnx", parity_images=rounding["images"],
                         parity_arithmetic="exact", progress=False)
    graph = onnx.load(str(result.onnx_path))
    target = "model.6.m.0.cv1.conv"
    node = next(n for n in graph.graph.node if n.name == f"{target}.weight_dq")
    scale = next(i for i in graph.graph.initializer if i.name == node.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.01), scale.name))
    model, meta = model_from_checkpoint(rounding["checkpoint"], with_sr=False)
    checked = check_exact_parity(model, meta, graph, load_parity_set(result.parity_set_path), Budgets(), IMG, False)
    assert not checked.bit_identical and not checked.passed
    assert "OVER BUDGET" in checked.summary()


@pytest.mark.parametrize("options", [{"target": "cpu"}, {"int4_weights": True}])
def test_other_forms_are_checked_exactly_too(rounding, options):
    root = rounding["root"]
    name = "form-" + "-".join(f"{k}" for k in options) + ".onnx"
    result = export_onnx(rounding["checkpoint"], root / name, parity_images=rounding["images"],
                         parity_arithmetic="exact", progress=False, **options)
    assert result.passed and result.exact.bit_identical
    assert result.exact.cpu_form_identical is (True if options.get("target") == "cpu" else None)


def test_a_conv_records_its_largest_sum_and_can_fall_back_to_float_sums():
    """sum(|x code| * |w code|) >= 2^23 would leave float32's exact integers: measured, then that conv runs float."""
    import torch
    from torch import nn

    from ghost_deploy.parity.exact import EXACT_SUM_LIMIT, ExactConv
    from ghost_deploy.export.reference import ExactConvModule
    from ghost_deploy.quant.quantizers import QuantConv2d

    conv = QuantConv2d(nn.Conv2d(600, 2, 3, padding=1, bias=False), weight_bits=8, act_bits=8)
    conv.quantizes_input = False  # the input arrives quantized, as behind a block's pre-hook
    codes = np.full((2, 600, 3, 3), 127, np.float32)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(codes * 0.01))
    module = ExactConvModule(conv, ExactConv(codes, np.full(2, 0.5 * 0.01, np.float32), np.zeros(2, np.float32)),
                             np.float32(0.5))
    x = torch.full((1, 600, 4, 4), 127 * 0.5)
    exact = module(x)
    # the centre pixels see all 9 taps; beyond 2^24 the measured magnitude itself is a float32 sum (rounded)
    assert module.largest_sum == pytest.approx(600 * 9 * 127 * 127, rel=1e-3)
    assert module.largest_sum >= EXACT_SUM_LIMIT
    assert float(exact[0, 0, 1, 1]) == np.float32(600 * 9 * 127 * 127) * np.float32(0.005)
    module.exact = False
    torch.testing.assert_close(module(x), conv(x))


def test_float32_code_sums_are_exact_and_the_cheap_bound_skips_the_magnitude_conv():
    """Below the limit the float32 sums equal float64's; a small layer never computes the magnitude conv."""
    import torch
    from torch import nn

    from ghost_deploy.export.reference import ExactConvModule
    from ghost_deploy.parity.exact import ExactConv
    from ghost_deploy.quant.quantizers import QuantConv2d

    generator = np.random.default_rng(3)
    codes = generator.integers(-7, 8, (4, 16, 3, 3)).astype(np.float32)
    conv = QuantConv2d(nn.Conv2d(16, 4, 3, padding=1, bias=False), weight_bits=4, act_bits=8)
    conv.quantizes_input = False
    module = ExactConvModule(conv, ExactConv(codes, np.full(4, 0.25, np.float32), np.zeros(4, np.float32)),
                             np.float32(0.5))
    x_codes = torch.from_numpy(generator.integers(0, 256, (1, 16, 9, 9)).astype(np.float32))
    calls = []
    original = module._conv
    module._conv = lambda x, w: calls.append(x.dtype) or original(x, w)
    out = module(x_codes * 0.5)
    expected = torch.nn.functional.conv2d(x_codes.double(), torch.from_numpy(codes).double(), padding=1)
    assert torch.equal(out, expected.float() * 0.25)
    assert calls == [torch.float32]  # bound 255 * max sum|w| < 2^23: one float32 conv, no magnitude, no float64
    assert module.largest_sum == float(x_codes.max()) * float(np.abs(codes).reshape(4, -1).sum(1).max())


def test_bad_arithmetic_is_a_one_line_error(rounding, tmp_path):
    from ghost_deploy.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("parity:\n  arithmetic: fixed-point\n")
    with pytest.raises(UserError, match="parity.arithmetic: must be one of float32, exact") as info:
        load_recipe(recipe)
    assert info.value.path == str(recipe)
    outcome = CliRunner().invoke(export_command, ["--onnx", str(rounding["checkpoint"]), "--parity-arithmetic", "int"])
    assert outcome.exit_code == 2 and "--parity-arithmetic" in outcome.output


def test_exact_arithmetic_decides_by_default_and_the_parity_count_is_an_option(rounding):
    """Issue 14: the package default is exact arithmetic (the float32 comparison still runs and is reported);
    --parity-count sets how many images the parity set holds."""
    root = rounding["root"]
    result = export_onnx(rounding["checkpoint"], root / "default.onnx", parity_images=rounding["images"],
                         parity_count=1, progress=False)
    assert result.passed and result.report["parity"]["arithmetic"] == "exact"
    assert result.report["parity"]["report"] is not None  # the float32 comparison ran too
    assert len(load_parity_set(result.parity_set_path).inputs["rgb"]) == 1
    with pytest.raises(UserError, match="--parity-count"):
        export_onnx(rounding["checkpoint"], root / "zero.onnx", parity_count=0, progress=False)
