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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from .export.graph import DEQUANTIZE, GraphIndex, unique_name
from .quant.quantizers import MIN_SCALE

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


def exact_reference(folded: nn.Module, convs: dict, acts: dict, meta: dict, img_size: int, decode: bool,
                    layers: set[str]) -> nn.Module:
    """The module doc's PyTorch side, built in place from `torch_graph.conv_specs`' folded model and specs (an
    export wrapper, like the gate's reference)."""
    from .export import torch_graph
    from .quant import act_quantizers

    for quantizer in act_quantizers(folded).values():
        quantizer.forward = _dividing(quantizer)
    for name in layers:
        spec = convs[name]
        module = folded.get_submodule(name)
        input_scale = np.float32(acts[spec.act_key].scale)
        bias = module.bias.detach().numpy().astype(np.float32) if module.bias is not None \
            else np.zeros(spec.codes.shape[0], np.float32)
        exact = ExactConv(spec.codes.astype(np.float32), input_scale * spec.weight_scale, bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, attr,
                ExactConvModule(module, exact, input_scale))
    return torch_graph.make_wrapper(folded.eval(), meta, img_size, decode)


def _dividing(quantizer):
    """round(x / s) like QuantizeLinear, not x * (1 / s): the two differ at rounding ties."""
    scale = quantizer.scale.detach().clamp_min(MIN_SCALE).float()

    def forward(x):
        return torch.clamp(torch.round(x / scale), quantizer.qmin, quantizer.qmax) * scale
    return forward


class ExactConvModule(nn.Module):
    """A folded QuantConv2d summing integer codes exactly, then scaling in float32 like the ONNX side.

    It records the largest sum(|x code| * |w code|) it met (`largest_sum`); with `exact = False` it is the folded
    conv again, float sums and all (for a conv whose sums leave float32's exact integers).
    """

    def __init__(self, conv, exact: ExactConv, input_scale: np.float32):
        super().__init__()
        self.float_conv = conv
        self.exact = True
        self.largest_sum = 0.0
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("codes", torch.from_numpy(exact.codes).double())
        self.register_buffer("multiplier", torch.from_numpy(exact.multiplier).view(1, -1, 1, 1))
        self.register_buffer("bias", torch.from_numpy(exact.bias).view(1, -1, 1, 1))
        self.register_buffer("input_scale", torch.tensor(float(input_scale), dtype=torch.float32))
        # a block's pre-hook may have quantized the input already (C3, Bottleneck): then the conv must not
        self.__dict__["input_quantizer"] = conv.input_quantizer if conv.quantizes_input else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return self.float_conv(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        codes = torch.round(x / self.input_scale).double()  # x is float32(code * s): this gives the codes back
        summed = F.conv2d(codes, self.codes, None, self.stride, self.padding, self.dilation, self.groups)
        magnitude = F.conv2d(codes.abs(), self.codes.abs(), None, self.stride, self.padding, self.dilation, self.groups)
        self.largest_sum = max(self.largest_sum, float(magnitude.max()) if magnitude.numel() else 0.0)
        return summed.float() * self.multiplier + self.bias


def quantized_convs(convs: dict) -> set[str]:
    """The convs with quantized weights and a quantized input: the ones that can accumulate codes."""
    return {name for name, spec in convs.items() if spec.codes is not None and spec.act_key is not None}


def check_exact_parity(model, meta: dict, graph: onnx.ModelProto, parity_set, budgets, img_size: int,
                       decode: bool, cpu_form=None) -> ExactResult:
    """Both sides in exact arithmetic on the parity set's inputs, through the gate's comparison.

    `graph` is the TensorRT form. With `cpu_form` (the path of its CPU re-encoding) the two are also run as written
    on the same inputs, and must agree bit for bit: the CPU form is then as exact as the form checked here.
    """
    from .engines.bundle import run_parity
    from .engines.runners import OrtRunner
    from .export import torch_graph
    from .parity import TorchRunner, run_in_chunks

    convs, acts, folded = torch_graph.conv_specs(model)
    candidates = quantized_convs(convs)
    layers = rewritable_convs(graph, candidates)
    wrapper = exact_reference(folded, convs, acts, meta, img_size, decode, layers)
    runner = TorchRunner(wrapper, parity_set.input_names, parity_set.output_names)
    run_in_chunks(runner, parity_set.inputs)  # a first pass measures every conv's largest sum on these images
    modules = {name: folded.get_submodule(name) for name in layers}
    too_large = {name for name, module in modules.items() if module.largest_sum >= EXACT_SUM_LIMIT}
    for name in too_large:
        modules[name].exact = False
    layers -= too_large
    kept = sorted(too_large | (candidates - layers))
    reference = run_in_chunks(runner, parity_set.inputs)
    exact_set = copy.copy(parity_set)
    exact_set.outputs = reference
    with tempfile.TemporaryDirectory(prefix="ghost-exact-") as folder:
        path = Path(folder) / "exact.onnx"
        onnx.save(exact_graph(graph, layers), os.fspath(path))
        with OrtRunner(path, exact=True, optimize=False) as runner:  # ORT would fold the Mul into the weights
            report = run_parity(exact_set, runner, budgets)
        cpu_identical = None
        if cpu_form is not None:
            onnx.save(graph, os.fspath(Path(folder) / "trt_form.onnx"))
            with OrtRunner(Path(folder) / "trt_form.onnx") as trt_runner, OrtRunner(cpu_form) as cpu_runner:
                trt_out = run_in_chunks(trt_runner, parity_set.inputs)
                cpu_out = run_in_chunks(cpu_runner, parity_set.inputs)
            cpu_identical = all(np.array_equal(trt_out[name], cpu_out[name]) for name in trt_out)
    # the raw head maps; decoded boxes (--decode) pass through exp/sigmoid, which the two runtimes round differently
    heads = parity_set.meta.get("head_output_names") or list(reference)
    outputs = report.to_dict()["outputs"]
    identical = all(name in outputs and outputs[name].get("finite") and outputs[name].get("max_abs_error") == 0
                    for name in heads)
    return ExactResult(report, identical, sorted(layers), kept, cpu_identical, reference)
