"""TensorRT explicit-quantization lint on hand-made graphs: each violation is found and names its node."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ghost_deploy.export.lint import errors, lint_qdq


class GraphBuilder:
    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(self, prefix, source, scale=0.05, zero_point=0, dtype=np.int8):
        s = self.const(f"{prefix}.scale", np.array(scale, np.float32))
        z = self.const(f"{prefix}.zp", np.array(zero_point, dtype))
        self.nodes.append(helper.make_node("QuantizeLinear", [source, s, z], [f"{prefix}.q_out"], name=f"{prefix}.input_q"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.q_out", s, z], [f"{prefix}.dq_out"],
                                           name=f"{prefix}.input_dq"))
        return f"{prefix}.dq_out"

    def conv(self, name, source, cin, cout, axis=0, weight_zp=0, quantize_input=True):
        codes = self.const(f"{name}.w", np.ones((cout, cin, 1, 1), np.int8))
        scale = self.const(f"{name}.ws", np.full(cout, 0.01, np.float32))
        zp = self.const(f"{name}.wz", np.full(cout, weight_zp, np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zp], [f"{name}.wdq"], name=f"{name}.weight_dq",
                                           axis=axis))
        data = self.qdq(name, source) if quantize_input else source
        self.nodes.append(helper.make_node("Conv", [data, f"{name}.wdq"], [f"{name}.out"], name=name))
        return f"{name}.out"

    def model(self, outputs, channels=4, output_shape=None):
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, output_shape) for o in outputs],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rules(findings, severity="error"):
    return {(f.rule, f.node) for f in findings if f.severity == severity}


def test_clean_graph_has_no_findings():
    g = GraphBuilder()
    out = g.conv("model.0.conv", "x", 4, 4)
    relu = g.nodes.append(helper.make_node("Relu", [out], ["r"], name="model.0.act")) or "r"
    g.conv("model.1.conv", relu, 4, 4)
    model = g.model(["model.1.conv.out"], output_shape=[1, 4, 8, 8])
    onnx.checker.check_model(model, full_check=True)
    assert lint_qdq(model) == []


def test_asymmetric_zero_point_is_an_error_naming_the_node():
    g = GraphBuilder()
    data = g.qdq("model.0.conv", "x", zero_point=3)
    g.nodes.append(helper.make_node("Identity", [data], ["y"], name="id"))
    findings = lint_qdq(g.model(["y"]))
    assert ("zero-point", "model.0.conv.input_q") in _rules(findings)
    assert ("zero-point", "model.0.conv.input_dq") in _rules(findings)
    message = next(f for f in findings if f.node == "model.0.conv.input_q")
    assert "symmetric" in message.message and "model.0.conv.input_q" in str(message)


def test_uint8_activations_and_asymmetric_weights_are_errors():
    g = GraphBuilder()
    data = g.qdq("a", "x", zero_point=128, dtype=np.uint8)
    g.nodes.append(helper.make_node("Identity", [data], ["y"], name="id"))
    g.conv("model.1.conv", "x", 4, 4, weight_zp=2)
    found = _rules(lint_qdq(g.model(["y", "model.1.conv.out"])))
    assert ("qdq-type", "a.input_q") in found
    assert ("zero-point", "model.1.conv.weight_dq") in found


def test_concat_with_different_scales_is_a_warning_naming_the_concat():
    g = GraphBuilder()
    left = g.qdq("left", "x", scale=0.05)
    right = g.qdq("right", "x", scale=0.07)
    g.nodes.append(helper.make_node("Concat", [left, right], ["cat"], name="model.12.cat", axis=1))
    findings = lint_qdq(g.model(["cat"]))
    concat = [f for f in findings if f.rule == "concat-scales"]
    assert len(concat) == 1 and concat[0].severity == "warning" and concat[0].node == "model.12.cat"
    assert "left.input_dq" in concat[0].message and "right.input_dq" in concat[0].message


def test_concat_with_one_shared_scale_is_clean():
    g = GraphBuilder()
    left = g.qdq("left", "x", scale=0.05)
    right = g.qdq("right", "x", scale=0.05)
    g.nodes.append(helper.make_node("Concat", [left, right], ["cat"], name="cat", axis=1))
    assert errors(lint_qdq(g.model(["cat"]))) == []


def test_weight_axis_other_than_zero_is_an_error():
    g = GraphBuilder()
    codes = g.const("w", np.ones((4, 4, 1, 1), np.int8))
    scale = g.const("ws", np.full(4, 0.01, np.float32))
    zp = g.const("wz", np.zeros(4, np.int8))
    g.nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zp], ["wdq"], name="conv.weight_dq", axis=1))
    data = g.qdq("conv", "x")
    g.nodes.append(helper.make_node("Conv", [data, "wdq"], ["y"], name="conv"))
    assert ("weight-axis", "conv.weight_dq") in _rules(lint_qdq(g.model(["y"])))


def test_quantized_weight_with_float_input_is_an_error():
    g = GraphBuilder()
    g.conv("model.0.conv", "x", 4, 4, quantize_input=False)
    assert ("conv-inputs", "model.0.conv") in _rules(lint_qdq(g.model(["model.0.conv.out"])))


def test_per_channel_activation_scale_is_an_error():
    g = GraphBuilder()
    s = g.const("s", np.full(4, 0.05, np.float32))
    z = g.const("z", np.zeros(4, np.int8))
    g.nodes.append(helper.make_node("QuantizeLinear", ["x", s, z], ["q"], name="act_q", axis=1))
    g.nodes.append(helper.make_node("DequantizeLinear", ["q", s, z], ["y"], name="act_dq", axis=1))
    assert ("per-tensor-activation", "act_q") in _rules(lint_qdq(g.model(["y"])))


def test_qdq_between_pad_and_conv_is_an_error():
    g = GraphBuilder()
    pads = g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    g.nodes.append(helper.make_node("Pad", ["x", pads], ["padded"], name="model.3.pad"))
    g.conv("model.3.conv", "padded", 4, 4)
    findings = [f for f in lint_qdq(g.model(["model.3.conv.out"])) if f.rule == "pad-conv"]
    assert len(findings) == 1 and findings[0].node == "model.3.pad" and "model.3.conv" in findings[0].message


def test_qdq_between_conv_and_its_activation_is_an_error():
    g = GraphBuilder()
    out = g.conv("model.0.conv", "x", 4, 4)
    mid = g.qdq("model.0.out", out)
    g.nodes.append(helper.make_node("Relu", [mid], ["r"], name="model.0.act"))
    assert ("epilogue", "model.0.out.input_q") in _rules(lint_qdq(g.model(["r"])))


def test_float_residual_add_is_a_warning():
    g = GraphBuilder()
    out = g.conv("model.0.conv", "x", 4, 4)
    g.nodes.append(helper.make_node("Relu", [out], ["r"], name="relu"))
    g.nodes.append(helper.make_node("Add", ["r", "x"], ["sum"], name="model.2.add"))
    findings = lint_qdq(g.model(["sum"]))
    assert ("residual-add", "model.2.add") in _rules(findings, "warning")
    assert errors(findings) == []


def test_old_opset_is_an_error():
    g = GraphBuilder()
    g.nodes.append(helper.make_node("Relu", ["x"], ["y"], name="relu"))
    model = g.model(["y"])
    model.opset_import[0].version = 12
    assert ("opset", "<model>") in _rules(lint_qdq(model))


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan")])
def test_bad_scales_are_errors(scale):
    g = GraphBuilder()
    data = g.qdq("a", "x", scale=scale)
    g.nodes.append(helper.make_node("Identity", [data], ["y"], name="id"))
    assert ("scale", "a.input_q") in _rules(lint_qdq(g.model(["y"])))
