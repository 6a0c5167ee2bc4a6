"""The parity gate: a corrupted scale in the ONNX is caught and localised; inputs; CLI exit codes."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.export import api, export_onnx
from ghost_deploy.cli.export import export_command
from ghost_deploy.export.sample import save_sample_checkpoint
from ghost_deploy.parity.inputs import budgets_from_recipe, images_from_folder
from ghost_deploy.export.localise import localise
from ghost_deploy.checkpoint import model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 64


VEDAI_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vedai-real" / "VEDAI" / "images"
if not VEDAI_IMAGES.is_dir():
    VEDAI_IMAGES = Path("/work/shared/data/vedai-real/VEDAI/images")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_image_pairs):
    root = tmp_path_factory.mktemp("parity")
    checkpoint = save_sample_checkpoint(root / "student.safetensors", img_size=IMG, weight_bits=(3, 8), seed=2,
                                        parity={"images": 2})
    images = VEDAI_IMAGES if VEDAI_IMAGES.is_dir() else write_image_pairs(root / "images", count=2, seed=3)
    good = export_onnx(checkpoint, root / "good.onnx", parity_images=images, progress=False)
    model, meta = model_from_checkpoint(checkpoint, with_sr=False)
    return {"root": root, "checkpoint": checkpoint, "images": images, "good": good, "model": model, "meta": meta}


def _scale_initializer(model, node_name, index=1):
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(i for i in model.graph.initializer if i.name == node.input[index])


def _multiply(init, factor):
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))


def test_good_export_passes_on_the_parity_images(setup):
    good = setup["good"]
    assert good.passed and good.onnx_path.name == "good.onnx"
    assert good.report["parity"]["source"].startswith("2 images from")


def test_corrupted_weight_scale_fails_the_export_and_is_localised(setup, monkeypatch):
    """An exporter bug simulated inside export: one layer's weight scale x1.3 after the checks on the graph."""
    target = "model.4.m.1.cv2.conv"
    original = api._check_graph

    def corrupting(graph):
        _multiply(_scale_initializer(graph, f"{target}.weight_dq"), 1.3)
        return original(graph)

    monkeypatch.setattr(api, "_check_graph", corrupting)
    root = setup["root"]
    runner = CliRunner()
    outcome = runner.invoke(export_command, ["--onnx", str(setup["checkpoint"]), "--out", str(root / "bad.onnx"),
                                             "--parity-images", str(setup["images"]), "--parity-arithmetic",
                                             "float32", "--no-progress"])
    assert outcome.exit_code == 1, outcome.output
    assert "parity gate FAILED" in outcome.output and target in outcome.output
    assert not (root / "bad.onnx").exists() and (root / "bad.FAILED.onnx").is_file()
    assert not (root / "bad.parity.npz").exists()
    report = json.loads((root / "bad.export.json").read_text())
    assert report["passed"] is False and report["parity"]["report"]["passed"] is False
    first = report["parity"]["per_layer"]["first_over_budget"]
    assert first["name"] == target and first["status"] == "OVER BUDGET: conv"
    bits = setup["meta"].bit_plan.layers[target].weight_bits
    assert first["weight_bits"] == bits
    upstream = [row for row in report["parity"]["per_layer"]["layers"]][:5]
    assert all(not row["over_budget"] for row in upstream)
    # PyTorch with every other layer's float difference injected still passes: this is no rounding noise
    floor = report["parity"]["noise_floor"]
    assert floor["at_noise_floor"] is False and floor["passed_trials"] == len(floor["trials"]) > 1
    assert target not in floor["relative_noise"] and len(floor["relative_noise"]) > 40
    assert "beyond the model's float32 noise floor" in outcome.output


def test_corrupted_input_scale_is_localised_to_its_quantizer(setup):
    """Q scale x1.5 on one activation quantizer read by a single conv: the gate fails there."""
    from ghost_deploy.parity.gate import run_gate

    graph = onnx.load(str(setup["good"].onnx_path))
    target = "model.5.conv"
    _multiply(_scale_initializer(graph, f"{target}.input_q"), 1.5)
    budgets = budgets_from_recipe(setup["meta"].recipe)
    inputs = images_from_folder(setup["images"], ["rgb", "ir"], IMG, 2).inputs
    layer_bits = {name: (None if entry.weight_is_float else entry.weight_bits, entry.act_bits)
                  for name, entry in setup["meta"].bit_plan.layers.items()}
    layers = localise(setup["model"], graph, inputs, layer_bits, budgets)
    assert layers.first_over_budget["name"] == target
    assert "input quantizer" in layers.first_over_budget["status"]
    assert "first layer over budget: model.5.conv" in layers.format_table()

    path = setup["root"] / "input-corrupt.onnx"
    onnx.save(graph, str(path))
    from ghost_deploy.parity.parityset import load_parity_set

    report = run_gate(load_parity_set(setup["good"].parity_set_path), path, budgets)
    assert not report.passed and any("cosine" in f for f in report.failures)


def test_impossible_budget_raises_parity_error_with_report(setup, tmp_path):
    checkpoint = save_sample_checkpoint(tmp_path / "strict.safetensors", img_size=IMG, weight_bits=8, seed=4,
                                        parity={"images": 1, "max_abs_error_in_output_scale": 0.0, "min_cosine": 1.0000001})
    with pytest.raises(ParityError) as caught:
        export_onnx(checkpoint, tmp_path / "strict.onnx", parity_images=setup["images"], parity_arithmetic="float32",
                    progress=False)
    assert caught.value.report["passed"] is False
    assert (tmp_path / "strict.FAILED.onnx").is_file() and (tmp_path / "strict.export.json").is_file()
    # a budget PyTorch itself cannot meet under its own rounding is reported as the model's noise floor
    floor = caught.value.report["parity"]["noise_floor"]
    assert floor["at_noise_floor"] is True and floor["passed_trials"] == 0
    assert "at the model's float32 noise floor" in str(caught.value)


def test_noise_floor_of_a_rounding_sensitive_model_is_measured(setup):
    """Noise of a given relative size in every layer: outputs move, a tight cosine budget fails, a loose one passes."""
    from ghost_deploy.parity.compare import Budgets
    from ghost_deploy.export.torch_graph import make_wrapper
    from ghost_deploy.export.localise import LayerReport, noise_floor
    from ghost_deploy.parity.parityset import load_parity_set

    parity_set = load_parity_set(setup["good"].parity_set_path)
    model, meta = setup["model"], setup["meta"]
    rows = [{"name": name, "conv": {"relative_error": 1e-3}, "over_budget": False}
            for name in meta.bit_plan.layers]
    layers = LayerReport(rows, None, 0.0, 0.9999)
    wrapper = make_wrapper(model, meta, IMG, decode=False)
    tight = noise_floor(wrapper, model, parity_set, layers, Budgets(min_cosine=0.9999999, score_threshold=2.0), trials=2)
    loose = noise_floor(wrapper, model, parity_set, layers, Budgets(min_cosine=0.5, score_threshold=2.0), trials=2)
    assert tight.at_noise_floor and tight.passed_trials == 0 and tight.trials[0]["min_cosine"] < 0.9999999
    assert not loose.at_noise_floor and loose.passed_trials == 2
    assert tight.trials[0]["min_cosine"] != tight.trials[1]["min_cosine"]  # each trial draws its own noise
    assert "0 of 2 runs" in tight.summary() and "noise floor" in tight.summary()


def test_parity_images_are_letterboxed_and_limited(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((30, 60, 3), 255, np.uint8)).save(folder / "a_co.png")
    Image.fromarray(np.full((30, 60), 255, np.uint8)).save(folder / "a_ir.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "b_co.png")  # no IR partner: skipped
    loaded = images_from_folder(folder, ["rgb", "ir"], 32, limit=5)
    assert loaded.count == 1 and loaded.inputs["rgb"].shape == (1, 3, 32, 32) and loaded.inputs["ir"].shape == (1, 1, 32, 32)
    rgb = loaded.inputs["rgb"][0]
    assert rgb.dtype == np.float32 and rgb.max() == 1.0
    assert np.allclose(rgb[:, 0, :], 114 / 255) and np.allclose(rgb[:, 16, :], 1.0)  # padded rows, image rows
    with pytest.raises(UserError, match="no parity images"):
        images_from_folder(tmp_path, ["rgb", "ir"], 32, 5)
    with pytest.raises(UserError, match="not found"):
        images_from_folder(tmp_path / "missing", ["rgb"], 32, 5)


@pytest.mark.skipif(not VEDAI_IMAGES.is_dir(), reason="real VEDAI subset (shared/data/vedai-real) is absent")
def test_real_vedai_tiles_load_as_parity_inputs():
    loaded = images_from_folder(VEDAI_IMAGES, ["rgb", "ir"], 128, limit=3)
    assert loaded.count == 3 and loaded.inputs["rgb"].shape == (3, 3, 128, 128)
    assert all(path[0].endswith("_co.png") and path[1].endswith("_ir.png") for path in loaded.paths)
    assert 0.0 <= loaded.inputs["ir"].min() and loaded.inputs["ir"].max() <= 1.0


def test_cli_bad_input_exits_2(tmp_path):
    outcome = CliRunner().invoke(export_command, ["--onnx", str(tmp_path / "missing.safetensors")])
    assert outcome.exit_code == 2 and "no such checkpoint" in outcome.output
