"""Other forms of the export: CPU (ORT integer kernels), FP32, INT4 storage with sub-8-bit activations."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from ghost_deploy.errors import UserError
from ghost_deploy.export import export_onnx, load_our_onnx
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.quant.trace import conv_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 64




@pytest.fixture(scope="module")
def root(tmp_path_factory, write_image_pairs):
    folder = tmp_path_factory.mktemp("forms")
    write_image_pairs(folder / "images", count=2, seed=5)
    return folder


@pytest.fixture(scope="module")
def mixed_checkpoint(root):
    return save_sample_checkpoint(root / "mixed.safetensors", img_size=IMG, weight_bits=(3, 8), seed=3,
                                  parity={"images": 2})


def test_cpu_target_is_a_lossless_reencoding_that_ort_runs_with_integer_kernels(root, mixed_checkpoint):
    result = export_onnx(mixed_checkpoint, root / "mixed.cpu.onnx", target="cpu", parity_images=root / "images",
                         progress=False)
    assert result.passed and result.parity.passed, result.parity.failures
    assert {row["status"] for row in result.layers} == {"bits preserved"}
    # the same numbers as the TensorRT form, bit for bit, when the graph is run as written
    trt = export_onnx(mixed_checkpoint, root / "mixed.onnx", parity=False, progress=False)
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.disable_quant_qdq", "1")
    rng = np.random.default_rng(2)
    feed = {"rgb": rng.random((2, 3, IMG, IMG), dtype=np.float32), "ir": rng.random((2, 1, IMG, IMG), dtype=np.float32)}
    for a, b in zip(ort.InferenceSession(str(trt.onnx_path), exact, providers=["CPUExecutionProvider"]).run(None, feed),
                    ort.InferenceSession(str(result.onnx_path), exact, providers=["CPUExecutionProvider"]).run(None, feed)):
        np.testing.assert_array_equal(a, b)
    kernels = result.report["parity"]["ort_integer_kernels"]
    assert kernels is not None and min(v["min_cosine_per_image"] for v in kernels["outputs"].values()) > 0.9
    cpu = result.report["cpu_form"]
    # Float only where no exact output quantizer exists: the Detect convs (graph outputs) and a Bottleneck's
    # cv2 (its residual Add is not quantized). A neck Concat shares its inputs' scale, so model.4.cv3, whose
    # output feeds model.5 and the Concat of layer 16, is an integer conv.
    assert all(name.startswith("model.24.") or (".m." in name and name.endswith(".cv2.conv"))
               for name in cpu["float_convs"]), cpu["float_convs"]
    assert len(cpu["integer_convs"]) > 40 and "model.24.m.0" in cpu["float_convs"]
    assert {"model.4.cv3.conv", "model.6.cv3.conv", "model.10.conv", "model.14.conv"} <= set(cpu["integer_convs"])
    assert any("codes x" in row["container"] for row in result.layers)  # sub-8-bit codes scaled by 2^n
    graph = onnx.load(str(result.onnx_path))
    inits = {i.name: i for i in graph.graph.initializer}
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(inits[q.input[2]].data_type == TensorProto.UINT8 for q in quantize)
    assert all(inits[q.input[2]].int32_data == [0] or numpy_helper.to_array(inits[q.input[2]]) in (0, 128)
               for q in quantize)
    # ORT really fuses them: QLinearConv in the session's optimized graph
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(root / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(result.onnx_path), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(root / "optimized.onnx")).graph.node if n.op_type == "QLinearConv"]
    assert len(fused) == len(cpu["integer_convs"])
    assert load_our_onnx(result.onnx_path)[1].target == "cpu"
    # the 4-channel stem stays float, with the trained per-channel codes: ORT must not re-quantize its weights
    assert cpu["float_stem_convs"] == ["model.0.conv"] and "model.0.conv" not in cpu["integer_convs"]
    optimized = onnx.load(str(root / "optimized.onnx")).graph
    stem = next(n for n in optimized.node if n.name == "model.0.conv")
    assert stem.op_type in ("Conv", "FusedConv")
    weight_dq = next(n for n in optimized.node if stem.input[1] in n.output)
    assert weight_dq.op_type == "DequantizeLinear"
    assert next(i for i in optimized.initializer if i.name == weight_dq.input[1]).dims[0] > 1  # per channel
    # clips that cannot act are gone (behind Concat / MaxPool / Resize of clipped inputs), the others stay
    clips = [n.name for n in graph.graph.node if n.op_type == "Clip"]
    assert cpu["dropped_code_clips"] and not set(cpu["dropped_code_clips"]) & set(clips)
    assert "model.8.m.0.MaxPool.output_code_clip" in cpu["dropped_code_clips"]
    assert "model.1.conv.output_code_clip" in clips


def test_a_stem_with_a_large_output_runs_as_an_integer_conv(root):
    """At 256 px the 4-channel stem's output holds 256x256 positions: there MLAS's integer conv beats its float one
    (measured at 512 px), so the stem gets its output Q like any other conv and the outputs stay exact."""
    from ghost_deploy.export.cpu_form import INTEGER_STEM_MIN_POSITIONS

    assert INTEGER_STEM_MIN_POSITIONS == 256 * 256
    checkpoint = save_sample_checkpoint(root / "large.safetensors", model_name="ghost-p", img_size=256,
                                        weight_bits=8, seed=1, parity={"images": 1})
    result = export_onnx(checkpoint, root / "large.cpu.onnx", target="cpu", parity_images=root / "images",
                         progress=False)
    assert result.passed and result.report["parity"]["exact_arithmetic"]["bit_identical"]
    cpu = result.report["cpu_form"]
    assert "model.0.conv" in cpu["integer_convs"] and cpu["float_stem_convs"] == []


def test_code_ranges_prove_only_what_is_certain():
    from onnx import helper

    from ghost_deploy.export.cpu_form import code_ranges

    def const(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp0"], ["xq"]),
             helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"]),
             helper.make_node("DequantizeLinear", ["xc", "s", "zp0"], ["xd"]),
             helper.make_node("MaxPool", ["xd"], ["pooled"], kernel_shape=[2, 2]),
             helper.make_node("QuantizeLinear", ["pooled", "s", "zp0"], ["pooled_q"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "zp128"], ["r_q"]),
             helper.make_node("Add", ["xd", "xd"], ["sum"]),
             helper.make_node("QuantizeLinear", ["sum", "s", "zp0"], ["sum_q"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("pooled_q", "r_q", "sum_q")],
                              [const("s", 0.1, np.float32), const("zp0", 0, np.uint8), const("zp128", 128, np.uint8),
                               const("lo", 0, np.uint8), const("hi", 100, np.uint8)])
    ranges = code_ranges(helper.make_model(graph))
    assert ranges["xq"] == (0, 255) and ranges["xc"] == (0, 100)
    assert ranges["pooled_q"] == (0, 100)  # a MaxPool of codes in [0, 100] re-quantized on the same grid
    assert ranges["r_q"] == (128, 255)  # after a ReLU, zero-point 128: the top saturates exactly, no clip needed
    assert ranges["sum_q"] == (0, 255)  # an Add proves nothing


def test_fp32_export_of_a_teacher_matches_pytorch(root, mixed_checkpoint):
    teacher = save_sample_checkpoint(root / "teacher.safetensors", img_size=IMG, weight_bits=None, seed=7,
                                     parity={"images": 2})
    with pytest.raises(UserError, match="fp32=True"):
        export_onnx(teacher, root / "teacher.onnx", parity_images=root / "images", progress=False)
    result = export_onnx(teacher, root / "teacher.fp32.onnx", fp32=True, parity_images=root / "images",
                         progress=False)
    assert result.passed, result.parity.failures
    for stats in result.parity.outputs.values():
        assert stats["min_cosine_per_image"] > 0.999999
    graph = onnx.load(str(result.onnx_path))
    assert not [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "BatchNormalization")]
    names = {n.name for n in graph.graph.node}
    assert {"model.3.conv", "model.24.m.2"} <= names
    _, meta = load_our_onnx(result.onnx_path)
    assert meta.precision == "fp32" and meta.bit_plan is None
    assert result.layers == []
    # a quantized student exports through the same path without its quantizers (no gate: its latent float
    # weights are not a model anyone trained, so only the graph is checked)
    student = export_onnx(mixed_checkpoint, root / "mixed.fp32.onnx", fp32=True, parity=False, progress=False)
    assert not [n for n in onnx.load(str(student.onnx_path)).graph.node if n.op_type == "QuantizeLinear"]


def test_int4_storage_is_smaller_and_exact(root):
    """A low-bit plan (<= 4 bits for most weights, 6-bit activations): INT4 file <= 60% of the INT8 one."""
    from ghost_deploy.model import build_model

    names = conv_names(build_model("ghost-n", nc=5))
    rng = np.random.default_rng(6)
    bits = {name: int(rng.integers(2, 5)) for name in names}
    for name in ("model.0.conv", "model.24.m.0", "model.24.m.1", "model.24.m.2"):
        bits[name] = 8  # a few small layers stay 8-bit
    model, plan = build_sample_model(img_size=IMG, weight_bits=bits, act_bits=6, seed=6)
    checkpoint = save_sample_checkpoint(root / "low.safetensors", img_size=IMG, model=model, plan=plan,
                                        parity={"images": 2})
    params = {name: layer.params for name, layer in plan.layers.items()}
    assert sum(params[n] * bits[n] for n in names) / sum(params.values()) <= 5

    int8 = export_onnx(checkpoint, root / "low.onnx", parity=False, progress=False)  # compared bit for bit below
    int4 = export_onnx(checkpoint, root / "low.int4.onnx", int4_weights=True, parity_images=root / "images",
                       progress=False)
    assert int8.passed and int4.passed, int4.parity.failures
    assert int4.onnx_path.stat().st_size <= 0.6 * int8.onnx_path.stat().st_size
    graph = onnx.load(str(int4.onnx_path))
    assert next(o.version for o in graph.opset_import if o.domain == "") == 21
    inits = {i.name: i for i in graph.graph.initializer}
    producers = {n.output[0]: n for n in graph.graph.node}
    nodes = {n.name: n for n in graph.graph.node}
    for name in names:
        dq = producers[nodes[name].input[1]]
        expected = TensorProto.INT4 if bits[name] <= 4 else TensorProto.INT8
        assert inits[dq.input[0]].data_type == expected, name
    assert sorted(int4.report["int4_layers"]) == sorted(n for n in names if bits[n] <= 4)
    from ghost_deploy.bench.sizes import onnx_precision  # the bench labels each file from its metadata

    assert (onnx_precision(int4.onnx_path), onnx_precision(int8.onnx_path)) == ("int4w-qdq", "int8-qdq")
    assert {row["status"] for row in int4.layers} == {"bits preserved"}
    assert {row["container"] for row in int4.layers} == {"INT4", "INT8"}
    assert "weight-only" in int4.report["notes"][0] and "MatMul/GEMM" in int4.report["notes"][0]
    assert any(f.rule == "int4-conv" for f in int4.lint)
    # 6-bit activations: a range clip in front of every Q keeps the codes in [-31, 31]
    clips = [n for n in graph.graph.node if n.op_type == "Clip" and n.name.endswith(".input_clip")]
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(clips) == len(quantize)
    # the same numbers as the INT8 container, bit for bit
    feed = {"rgb": np.random.default_rng(0).random((1, 3, IMG, IMG), dtype=np.float32),
            "ir": np.random.default_rng(1).random((1, 1, IMG, IMG), dtype=np.float32)}
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.disable_quant_qdq", "1")
    out8 = ort.InferenceSession(str(int8.onnx_path), exact, providers=["CPUExecutionProvider"]).run(None, feed)
    out4 = ort.InferenceSession(str(int4.onnx_path), exact, providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(out8, out4):
        np.testing.assert_array_equal(a, b)
