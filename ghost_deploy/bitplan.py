"""The bit plan: one data structure from HQ to the engine receipt.

A plan maps every conv (module path, e.g. `model.2.cv1.conv`) to its weight bits, the bits of the tensor
that feeds it, its cost (params, MACs per image) and why those bits were chosen. It is saved as
human-editable JSON; see docs/quantization.md for the schema. 32 bits means "stays float".
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

from ghost_deploy.errors import UserError
from ghost_deploy.io import parse_user_json, read_user_json, write_json_atomic

FORMAT = "ghost-deploy/bit-plan"
VERSION = 1
FLOAT_BITS = 32
MIN_BITS, MAX_BITS = 2, 8
# Bytes of one float parameter (bias, per-channel scale) in the deployed model.
FLOAT_BYTES = 4
LAYER_KEYS = ("weight_bits", "act_bits", "params", "macs", "criterion", "input_tensor", "act_quantizer", "out_channels",
              "bias_params", "output_bits")
# Written only when set: plans of earlier versions (and float outputs) read back unchanged.
OPTIONAL_LAYER_KEYS = {"output_bits": 32}
PLAN_KEYS = ("format", "version", "model_name", "method", "threshold", "budget", "image_size", "notes", "summary",
             "layers")


@dataclass
class LayerPlan:
    weight_bits: int  # 2..8, or 32 = float weights (None is accepted and stored as 32)
    act_bits: int  # bits of this conv's input quantizer (shared by all readers of the tensor); 32 = float input
    params: int  # weight elements
    macs: int  # multiply-accumulates per image at the plan's image size
    criterion: str = ""  # why these bits, e.g. "kmeans D(4)=0.07<0.1"
    input_tensor: str = ""  # name of the tensor feeding the conv
    # The activation quantizer (one scale) it reads through: shared across a Concat and its inputs (trace.py).
    # "" (plans written before scale groups): one quantizer per tensor, named input_tensor.
    act_quantizer: str = ""
    out_channels: int = 0
    bias_params: int = 0  # float bias after BN folding (or the conv's own bias)
    # Bits of a quantizer on the conv block's output (after its ReLU); 32 = float output, the default. Set on the
    # last conv of a residual branch, it puts both inputs of the residual add on integer grids, so an integer
    # compiler (ONNX Runtime's QLinearConv + QLinearAdd) can run the branch without leaving integers.
    output_bits: int = FLOAT_BITS

    def __post_init__(self):
        self.weight_bits = FLOAT_BITS if self.weight_bits is None else self.weight_bits
        self.act_bits = FLOAT_BITS if self.act_bits is None else self.act_bits
        self.output_bits = FLOAT_BITS if self.output_bits is None else self.output_bits

    @property
    def quantizer_key(self) -> str:
        """Key of its input quantizer in `model.act_quantizers`."""
        return self.act_quantizer or self.input_tensor

    @property
    def input_bits(self) -> int:
        """Bits of the tensor that really feeds the layer (its input quantizer), 32 for a float input."""
        return self.act_bits

    @property
    def weight_is_float(self) -> bool:
        return self.weight_bits == FLOAT_BITS


@dataclass
class BitPlan:
    layers: dict[str, LayerPlan]
    method: str = "uniform"  # "hq", "budget", "uniform", "edited", ...
    model_name: str = ""
    threshold: float | None = None  # HQ's T
    budget: dict | None = None  # budget mode's target, e.g. {"avg_bits": 5}
    image_size: int | None = None  # MACs are per image at this input size
    notes: str = ""
    source: str | None = field(default=None, compare=False, repr=False)  # file it was loaded from

    # --- JSON ---
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_name": self.model_name,
            "method": self.method,
            "threshold": self.threshold,
            "budget": self.budget,
            "image_size": self.image_size,
            "notes": self.notes,
            # Informational: recomputed on every save, ignored on load (edit the layers, not this).
            "summary": summary_numbers(self),
            "layers": {name: _layer_dict(layer) for name, layer in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data, source: str | os.PathLike | None = None) -> "BitPlan":
        source = None if source is None else str(source)
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise UserError(source, "not a bit plan: expected a JSON object with a 'layers' mapping")
        if data.get("format", FORMAT) != FORMAT:
            raise UserError(source, f"format is {data.get('format')!r}, expected {FORMAT!r}")
        unknown = sorted(set(data) - set(PLAN_KEYS))
        if unknown:
            raise UserError(source, f"unknown key {unknown[0]!r} (known: {', '.join(PLAN_KEYS)})")
        layers = {}
        for name, entry in data["layers"].items():
            layers[name] = _parse_layer(name, entry, source)
        plan = cls(
            layers=layers,
            method=str(data.get("method", "edited")),
            model_name=str(data.get("model_name", "")),
            threshold=data.get("threshold"),
            budget=data.get("budget"),
            image_size=data.get("image_size"),
            notes=str(data.get("notes", "")),
            source=source,
        )
        _check_shared_inputs(plan)
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike | None = None) -> "BitPlan":
        return cls.from_dict(parse_user_json(text, source, "bit plan"), source)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        """Read a plan file (`quant.plans.check_plan_against_model` then checks it against a model)."""
        return cls.from_dict(read_user_json(path, "bit plan"), source=path)

    # --- views ---
    def summary(self) -> str:
        return format_plan_table(self)

    @functools.cached_property
    def totals(self) -> dict:
        """Size, BOPs and average bits, computed once: every stage reports these (`summary_numbers` rounds them)."""
        average = average_weight_bits(self)
        return {"layers": len(self.layers), "float_layers": sum(layer.weight_is_float for layer in self.layers.values()),
                "size_mb": size_mb(self), "conv_weights_mb": size_mb(self, conv_weights_only=True),
                "bops_g": bops(self) / 1e9, "avg_weight_bits": average["param_weighted"],
                "mean_weight_bits": average["mean"]}

    def weight_bits(self) -> list[int]:
        return [layer.weight_bits for layer in self.layers.values()]


def _layer_dict(layer: LayerPlan) -> dict:
    return {key: getattr(layer, key) for key in LAYER_KEYS
            if key not in OPTIONAL_LAYER_KEYS or getattr(layer, key) != OPTIONAL_LAYER_KEYS[key]}


def _parse_layer(name: str, entry, source: str | None) -> LayerPlan:
    if isinstance(entry, int) and not isinstance(entry, bool):
        entry = {"weight_bits": entry}  # shorthand: "model.3.conv": 6
    if not isinstance(entry, dict):
        raise UserError(source, f"layer {name!r}: expected an object with weight_bits/act_bits, got {entry!r}")
    unknown = sorted(set(entry) - set(LAYER_KEYS))
    if unknown:
        raise UserError(source, f"layer {name!r}: unknown key {unknown[0]!r} (known: {', '.join(LAYER_KEYS)})")
    if "weight_bits" not in entry:
        raise UserError(source, f"layer {name!r}: weight_bits is missing")
    values = {}
    for key, default in (("weight_bits", None), ("act_bits", 8), ("output_bits", FLOAT_BITS)):
        values[key] = _parse_bits(name, key, entry.get(key, default), source)
    for key in ("params", "macs", "out_channels", "bias_params"):
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(source, f"layer {name!r}: {key} must be a non-negative integer, got {value!r}")
        values[key] = value
    values["criterion"] = str(entry.get("criterion", ""))
    values["input_tensor"] = str(entry.get("input_tensor", ""))
    values["act_quantizer"] = str(entry.get("act_quantizer", ""))
    return LayerPlan(**values)


def _parse_bits(name: str, key: str, value, source: str | None) -> int:
    if value is None:
        return FLOAT_BITS
    if isinstance(value, bool) or not isinstance(value, int) or not (MIN_BITS <= value <= MAX_BITS or value == FLOAT_BITS):
        raise UserError(source, f"layer {name!r}: {key} {value!r} is not allowed (use {MIN_BITS}..{MAX_BITS}, or 32/null for float)")
    return value


def _check_shared_inputs(plan: BitPlan) -> None:
    """Readers of one tensor share one quantizer, and readers of one quantizer must agree on its bits."""
    tensor_quantizer: dict[str, tuple[str, str]] = {}
    quantizer_bits: dict[str, tuple[str, int]] = {}
    for name, layer in plan.layers.items():
        if not layer.input_tensor:
            continue
        first = tensor_quantizer.setdefault(layer.input_tensor, (name, layer.quantizer_key))
        if first[1] != layer.quantizer_key:
            raise UserError(plan.source, f"layer {name!r}: act_quantizer {layer.quantizer_key!r} differs from {first[0]!r} "
                                         f"({first[1]!r}), which reads the same tensor {layer.input_tensor!r}")
        first = quantizer_bits.setdefault(layer.quantizer_key, (name, layer.act_bits))
        if first[1] != layer.act_bits:
            shared = (f"reads the same tensor {layer.input_tensor!r}" if layer.quantizer_key == layer.input_tensor
                      else f"shares activation quantizer {layer.quantizer_key!r} (set act_quantizer to split them)")
            raise UserError(plan.source, f"layer {name!r}: act_bits {layer.act_bits} differs from {first[0]!r} "
                                         f"({first[1]}), which {shared}")


# --- cost model ---
def size_mb(plan: BitPlan, conv_weights_only: bool = False) -> float:
    """Model size in MB (1e6 bytes).

    conv_weights_only: sum(params * weight_bits / 8), float layers at 4 bytes per weight; the GHOST
    reference formula (test_flops.py), for like-for-like comparisons.
    Otherwise the deployable size: packed codes ceil(params * bits / 8) per layer, plus float32 per-channel
    weight scales, float32 biases (BN-folded or the conv's own) and one float32 scale per activation quantizer.
    """
    total = 0.0
    tensors = set()
    for name, layer in plan.layers.items():
        if conv_weights_only:
            total += layer.params * layer.weight_bits / 8
            continue
        total += math.ceil(layer.params * layer.weight_bits / 8)
        if not layer.weight_is_float:
            total += FLOAT_BYTES * layer.out_channels
        total += FLOAT_BYTES * layer.bias_params
        if layer.act_bits != FLOAT_BITS:
            tensors.add(layer.quantizer_key)
        if layer.output_bits != FLOAT_BITS:
            tensors.add(f"{name}:output")
    total += FLOAT_BYTES * len(tensors)
    return total / 1e6


def bops(plan: BitPlan) -> int:
    """Bit operations per image: sum of MACs * weight_bits * bits of the tensor that really feeds the layer."""
    return sum(layer.macs * layer.weight_bits * layer.input_bits for layer in plan.layers.values())


def average_weight_bits(plan: BitPlan) -> dict[str, float]:
    """Mean weight bits over the quantized layers: weighted by params, and the plain per-layer mean."""
    quantized = [layer for layer in plan.layers.values() if not layer.weight_is_float]
    if not quantized:
        return {"param_weighted": float(FLOAT_BITS), "mean": float(FLOAT_BITS)}
    params = sum(layer.params for layer in quantized)
    weighted = sum(layer.params * layer.weight_bits for layer in quantized) / params if params else 0.0
    return {"param_weighted": weighted, "mean": sum(layer.weight_bits for layer in quantized) / len(quantized)}


def summary_numbers(plan: BitPlan) -> dict:
    """`plan.totals`, rounded as the plan file stores them."""
    digits = {"size_mb": 6, "conv_weights_mb": 6, "bops_g": 4, "avg_weight_bits": 4, "mean_weight_bits": 4}
    return {key: round(value, digits[key]) if key in digits else value for key, value in plan.totals.items()}


def format_plan_table(plan: BitPlan) -> str:
    """One line per layer, then the totals: for logs and `--print-plan`."""
    width = max([len(name) for name in plan.layers] + [5])
    tensor_width = max([len(layer.input_tensor) for layer in plan.layers.values()] + [6])
    lines = [f"bit plan ({plan.method}{', ' + plan.model_name if plan.model_name else ''}"
             f"{f', MACs at {plan.image_size}px' if plan.image_size else ''})",
             f"{'layer':<{width}}  {'W':>2}  {'A':>2}  {'input':<{tensor_width}}  {'params':>9}  {'MMACs':>9}  criterion"]
    for name, layer in plan.layers.items():
        lines.append(f"{name:<{width}}  {_bits_text(layer.weight_bits):>2}  {_bits_text(layer.act_bits):>2}  "
                     f"{layer.input_tensor:<{tensor_width}}  {layer.params:>9}  {layer.macs / 1e6:>9.2f}  {layer.criterion}"
                     + (f" (output {layer.output_bits}-bit)" if layer.output_bits != FLOAT_BITS else ""))
    numbers = summary_numbers(plan)
    lines.append(f"size {numbers['size_mb']:.3f} MB deployable ({numbers['conv_weights_mb']:.3f} MB conv weights only), "
                 f"BOPs {numbers['bops_g']:.1f} G, weight bits {numbers['avg_weight_bits']:.2f} param-weighted / "
                 f"{numbers['mean_weight_bits']:.2f} mean, {numbers['float_layers']} float layers")
    return "\n".join(lines)


def _bits_text(bits: int) -> str:
    return "FP" if bits == FLOAT_BITS else str(bits)


