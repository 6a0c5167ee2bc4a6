"""Quantizers that deploy exactly: TensorRT explicit quantization is signed, symmetric, zero-point 0.

- Weights: per output channel, b-bit codes in [-(2^(b-1)-1), 2^(b-1)-1] (b in 2..8), one learned scale per
  channel (LSQ), so w_q = codes * scale is exactly what an INT8 DequantizeLinear of those codes computes.
- Activations: per tensor, signed b-bit (8 by default: [-128, 127] like TensorRT's Q), one learned scale
  (LSQ), calibrated from data.
- Placement: the *input* of every conv is quantized (TensorRT's recommended Q/DQ placement). Convs that read
  the same tensor share one ActQuantizer, held once in `model.act_quantizers` (ModuleDict keyed by tensor name,
  or by scale group: one quantizer across a Concat and its inputs, see quant/trace.py).

Both paths compute round(x * (1/s)) like `torch.fake_quantize_*` and TensorRT (reciprocal scale), so train
and eval forwards, the exported codes and the traced Q/DQ ops agree bit for bit.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ghost_deploy.errors import UserError
from ghost_deploy.quant import trace as tracing

MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 32
MIN_SCALE = 1e-8
ACT_QUANTIZERS = "act_quantizers"
# Calibration keeps at most this many |x| samples per quantizer for the MSE clip search.
CALIB_SAMPLES = 1 << 20
CALIB_SAMPLES_PER_BATCH = 1 << 16


def qrange(bits: int) -> tuple[int, int]:
    """Weight codes: narrow symmetric range, no -2^(b-1) code, so negating a code (BN folding) stays in range."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def act_qrange(bits: int) -> tuple[int, int]:
    """Activation codes: the full signed range, exactly what a QuantizeLinear to INT8 (INT4) saturates to.

    Conv inputs here are never negative (ReLU outputs, images), so the extra -2^(b-1) code is never used;
    matching the deployed Q op keeps torch and ONNX/TensorRT identical (and torch's ONNX exporter accepts
    only (-128, 127) for a signed fake-quant).
    """
    qmin, qmax = qrange(bits)
    return qmin - 1, qmax


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator); the value is exactly round(x)."""
    return x + (x.round() - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Exactly the value of x, gradient times `factor` (LSQ's step-size gradient scale)."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """LSQ fake quantization: clamp(round(x/s)) * s with STE; `scale` broadcasts against x."""
    return round_ste(torch.clamp(x * scale.reciprocal(), qmin, qmax)) * scale


def _mse_scales(values: torch.Tensor, absmax: torch.Tensor, qmin: int, qmax: int, steps: int = 64,
                max_columns: int = 2048) -> torch.Tensor:
    """Per row of `values`, the scale absmax*alpha/qmax (alpha in (0, 1]) with the smallest quantization MSE.

    Long rows are searched on a deterministic strided subsample of `max_columns` values (LSQ refines the
    scale afterwards; the search only has to start it near the optimum).
    """
    if values.shape[1] > max_columns:
        values = values[:, :: -(-values.shape[1] // max_columns)]
    # Dense near alpha = 1 (8 bit), reaching down to 1/20 (2 bit on heavy-tailed weights).
    alphas = torch.logspace(0, -1.3, steps, dtype=values.dtype, device=values.device)
    errors = []
    chunk = max(1, (1 << 22) // max(values.numel(), 1))  # candidates evaluated together, ~16 MB at a time
    for start in range(0, steps, chunk):
        scale = (absmax[None, :] * alphas[start:start + chunk, None] / qmax).clamp_min(MIN_SCALE)[..., None]
        err = values[None] * scale.reciprocal()
        errors.append(err.round_().clamp_(qmin, qmax).mul_(scale).sub_(values[None]).pow_(2).mean(dim=2))
    errors = torch.cat(errors)  # (steps, rows)
    best = errors.argmin(dim=0)  # first minimum: the largest clip among equals
    return (absmax * alphas[best] / qmax).clamp_min(MIN_SCALE)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric b-bit weight quantizer with a learned (LSQ) scale per channel."""

    def __init__(self, out_channels: int, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = qrange(self.bits)
        self.scale = nn.Parameter(torch.ones(out_channels))

    @torch.no_grad()
    def init_scale(self, weight: torch.Tensor, method: str = "mse") -> None:
        """Set each channel's scale from the weights: the MSE-optimal clip ("mse") or max|w| ("max")."""
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        absmax = rows.abs().amax(dim=1)
        # A channel of zeros has any scale; borrow the layer's typical one so LSQ starts sensibly.
        fallback = absmax[absmax > 0].mean() if (absmax > 0).any() else torch.tensor(1.0)
        absmax = torch.where(absmax > 0, absmax, fallback)
        if method == "mse":
            scale = _mse_scales(rows, absmax, self.qmin, self.qmax)
        elif method == "max":
            scale = absmax / self.qmax
        else:
            raise ValueError(f"unknown scale init {method!r} (mse or max)")
        self.scale.copy_(scale.clamp_min(MIN_SCALE))

    def effective_scale(self, weight: torch.Tensor) -> torch.Tensor:
        per_channel = weight[0].numel()
        factor = 1.0 / math.sqrt(per_channel * self.qmax)
        return grad_scale(self.scale.clamp_min(MIN_SCALE), factor)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.effective_scale(weight).view(-1, *([1] * (weight.dim() - 1)))
        return fake_quantize(weight, scale, self.qmin, self.qmax)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (int8) such that forward(weight) == codes * scale exactly."""
        scale = self.scale.clamp_min(MIN_SCALE).view(-1, *([1] * (weight.dim() - 1)))
        return torch.clamp(torch.round(weight * scale.reciprocal()), self.qmin, self.qmax).to(torch.int8)

    def extra_repr(self) -> str:
        return f"out_channels={self.scale.numel()}, bits={self.bits}"


class _FixedScaleFakeQuant(torch.autograd.Function):
    """torch.fake_quantize_per_tensor_affine's numbers (x * (1/s), round half to even, clamp, times s) and its
    straight-through backward, from plain vectorised ops: ~4x faster on CPU than the fused kernel."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        codes = (x * scale.reciprocal()).round_()
        in_range = (codes >= qmin) & (codes <= qmax)
        ctx.save_for_backward(in_range)
        return codes.clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (in_range,) = ctx.saved_tensors
        return grad * in_range, None, None, None


class ActQuantizer(nn.Module):
    """Per-tensor symmetric signed b-bit activation quantizer, zero-point 0, learned (LSQ) scale.

    `observing = True` turns it into a calibration observer: the input passes through unchanged while
    max|x| and a subsample of |x| are recorded; `finish_observation()` sets the scale from them.
    """

    def __init__(self, bits: int = 8, unsigned: bool = False):
        super().__init__()
        if unsigned:
            raise ValueError("only signed activation quantizers deploy on TensorRT (zero-point must be 0)")
        self.bits = int(bits)
        self.qmin, self.qmax = act_qrange(self.bits)
        # Default: clip at 1.0, right for [0, 1] images before any calibration.
        self.scale = nn.Parameter(torch.tensor(1.0 / self.qmax))
        self.observing = False
        self._reset_observation()

    def _reset_observation(self) -> None:
        self._absmax = 0.0
        self._samples: list[torch.Tensor] = []
        self._sample_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        frozen = not self.scale.requires_grad  # a calibrated scale kept fixed in QAT: no LSQ gradient to compute
        if self.training and frozen:
            return _FixedScaleFakeQuant.apply(x.float(), self.scale.detach().clamp_min(MIN_SCALE), self.qmin, self.qmax).to(x.dtype)
        if not self.training and x.dtype == torch.float32:
            # The public fake-quant op: the same numbers, STE backward, and it exports as QuantizeLinear/DequantizeLinear.
            zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
            scale = self.scale.detach().clamp_min(MIN_SCALE)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.qmin, self.qmax)
        factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        # PyTorch's fused LSQ op: the same values as fake_quantize(), STE for x, LSQ's scale gradient times
        # `factor`, in one kernel (composing the elementwise ops made a QAT step ~1.8x a float step).
        # In float32 even under autocast: x / s reaches 127, where fp16 cannot tell codes apart.
        scale = self.scale.clamp_min(MIN_SCALE).float().reshape(1)
        zero_point = torch.zeros(1, dtype=torch.float32, device=x.device)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x.float(), scale, zero_point, self.qmin, self.qmax, factor).to(x.dtype)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        values = x.detach().abs().flatten().float()
        self._absmax = max(self._absmax, float(values.max()) if values.numel() else 0.0)
        if self._sample_count < CALIB_SAMPLES and values.numel():
            step = max(1, values.numel() // CALIB_SAMPLES_PER_BATCH)  # deterministic stride subsample
            sample = values[::step].cpu()
            self._samples.append(sample)
            self._sample_count += sample.numel()

    @torch.no_grad()
    def finish_observation(self, method: str = "mse", percentile: float = 99.99) -> None:
        """Scale from what was observed: "mse" (best clip of |x|), "max", or "percentile"; then stop observing."""
        self.observing = False
        if self._absmax <= 0:
            self._reset_observation()
            return  # never saw a non-zero value: keep the current scale
        if method == "max":
            clip = torch.tensor(self._absmax)
            scale = clip / self.qmax
        elif method == "percentile":
            samples = torch.cat(self._samples)
            clip = torch.quantile(samples[: 1 << 24], percentile / 100.0).clamp_min(MIN_SCALE)
            scale = clip / self.qmax
        elif method == "mse":
            samples = torch.cat(self._samples)[None]
            scale = _mse_scales(samples, torch.tensor([self._absmax]), self.qmin, self.qmax, max_columns=CALIB_SAMPLES)[0]
        else:
            raise ValueError(f"unknown calibration method {method!r} (mse, max or percentile)")
        self.scale.copy_(scale.clamp_min(MIN_SCALE).to(self.scale))
        self._reset_observation()

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class QuantConv2d(nn.Module):
    """A Conv2d with quantized weights (`weight_quantizer`) and a quantized input (`input_quantizer`).

    Holds the float latent `weight` (and `bias`) under the same names as nn.Conv2d, so it replaces a conv in
    place and its state_dict keys stay `model.3.conv.weight`. `input_quantizer` is a plain reference: the
    module is registered once, in the model's `act_quantizers`. `quantizes_input` is False when an enclosing
    block (C3, Bottleneck) already quantized the tensor for every reader, including the residual add.
    """

    def __init__(self, conv: nn.Conv2d, weight_bits: int | None, act_bits: int | None = None,
                 input_quantizer: ActQuantizer | None = None, scale_init: str = "mse"):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports zero padding only")
        self.weight = nn.Parameter(conv.weight.detach().clone())
        bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.register_parameter("bias", bias)  # registered even when None, like nn.Conv2d (BN folding adds one)
        weight_bits = None if weight_bits in (None, FLOAT_BITS) else int(weight_bits)
        self.weight_quantizer = WeightQuantizer(self.out_channels, weight_bits) if weight_bits else None
        if self.weight_quantizer is not None:
            self.weight_quantizer.init_scale(self.weight, scale_init)
        if act_bits not in (None, FLOAT_BITS) and input_quantizer is None:
            input_quantizer = ActQuantizer(act_bits)  # standalone use; quantize_model passes a shared one
        if input_quantizer is not None and act_bits not in (None, FLOAT_BITS) and input_quantizer.bits != act_bits:
            raise ValueError(f"input quantizer has {input_quantizer.bits} bits, the layer asks for {act_bits}")
        self.__dict__["input_quantizer"] = input_quantizer  # not registered: one owner, many readers
        self.quantizes_input = True

    @property
    def weight_bits(self) -> int | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizes_input and self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    # What the exporter reads.
    def weight_codes(self) -> torch.Tensor:
        """int8 codes (out, in/groups, k, k); the deployed weight is codes * weight_scale()[:, None, None, None]."""
        if self.weight_quantizer is None:
            raise ValueError("this conv keeps float weights (weight_bits is None)")
        return self.weight_quantizer.codes(self.weight)

    def weight_scale(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            raise ValueError("this conv keeps float weights (weight_bits is None)")
        return self.weight_quantizer.scale.detach().clamp_min(MIN_SCALE).clone()

    def input_scale(self) -> torch.Tensor:
        """Scalar scale of the (shared) input quantizer."""
        if self.input_quantizer is None:
            raise ValueError("this conv reads a float input (act_bits is None)")
        return self.input_quantizer.scale.detach().clamp_min(MIN_SCALE).clone()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"weight_bits={self.weight_bits}, act_bits={self.act_bits}, bias={self.bias is not None}")


def _quantize_block_input(module: nn.Module, args):
    """Forward pre-hook: quantize a block's input once for all its readers (the convs and the residual add)."""
    return (module.__dict__["input_quantizer"](args[0]), *args[1:])


def quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d]]:
    """Every QuantConv2d of the model, in `named_modules` order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantConv2d)]


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    holder = getattr(model, ACT_QUANTIZERS, None)
    return dict(holder.items()) if holder is not None else {}


def is_quantized(model: nn.Module) -> bool:
    return bool(quant_layers(model))


def quantize_model(model: nn.Module, plan, calib_batches: Iterable | None = None, example_inputs=None,
                   scale_init: str = "mse", calib_method: str = "mse") -> nn.Module:
    """Insert quantizers per `plan` (a BitPlan), in place; returns the model.

    Every conv in the plan becomes a QuantConv2d (a layer with weight and input both float stays nn.Conv2d).
    Readers of one tensor share one ActQuantizer in `model.act_quantizers[<key>]`, the key being the plan's
    `act_quantizer` (one scale across a Concat and its inputs) or, for plans without it, the tensor's name. When a block
    receives that tensor as its own input (C3 for cv1+cv2, a Bottleneck for cv1 + the residual add), the
    block quantizes it once in a forward pre-hook, so the skip add reads the same Q/DQ tensor as cv1.
    """
    if is_quantized(model):
        raise ValueError("model is already quantized")
    inputs = tuple(example_inputs) if example_inputs is not None else tracing.example_inputs(model)
    trace = tracing.trace_model(model, inputs)
    sites = {site.name: site for site in trace.sites}
    _check_plan_matches(plan, sites)

    keys = _quantizer_keys(plan, trace.sites)
    groups: dict[str, list[str]] = {}
    for site in trace.sites:
        groups.setdefault(keys[site.name], []).append(site.name)
    holder = nn.ModuleDict()
    for key, readers in groups.items():
        bits = {_bits_or_none(plan.layers[name].act_bits) for name in readers}
        if len(bits) > 1:
            shown = ", ".join(f"{name}={plan.layers[name].act_bits}" for name in readers)
            raise UserError(plan.source, f"layers reading through activation quantizer {key!r} must have the same "
                                         f"act_bits ({shown})")
        (bits,) = bits
        if bits is not None:
            holder[key] = ActQuantizer(bits)
    setattr(model, ACT_QUANTIZERS, holder)

    for site in trace.sites:
        entry = plan.layers[site.name]
        weight_bits, act_bits = _bits_or_none(entry.weight_bits), _bits_or_none(entry.act_bits)
        if weight_bits is None and act_bits is None:
            continue
        quantizer = holder[keys[site.name]] if act_bits is not None else None
        qconv = QuantConv2d(site.module, weight_bits, act_bits, quantizer, scale_init=scale_init)
        parent_name, _, attr = site.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, qconv)

    _install_block_hooks(model, trace)
    _install_output_quantizers(model, plan, holder)
    model.bit_plan = plan
    if calib_batches is not None:
        calibrate_activations(model, calib_batches, method=calib_method)
    return model


def _quantize_block_output(module: nn.Module, args, output):
    """Forward hook: the conv block's (ReLU'd) output on the plan's `output_bits` grid."""
    return module.__dict__["output_quantizer"](output)


def output_quantizer_key(layer: str) -> str:
    """Key in `model.act_quantizers` of a conv block's output quantizer: the block's tensor name."""
    return layer.rpartition(".")[0].replace(".", "_") if layer.endswith(".conv") else f"{layer.replace('.', '_')}_out"


def _install_output_quantizers(model: nn.Module, plan, holder: nn.ModuleDict) -> None:
    """A quantizer after the conv block of every layer with `output_bits` (the last conv of a residual branch)."""
    for name, entry in plan.layers.items():
        bits = _bits_or_none(entry.output_bits)
        if bits is None:
            continue
        key = output_quantizer_key(name)
        if key in holder:
            raise UserError(plan.source, f"layer {name!r}: output quantizer {key!r} clashes with an input quantizer")
        holder[key] = ActQuantizer(bits)
        block = model.get_submodule(name.rpartition(".")[0]) if name.endswith(".conv") else model.get_submodule(name)
        block.__dict__["output_quantizer"] = holder[key]
        block.register_forward_hook(_quantize_block_output)


def _quantizer_keys(plan, sites) -> dict[str, str]:
    """{conv: key of its input quantizer}: the plan's scale group, or the tensor's own name for plans without
    groups; readers of one tensor must end up on one quantizer."""
    keys, by_tensor = {}, {}
    for site in sites:
        key = plan.layers[site.name].act_quantizer or site.input_tensor
        first = by_tensor.setdefault(site.input_tensor, (site.name, key))
        if first[1] != key:
            raise UserError(plan.source, f"layer {site.name!r}: act_quantizer {key!r} differs from {first[0]!r} "
                                         f"({first[1]!r}), which reads the same tensor")
        keys[site.name] = key
    return keys


def _bits_or_none(bits) -> int | None:
    return None if bits in (None, FLOAT_BITS) else int(bits)


def _check_plan_matches(plan, sites: dict) -> None:
    unknown = [name for name in plan.layers if name not in sites]
    if unknown:
        raise UserError(plan.source, f"unknown layer {unknown[0]!r} (not a conv of this model)")
    missing = [name for name in sites if name not in plan.layers]
    if missing:
        raise UserError(plan.source, f"layer {missing[0]!r} is missing from the plan")


def _install_block_hooks(model: nn.Module, trace: tracing.Trace) -> None:
    """Quantize a shared tensor once, in the smallest block that receives it and holds all its readers.

    Walking up from a conv, the ancestors that received the very same tensor form a chain. The hook goes on
    the innermost chain member that contains every reader of the tensor under the chain's top (C3 for
    cv1+cv2) and any residual block on the chain (a module with `add == True`: the Bottleneck, whose skip
    add must read the quantized tensor). When that member is the conv itself, the conv quantizes its input.
    """
    readers: dict[int, list[str]] = {}
    for name, qconv in quant_layers(model):
        if qconv.input_quantizer is not None:
            readers.setdefault(trace.conv_inputs[name], []).append(name)
    hook_points: dict[str, ActQuantizer] = {}
    for name, qconv in quant_layers(model):
        if qconv.input_quantizer is None:
            continue
        tensor = trace.conv_inputs[name]
        parts = name.split(".")
        chain = [name]
        for depth in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:depth])
            if trace.module_inputs.get(ancestor) != tensor:
                break
            chain.append(ancestor)

        def under(block: str) -> set[str]:
            return {r for r in readers[tensor] if r == block or r.startswith(block + ".")}

        lowest = max((i for i, block in enumerate(chain) if getattr(model.get_submodule(block), "add", False) is True),
                     default=0)
        wanted = under(chain[-1])
        point = next(block for i, block in enumerate(chain) if i >= lowest and under(block) == wanted)
        if point != name:
            qconv.quantizes_input = False
            hook_points[point] = qconv.input_quantizer
    for point, quantizer in hook_points.items():
        block = model.get_submodule(point)
        block.__dict__["input_quantizer"] = quantizer
        block.register_forward_pre_hook(_quantize_block_input)


def _as_inputs(batch, model: nn.Module, device) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    elif isinstance(batch, dict):
        batch = tuple(batch[name] for name in model.input_names)
    return tuple(t.to(device) for t in batch)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable, method: str = "mse") -> nn.Module:
    """Initialise every activation scale from data: observe the batches (eval mode), then set the scales.

    A batch is a tensor, a tuple/list of tensors in `model.input_names` order, or a dict with those keys.
    """
    quantizers = list(act_quantizers(model).values())
    if not quantizers:
        return model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # BN running statistics must not move during calibration
    for quantizer in quantizers:
        quantizer._reset_observation()
        quantizer.observing = True
    seen = 0
    try:
        for batch in batches:
            model(*_as_inputs(batch, model, device))
            seen += 1
    finally:
        for quantizer in quantizers:
            if seen:
                quantizer.finish_observation(method)
            quantizer.observing = False
        model.train(was_training)
    return model
