"""The PyTorch side of parity: the checkpoint's model behind the runner interface, and its exact-arithmetic twin.

`TorchRunner` runs a module like any other runner (parity.runners). `check_exact_parity` builds the PyTorch side
described in `parity.exact` (the model with BN folded, each quantized conv summing its integer codes in float64,
activation quantizers dividing like QuantizeLinear) and compares it with the ONNX rewritten to do the same.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from ghost_deploy.contract import MIN_SCALE
from ghost_deploy.export import torch_graph
from ghost_deploy.parity.exact import EXACT_SUM_LIMIT, ExactConv, ExactResult, exact_graph, rewritable_convs
from ghost_deploy.parity.gate import run_in_chunks, run_parity
from ghost_deploy.parity.runners import OrtRunner, Runner
from ghost_deploy.quant import act_quantizers


def exact_reference(folded: nn.Module, convs: dict, acts: dict, meta: dict, img_size: int, decode: bool,
                    layers: set[str]) -> nn.Module:
    """The module doc's PyTorch side, built in place from `torch_graph.conv_specs`' folded model and specs (an
    export wrapper, like the gate's reference)."""

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

    The codes are summed in float32, which is exact while every partial sum stays below 2^24: that holds when
    sum(|x code| * |w code|) does. The cheap bound max|x code| * max_c sum|w code| settles it for most convs;
    where it does not, the sum of magnitudes is computed (also exact below 2^24) and only a conv that reaches
    EXACT_SUM_LIMIT is summed in float64. `largest_sum` is the largest bound or magnitude met; with
    `exact = False` the module is the folded conv again, float sums and all (for a conv whose sums leave
    float32's exact integers, on both sides).
    """

    def __init__(self, conv, exact: ExactConv, input_scale: np.float32):
        super().__init__()
        self.float_conv = conv
        self.exact = True
        self.largest_sum = 0.0
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("codes", torch.from_numpy(exact.codes).float())
        self.register_buffer("multiplier", torch.from_numpy(exact.multiplier).view(1, -1, 1, 1))
        self.register_buffer("bias", torch.from_numpy(exact.bias).view(1, -1, 1, 1))
        self.register_buffer("input_scale", torch.tensor(float(input_scale), dtype=torch.float32))
        self.weight_abs_sum = float(self.codes.abs().flatten(1).sum(dim=1).max()) if self.codes.numel() else 0.0
        # a block's pre-hook may have quantized the input already (C3, Bottleneck): then the conv must not
        self.__dict__["input_quantizer"] = conv.input_quantizer if conv.quantizes_input else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return self.float_conv(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        codes = torch.round(x / self.input_scale)  # x is float32(code * s): this gives the codes back
        largest = float(codes.abs().max()) * self.weight_abs_sum if codes.numel() else 0.0
        if largest >= EXACT_SUM_LIMIT:  # the bound cannot tell: measure the sums of magnitudes themselves
            magnitude = self._conv(codes.abs(), self.codes.abs())
            largest = float(magnitude.max()) if magnitude.numel() else 0.0
        self.largest_sum = max(self.largest_sum, largest)
        if largest < EXACT_SUM_LIMIT:
            summed = self._conv(codes, self.codes)
            if torch.equal(summed, torch.round(summed)):  # integer sums, as they must be unless a kernel approximates
                return summed * self.multiplier + self.bias
        summed = self._conv(codes.double(), self.codes.double())
        return summed.float() * self.multiplier + self.bias

    def _conv(self, x, weight):
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


def quantized_convs(convs: dict) -> set[str]:
    """The convs with quantized weights and a quantized input: the ones that can accumulate codes."""
    return {name for name, spec in convs.items() if spec.codes is not None and spec.act_key is not None}


def check_exact_parity(model, meta: dict, graph: onnx.ModelProto, parity_set, budgets, img_size: int,
                       decode: bool, cpu_form=None) -> ExactResult:
    """Both sides in exact arithmetic on the parity set's inputs, through the gate's comparison.

    `graph` is the TensorRT form. With `cpu_form` (the path of its CPU re-encoding) the two are also run as written
    on the same inputs, and must agree bit for bit: the CPU form is then as exact as the form checked here.
    """

    convs, acts, folded = torch_graph.conv_specs(model)
    candidates = quantized_convs(convs)
    layers = rewritable_convs(graph, candidates)
    wrapper = exact_reference(folded, convs, acts, meta, img_size, decode, layers)
    runner = TorchRunner(wrapper, parity_set.input_names, parity_set.output_names)
    # One pass computes the reference and measures every conv's largest sum on these images; only when a conv's
    # sums leave float32's exact integers is it switched to float sums (on both sides) and the pass repeated.
    reference = run_in_chunks(runner, parity_set.inputs, batch_size=1)
    modules = {name: folded.get_submodule(name) for name in layers}
    too_large = {name for name, module in modules.items() if module.largest_sum >= EXACT_SUM_LIMIT}
    for name in too_large:
        modules[name].exact = False
    layers -= too_large
    kept = sorted(too_large | (candidates - layers))
    if too_large:
        reference = run_in_chunks(runner, parity_set.inputs, batch_size=1)
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
            with OrtRunner(Path(folder) / "trt_form.onnx") as trt_runner:  # one session at a time: peak memory
                trt_out = run_in_chunks(trt_runner, parity_set.inputs, batch_size=1)
            with OrtRunner(cpu_form) as cpu_runner:
                cpu_out = run_in_chunks(cpu_runner, parity_set.inputs, batch_size=1)
            cpu_identical = all(np.array_equal(trt_out[name], cpu_out[name]) for name in trt_out)
    # the raw head maps; decoded boxes (--decode) pass through exp/sigmoid, which the two runtimes round differently
    heads = parity_set.meta.head_output_names or list(reference)
    outputs = report.to_dict()["outputs"]
    identical = all(name in outputs and outputs[name].get("finite") and outputs[name].get("max_abs_error") == 0
                    for name in heads)
    return ExactResult(report, identical, sorted(layers), kept, cpu_identical, reference)


# --------------------------------------------------------------------------------------------- runners
class TorchRunner(Runner):
    """A PyTorch module behind the runner interface; its forward returns the outputs in `output_names` order."""

    def __init__(self, module, input_names, output_names, device: str = "cpu"):
        self.module = module.eval()
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.device = device

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            inputs = (torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in self.input_names)
            outputs = self.module(*inputs)
            # .cpu() waits for the GPU, so a timed call covers the whole inference
            return {name: value.float().cpu().numpy() for name, value in zip(self.output_names, outputs)}

    def close(self) -> None:
        self.module = None
