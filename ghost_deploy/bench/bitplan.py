"""The bit plan of a quantized checkpoint, as bench reports it: analytic size, BOPs, bits per layer.

The numbers come from `ghost_deploy.quant.bitplan` (size_mb, bops); bench only reads the plan stored in
the checkpoint and lays it out per layer for the report and the bits-per-layer plot.
"""
from __future__ import annotations

import os


def plan_summary(checkpoint: str | os.PathLike) -> dict:
    """{source, method, image_size, size_mb, conv_weights_mb, bops_g, avg_weight_bits, layers: [...], notes}."""
    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.quant.bitplan import FLOAT_BITS, BitPlan, average_weight_bits, bops, size_mb

    plan = BitPlan.from_dict(read_meta(checkpoint)["bit_plan"], source=checkpoint)
    notes = []
    if plan.image_size:
        notes.append(f"bit plan BOPs are per image at {plan.image_size} px (MACs as the plan recorded them)")
    bits = lambda value: None if value == FLOAT_BITS else value  # noqa: E731  (null = float in the JSON)
    return {
        "source": str(checkpoint), "method": plan.method, "image_size": plan.image_size,
        "size_mb": size_mb(plan), "conv_weights_mb": size_mb(plan, conv_weights_only=True),
        "bops_g": bops(plan) / 1e9, "avg_weight_bits": average_weight_bits(plan)["param_weighted"],
        "layers": [{"name": name, "weight_bits": bits(layer.weight_bits), "act_bits": bits(layer.act_bits),
                    "params": layer.params, "macs": layer.macs} for name, layer in plan.layers.items()],
        "notes": notes,
    }
