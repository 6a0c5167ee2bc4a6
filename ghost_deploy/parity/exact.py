"""Exact-arithmetic parity: the exported graph and the PyTorch model, both accumulating convs on integer codes.

The gate compares float32 runs: PyTorch and ONNX Runtime sum each conv in their own order, a rounding difference
of ~1e-7 now and then lands on a quantizer's rounding boundary, one code flips, and a quantized network spreads
the flip. On the demo models that noise alone reaches the default budgets (parity.noise_floor). TensorRT does
not sum in float: an INT8 conv accumulates codes in int32, then scales. This check does the same on both sides,
so a correct export agrees *bit for bit* and any difference is a real one:

- ONNX side, on a copy of the TensorRT-form graph: a quantized conv reads its input codes (DequantizeLinear with
  scale 1) and its weight codes, and scales afterwards: Conv(codes_x, codes_w) -> Mul(s_x * s_w) -> Add(bias).
  Every product and partial sum is an integer below 2^24, exact in float32 in any order.
- PyTorch side: the checkpoint's model with BN folded (codes kept), each quantized conv computing the same conv
  on codes (in float64, exact) and the same Mul and Add in float32; its activation quantizers divide by the
  scale, as QuantizeLinear does (training multiplies by the reciprocal, like TensorRT's Q).
- Everything else (ReLU, Add, Concat, MaxPool, nearest Resize, Q, DQ) is exact or the same elementwise float32
  op on both sides. Each side takes codes, scales and biases from its own artifact (the ONNX's initializers,
  the checkpoint's quantizers), so a wrong scale in the ONNX shows as a difference.

A float32 sum of integers is exact in any order while every partial sum stays below 2^24 in magnitude, which
holds when sum(|x code| * |w code|) does. PyTorch measures that sum for every conv and output on the parity
images (in float64, where it is exact); a conv that reaches 2^23 (a margin of 2 for the flips a float
neighbour may cause upstream) keeps float accumulation on both sides and is listed, and the outputs are then no
longer guaranteed bit-identical.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ghost_deploy.onnx_graph import DEQUANTIZE, GraphIndex, unique_name

EXACT_SUM_LIMIT = float(1 << 23)  # float32 holds every integer below 2^24; half of that, for a margin


@dataclass
class ExactConv:
    """What both sides use for one conv: integer codes, the per-channel multiplier s_x * s_w and the bias."""

    codes: np.ndarray  # float32 (out, in/g, k, k), integers
    multiplier: np.ndarray  # float32 (out,): float32(s_x) * float32(s_w), rounded once
    bias: np.ndarray  # float32 (out,)


@dataclass
class ExactResult:
    report: object  # compare.ParityReport
    bit_identical: bool
    exact_convs: list[str] = field(default_factory=list)
    float_convs: list[str] = field(default_factory=list)  # accumulation could leave float32's integers
    # target cpu: the CPU form, run as written, gave exactly the TensorRT form's outputs (None: not checked)
    cpu_form_identical: bool | None = None
    reference_outputs: dict = field(default_factory=dict, repr=False)  # the exact PyTorch side, per output

    @property
    def passed(self) -> bool:
        return bool(self.report.passed) and self.cpu_form_identical is not False

    def verdict(self) -> str:
        if not self.report.passed:
            return "OVER BUDGET: " + "; ".join(self.report.failures)
        what = "bit-identical outputs" if self.bit_identical else "within budget"
        if self.cpu_form_identical is False:
            return what + ", but the CPU form run as written differs from the TensorRT form"
        return what + (" (the CPU form gives the TensorRT form's outputs bit for bit)" if self.cpu_form_identical else "")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "report": self.report.to_dict(), "bit_identical": self.bit_identical,
                "exact_convs": len(self.exact_convs), "float_convs": list(self.float_convs),
                "cpu_form_identical": self.cpu_form_identical}

    def summary(self) -> str:
        suffix = f"; {len(self.float_convs)} convs kept float sums ({', '.join(self.float_convs[:3])})" \
            if self.float_convs else ""
        return (f"exact arithmetic (convs accumulate integer codes, as TensorRT's INT8 convs do; {len(self.exact_convs)} "
                f"convs): {self.verdict()}{suffix}")


def _constant(index: GraphIndex, name: str) -> np.ndarray | None:
    """A constant, also behind Identity nodes (an unsimplified export shares initializers through them)."""
    node = index.producer.get(name)
    while node is not None and node.op_type == "Identity" and index.constant(name) is None:
        name = node.input[0]
        node = index.producer.get(name)
    return index.constant(name)


def _dequantized_inputs(index: GraphIndex, node: onnx.NodeProto):
    """(activation DQ, weight DQ) feeding a Conv, or None when it does not read both through DequantizeLinear."""
    act_dq, weight_dq = index.producer.get(node.input[0]), index.producer.get(node.input[1])
    if act_dq is None or weight_dq is None or act_dq.op_type != DEQUANTIZE or weight_dq.op_type != DEQUANTIZE:
        return None
    return act_dq, weight_dq


def rewritable_convs(model: onnx.ModelProto, layers: set[str]) -> set[str]:
    """The convs of `layers` read through an activation DQ and a constant weight DQ, with constant scales and bias."""
    index = GraphIndex(model)
    found = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in layers:
            continue
        pair = _dequantized_inputs(index, node)
        if pair is None:
            continue
        act_dq, weight_dq = pair
        needed = [act_dq.input[1], weight_dq.input[0], weight_dq.input[1]] + list(node.input[2:3])
        if all(_constant(index, name) is not None for name in needed if name):
            found.add(node.name)
    return found


def exact_graph(model: onnx.ModelProto, layers: set[str]) -> onnx.ModelProto:
    """A copy of a TensorRT-form QDQ graph where the convs named in `layers` accumulate codes (module doc).

    Every conv in `layers` must be one `rewritable_convs` returns.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    index = GraphIndex(model)
    taken = {n.name for n in graph.node} | {t for n in graph.node for t in n.output} | set(index.initializers)
    code_inputs: dict[str, str] = {}  # activation DQ output -> its codes (DQ with scale 1)
    new_inits, edits = [], []
    for node in graph.node:
        if node.op_type != "Conv" or node.name not in layers:
            continue
        pair = _dequantized_inputs(index, node)
        if pair is None:
            raise ValueError(f"{node.name}: not a DequantizeLinear -> Conv pair (a TensorRT-form graph is needed)")
        act_dq, weight_dq = pair
        act_scale = np.float32(_constant(index, act_dq.input[1]))
        weight_scale = _constant(index, weight_dq.input[1]).astype(np.float32).reshape(-1)
        codes = _constant(index, weight_dq.input[0]).astype(np.float32)
        bias = _constant(index, node.input[2]).astype(np.float32) if len(node.input) > 2 and node.input[2] \
            else np.zeros(codes.shape[0], np.float32)
        if node.input[0] not in code_inputs:
            one = unique_name(f"{act_dq.name}.unit_scale", taken)
            new_inits.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            codes_out = unique_name(f"{act_dq.name}.codes", taken)
            edits.append((act_dq, helper.make_node(DEQUANTIZE, [act_dq.input[0], one, *act_dq.input[2:]], [codes_out],
                                                   name=unique_name(f"{act_dq.name}.codes_dq", taken))))
            code_inputs[node.input[0]] = codes_out
        conv = ExactConv(codes, act_scale * weight_scale, bias)
        weight_name = unique_name(f"{node.name}.weight_codes", taken)
        multiplier = unique_name(f"{node.name}.multiplier", taken)
        bias_name = unique_name(f"{node.name}.exact_bias", taken)
        new_inits += [numpy_helper.from_array(conv.codes, weight_name),
                      numpy_helper.from_array(conv.multiplier.reshape(1, -1, 1, 1), multiplier),
                      numpy_helper.from_array(conv.bias.reshape(1, -1, 1, 1), bias_name)]
        output = node.output[0]
        summed, scaled = unique_name(f"{node.name}.sum", taken), unique_name(f"{node.name}.scaled", taken)
        exact_conv = helper.make_node("Conv", [code_inputs[node.input[0]], weight_name], [summed], name=node.name)
        exact_conv.attribute.extend(node.attribute)
        edits.append((node, [exact_conv,
                             helper.make_node("Mul", [summed, multiplier], [scaled], name=f"{node.name}.multiply"),
                             helper.make_node("Add", [scaled, bias_name], [output], name=f"{node.name}.add_bias")]))
    for anchor, new in edits:
        position = list(graph.node).index(anchor)
        if isinstance(new, list):  # replaces the conv
            graph.node.remove(anchor)
            for offset, replacement in enumerate(new):
                graph.node.insert(position + offset, replacement)
        else:  # a codes DQ beside the original DQ, which the residual Adds still read
            graph.node.insert(position + 1, new)
    graph.initializer.extend(new_inits)
    return model


