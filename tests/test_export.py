"""QDQ export of a quantized ghost-n (random 3..8-bit plan, non-trivial BN): graph, bits, metadata, gate."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ghost_deploy.errors import UserError
from ghost_deploy.export import export_onnx, lint_qdq, load_our_onnx
from ghost_deploy.export.sample import save_sample_checkpoint
from ghost_deploy.parity.parityset import load_parity_set
from ghost_deploy.quant import quant_layers
from ghost_deploy.checkpoint import model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 64




@pytest.fixture(scope="module")
def exported(tmp_path_factory, write_image_pairs):
    root = tmp_path_factory.mktemp("export")
    checkpoint = save_sample_checkpoint(root / "student.safetensors", img_size=IMG, weight_bits=(3, 8), seed=1,
                                        parity={"images": 2})
    images = write_image_pairs(root / "images", count=3, seed=0, height=48, width=72, digits=8)  # not square
    result = export_onnx(checkpoint, root / "student.onnx", parity_images=images, decode=True, progress=False)
    model, meta = model_from_checkpoint(checkpoint, with_sr=False)
    return {"root": root, "checkpoint": checkpoint, "images": images, "result": result, "model": model, "meta": meta,
            "onnx": onnx.load(str(result.onnx_path))}


def _initializers(model):
    return {init.name: init for init in model.graph.initializer}


def test_export_passes_checker_and_shape_inference(exported):
    path = exported["result"].onnx_path
    assert path.name == "student.onnx" and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes(exported["onnx"], check_type=True, strict_mode=True)
    assert [i.name for i in exported["onnx"].graph.input] == ["rgb", "ir"]
    assert [o.name for o in exported["onnx"].graph.output] == ["head_s4", "head_s8", "head_s16", "boxes"]
    assert next(o.version for o in exported["onnx"].opset_import if o.domain == "") == 17


def test_qdq_counts_and_types(exported):
    graph, model = exported["onnx"], exported["model"]
    nodes = {n.name: n for n in graph.graph.node}
    inits = _initializers(graph)
    layers = quant_layers(model)
    weight_dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(weight_dq) == len(layers) == 62
    # one Q/DQ pair per quantized tensor: readers of one tensor share it; a scale group (a neck Concat and its
    # inputs) has one quantizer and a pair on each of its tensors, with that quantizer's scale
    tensors = {layer.input_tensor for layer in model.bit_plan.layers.values() if layer.act_bits != 32}
    assert len(quantize) == len(tensors) > len(model.act_quantizers) and len(quantize) < len(layers)
    scales = {float(numpy_helper.to_array(inits[q.input[1]])) for q in quantize}
    assert scales == {float(q.scale.detach()) for q in model.act_quantizers.values()}
    consumers = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for q in quantize:
        assert [c.op_type for c in consumers[q.output[0]]] == ["DequantizeLinear"]
        assert inits[q.input[2]].data_type == TensorProto.INT8
        assert numpy_helper.to_array(inits[q.input[2]]) == 0
    for dq in weight_dq:
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()
    for name, _ in layers:  # no float copy of a quantized weight is left behind
        assert f"detector.{name}.weight" not in inits and nodes[name].op_type == "Conv"
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    counts = exported["result"].report["qdq_counts"]
    assert counts["before_simplify"] == counts["after_simplify"]


def test_sub_8_bit_codes_are_the_trained_codes(exported):
    """Independent of the exporter's own check: ONNX codes vs the checkpoint's quantizers and BN."""
    graph, model = exported["onnx"], exported["model"]
    inits = _initializers(graph)
    producers = {n.output[0]: n for n in graph.graph.node}
    nodes = {n.name: n for n in graph.graph.node}
    checked = 0
    for name, conv in quant_layers(model):
        dq = producers[nodes[name].input[1]]
        codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        trained = conv.weight_codes().numpy().astype(np.int64)
        bits = conv.weight_bits
        qmax = 2 ** (bits - 1) - 1
        assert codes.min() >= -qmax and codes.max() <= qmax
        parent = model.get_submodule(name.rpartition(".")[0])
        factor = np.ones(codes.shape[0])
        if hasattr(parent, "bn") and isinstance(parent.bn, torch.nn.BatchNorm2d):
            bn = parent.bn
            factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        alive = np.abs(factor) > 1e-6
        sign = np.where(factor < 0, -1, 1)[:, None, None, None]
        assert np.array_equal(codes[alive], (trained * sign)[alive]), name
        assert not codes[~alive].any()
        # the deployed weight is the trained fake-quant weight times BN's factor
        expected = (conv.quantized_weight().detach().numpy() * factor[:, None, None, None])[alive]
        np.testing.assert_allclose((codes * scale[:, None, None, None])[alive], expected, rtol=1e-5, atol=1e-8)
        checked += bits < 8
    assert checked > 10  # the random plan has many sub-8-bit layers
    rows = exported["result"].layers
    assert len(rows) == 62 and {row["status"] for row in rows} == {"bits preserved"}
    assert exported["result"].bits_preserved and all(exported["result"].bits_preserved.values())


def test_metadata_holds_the_plan_and_readable_names(exported):
    graph, meta = exported["onnx"], exported["meta"]
    _, values = load_our_onnx(exported["result"].onnx_path)
    assert values.bit_plan.to_dict() == meta.bit_plan.to_dict()
    assert values.model == "ghost-n" and values.names == meta.names and values.input_mode == "rgb+ir"
    assert values.strides == meta.strides and values.anchors == meta.anchors_pixels
    assert values.checkpoint_sha256 == exported["result"].report["checkpoint_sha256"]
    assert values.precision == "qdq" and values.target == "trt" 
    names = {n.name for n in graph.graph.node}
    for layer in meta.bit_plan.layers:
        assert {layer, f"{layer}.weight_dq"} <= names
    assert {"model.3.conv.input_q", "model.3.conv.input_dq"} <= names
    # a shared quantizer is named after its first reader and says who reads it
    shared = next(n for n in graph.graph.node if n.name == "model.2.cv1.conv.input_q")
    assert "model.2.cv2.conv" in shared.doc_string


def test_gate_passes_and_parity_set_is_saved(exported):
    result = exported["result"]
    assert result.passed and result.parity.passed, result.parity.failures
    for name, stats in result.parity.outputs.items():
        assert stats["min_cosine_per_image"] >= 0.9999, name
        if name.startswith("head_"):  # the sample model sits on an exact grid: any difference would be a bug
            assert stats["max_abs_error"] == 0.0, name
    assert set(result.parity.outputs) == {"head_s4", "head_s8", "head_s16", "boxes"}
    assert result.parity.detections is not None
    parity_set = load_parity_set(result.parity_set_path)
    assert parity_set.sha256 == result.report["parity_set_sha256"]
    assert parity_set.meta.onnx_sha256 == result.report["onnx_sha256"]
    assert parity_set.inputs["rgb"].shape == (2, 3, IMG, IMG) and parity_set.inputs["ir"].shape == (2, 1, IMG, IMG)
    assert len(parity_set.meta.image_paths) == 2
    # the references are the checkpoint model's own outputs on those inputs
    with torch.no_grad():
        heads = exported["model"](torch.from_numpy(parity_set.inputs["rgb"]), torch.from_numpy(parity_set.inputs["ir"]))
    np.testing.assert_array_equal(parity_set.outputs["head_s8"], heads[1].numpy())
    report = json.loads(result.report_path.read_text())
    assert report["passed"] and report["bits_preserved"] and report["lint"]["errors"] == 0


def test_export_is_tensorrt_lint_clean(exported):
    findings = lint_qdq(exported["onnx"])
    assert [f for f in findings if f.severity == "error"] == []


def test_load_our_onnx_refuses_foreign_and_edited_models(exported, tmp_path):
    source = exported["result"].onnx_path
    edited = onnx.load(str(source))
    next(n for n in edited.graph.node if n.name == "model.3.conv").name = "renamed"
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    with pytest.raises(UserError, match="changed after export"):
        load_our_onnx(tmp_path / "edited.onnx")

    plan_edit = onnx.load(str(source))
    for prop in plan_edit.metadata_props:
        if prop.key == "ghost.bit_plan":
            prop.value = prop.value.replace('"weight_bits":3', '"weight_bits":2', 1)
    onnx.save(plan_edit, str(tmp_path / "plan.onnx"))
    with pytest.raises(UserError, match="changed after export"):
        load_our_onnx(tmp_path / "plan.onnx")

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="not a ghost-deploy export"):
        load_our_onnx(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError):
        load_our_onnx(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="not found"):
        load_our_onnx(tmp_path / "missing.onnx")


def test_bad_options_are_user_errors(exported, tmp_path):
    checkpoint = exported["checkpoint"]
    with pytest.raises(UserError, match="--target"):
        export_onnx(checkpoint, tmp_path / "x.onnx", target="gpu", progress=False)
    with pytest.raises(UserError, match="--opset"):
        export_onnx(checkpoint, tmp_path / "x.onnx", opset=11, progress=False)
    with pytest.raises(UserError, match="--int4-weights"):
        export_onnx(checkpoint, tmp_path / "x.onnx", fp32=True, int4_weights=True, progress=False)
    with pytest.raises(UserError, match="no such checkpoint"):
        export_onnx(tmp_path / "missing.safetensors", tmp_path / "x.onnx", progress=False)
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_default_output_names(tmp_path):
    from ghost_deploy.cli.export import default_out_path

    checkpoint = tmp_path / "best.safetensors"
    assert default_out_path(checkpoint, False, False, "trt") == tmp_path / "best.onnx"
    assert default_out_path(checkpoint, False, True, "trt") == tmp_path / "best.int4.onnx"
    assert default_out_path(checkpoint, False, False, "cpu") == tmp_path / "best.cpu.onnx"
    assert default_out_path(checkpoint, True, False, "trt") == tmp_path / "best.fp32.onnx"
