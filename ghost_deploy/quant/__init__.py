"""Quantization: deployable quantizers, BN folding, the bit plan, and HQ / budget bit selection."""
from .bitplan import (BitPlan, LayerPlan, average_weight_bits, bops, check_plan_against_model, format_plan_table,
                      plan_from_bits, profile_model, size_mb, uniform_plan)
from .fold import fold_bn
from .hq import budget_plan, hq_plan, kmeans_1d
from .quantizers import (ActQuantizer, QuantConv2d, WeightQuantizer, act_quantizers, calibrate_activations,
                         is_quantized, quant_layers, quantize_model)

__all__ = [
    "BitPlan", "LayerPlan", "average_weight_bits", "bops", "check_plan_against_model", "format_plan_table",
    "plan_from_bits", "profile_model", "size_mb", "uniform_plan",
    "fold_bn", "budget_plan", "hq_plan", "kmeans_1d",
    "ActQuantizer", "QuantConv2d", "WeightQuantizer", "act_quantizers", "calibrate_activations", "is_quantized",
    "quant_layers", "quantize_model",
]
