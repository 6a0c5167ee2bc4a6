"""Size and BOPs of a bit plan in three conventions: the GHOST reference as coded, corrected, deployable.

The paper's size and BOPs come from the reference's analytic count (ghost-algorithm.md §6.4), not from a
deployed model. Its conventions, re-implemented here from that description:

- every conv in `named_modules` order (the reference's profiler registration order, which is also the
  plan's order); N = the convs before Detect, with weight bits b_i; the Detect convs stay float (B7).
  Params and MACs are counted as the reference's profiler counts them: a conv with its own bias (Detect
  only) adds its bias elements to the params and one add per output element to the MACs.
- size = (sum_{i<N} P_i * b_i / 8 + sum_{j in FP} 4 * P_j) / 1e6: conv weights only, BN ignored.
- BOPs = MAC_0 * b_0 * 32 (the image is 32-bit) + sum_{0<i<N} MAC_i * b_i * a_i + sum_{j in FP} MAC_j * 32 * a_j.

`reference_as_coded` keeps bug B10: the float set is the nl indices *ending* at N (for three heads
{N-2, N-1, N}: the last two convs before Detect are counted twice, once at 32 bits, and Detect m.1 and m.2
are left out), a_i is b_{i-1} (the previous conv in list order) and the float set is charged 32 x 32.
`corrected` fixes the indexing (FP = the Detect convs) and gives each conv's input the weight bits of the
conv that produced it: the reference quantizes a Conv block's ReLU output with that block's weight bits,
Detect included (its input is a quantized activation). `deployable` is the project's own count
(`bitplan.size_mb` / `bitplan.bops`): every conv quantized at its plan bits, 8-bit activations, the image
quantized too, per-channel scales, biases and activation scales stored as float32.

Torch-free: it reads only the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ghost_deploy.bitplan import FLOAT_BITS, FLOAT_BYTES, BitPlan, bops, size_mb

IMAGE_BITS = 32  # the reference counts the input image as a 32-bit tensor
CONVENTIONS = ("reference_as_coded", "corrected", "deployable")


@dataclass(frozen=True)
class Cost:
    size_mb: float
    bops_g: float

    def to_dict(self, digits: int = 4) -> dict:
        return {"size_mb": round(self.size_mb, digits), "bops_g": round(self.bops_g, digits)}


@dataclass(frozen=True)
class RefConv:
    """One conv as the reference's profiler sees it."""
    name: str
    params: int
    macs: int
    weight_bits: int  # 32 for the Detect convs, whatever the plan says (B7)


def head_names(plan: BitPlan) -> list[str]:
    """The Detect convs: the plan's last module (e.g. `model.24.m.0` .. `m.2`), which must come last."""
    names = list(plan.layers)
    prefix = ".".join(names[-1].split(".")[:2]) + "."
    head = [name for name in names if name.startswith(prefix)]
    if names[-len(head):] != head:
        raise ValueError(f"the Detect convs ({prefix}*) are not the last layers of the plan")
    return head


def reference_convs(plan: BitPlan) -> tuple[list[RefConv], int]:
    """The plan's convs with the reference's counts and bits, and N (the number of convs before Detect)."""
    head = set(head_names(plan))
    convs = []
    for name, layer in plan.layers.items():
        params, macs = layer.params, layer.macs
        if name in head and layer.bias_params:  # a conv's own bias: only Detect has one in the reference
            out_elems = layer.macs // (layer.params // layer.out_channels)
            params, macs = params + layer.bias_params, macs + out_elems
        convs.append(RefConv(name, params, macs, FLOAT_BITS if name in head else layer.weight_bits))
    return convs, len(convs) - len(head)


def _cost(convs: list[RefConv], n: int, float_set, input_bits: list[float], float_input_bits) -> Cost:
    """The reference's formula over convs 0..N-1 (quantized) and `float_set` (float weights)."""
    size = sum(conv.params * conv.weight_bits / 8 for conv in convs[:n])
    size += sum(FLOAT_BYTES * convs[j].params for j in float_set)
    total = sum(conv.macs * conv.weight_bits * bits for conv, bits in zip(convs[:n], input_bits))
    total += sum(convs[j].macs * FLOAT_BITS * float_input_bits(j) for j in float_set)
    return Cost(size / 1e6, total / 1e9)


def reference_as_coded(plan: BitPlan) -> Cost:
    """The reference's count with bug B10: float set {N-nl+1..N}, previous conv's bits, 32 x 32 for the head."""
    convs, n = reference_convs(plan)
    heads = len(convs) - n
    float_set = range(n - heads + 1, n + 1)
    input_bits = [IMAGE_BITS] + [conv.weight_bits for conv in convs[: n - 1]]
    return _cost(convs, n, float_set, input_bits, lambda j: FLOAT_BITS)


def producer_bits(plan: BitPlan) -> dict[str, float]:
    """Each conv's input bits in the paper's convention, for a plan whose quantized convs share one width.

    The input of a conv is the output of the Conv block(s) that made it, quantized at their weight bits; the
    stem reads the 32-bit image. Which block made which tensor is not in the plan, so a mixed plan needs
    its own mapping (`corrected(plan, input_bits=...)`).
    """
    convs, n = reference_convs(plan)
    widths = {conv.weight_bits for conv in convs[:n]}
    if len(widths) != 1:
        raise ValueError(f"the convs before Detect have {len(widths)} weight widths: pass input_bits for a mixed plan")
    width = widths.pop()
    return {conv.name: IMAGE_BITS if index == 0 else width for index, conv in enumerate(convs)}


def corrected(plan: BitPlan, input_bits: Mapping[str, float] | None = None) -> Cost:
    """The reference's convention with B10 fixed: FP = the Detect convs, inputs at their producer's bits."""
    convs, n = reference_convs(plan)
    bits = producer_bits(plan) if input_bits is None else input_bits
    missing = [conv.name for conv in convs[1:] if conv.name not in bits]
    if missing:
        raise ValueError(f"input_bits has no entry for {missing[0]!r}")
    inputs = [IMAGE_BITS] + [bits[conv.name] for conv in convs[1:n]]
    return _cost(convs, n, range(n, len(convs)), inputs, lambda j: bits[convs[j].name])


def deployable(plan: BitPlan) -> Cost:
    """What the project's exported model stores and computes (`bitplan.size_mb`, `bitplan.bops`)."""
    return Cost(size_mb(plan), bops(plan) / 1e9)


def all_conventions(plan: BitPlan) -> dict[str, Cost]:
    """{convention: Cost} for a uniform plan (see `corrected` for mixed ones)."""
    return {"reference_as_coded": reference_as_coded(plan), "corrected": corrected(plan),
            "deployable": deployable(plan)}
