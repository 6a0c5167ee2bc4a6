"""The bit plan of a quantized checkpoint, as bench reports it: its totals and the bits of every layer."""
from __future__ import annotations

from ghost_deploy.bitplan import FLOAT_BITS, BitPlan


def _bits(value: int) -> int | None:
    return None if value == FLOAT_BITS else value  # null = float in the JSON


def plan_summary(plan: BitPlan, source) -> dict:
    """{source, method, image_size, size_mb, conv_weights_mb, bops_g, avg_weight_bits, layers: [...], notes}."""
    notes = [f"bit plan BOPs are per image at {plan.image_size} px (MACs as the plan recorded them)"] if plan.image_size else []
    totals = plan.totals
    return {
        "source": str(source), "method": plan.method, "image_size": plan.image_size, "size_mb": totals["size_mb"],
        "conv_weights_mb": totals["conv_weights_mb"], "bops_g": totals["bops_g"],
        "avg_weight_bits": totals["avg_weight_bits"],
        "layers": [{"name": name, "weight_bits": _bits(layer.weight_bits), "act_bits": _bits(layer.act_bits),
                    "params": layer.params, "macs": layer.macs} for name, layer in plan.layers.items()],
        "notes": notes,
    }
