"""Quantization: deployable quantizers, BN folding, the bit plan, and HQ / budget bit selection."""
from ghost_deploy.bitplan import BitPlan, LayerPlan, average_weight_bits, bops, format_plan_table, size_mb
from ghost_deploy.quant.fold import fold_bn
from ghost_deploy.quant.hq import budget_plan, hq_plan, kmeans_1d
from ghost_deploy.quant.plans import check_plan_against_model, plan_from_bits, profile_model, uniform_plan
from ghost_deploy.quant.quantizers import (
    ActQuantizer,
    QuantConv2d,
    WeightQuantizer,
    act_quantizers,
    calibrate_activations,
    is_quantized,
    quant_layers,
    quantize_model,
)

__all__ = [
    "BitPlan", "LayerPlan", "average_weight_bits", "bops", "check_plan_against_model", "format_plan_table",
    "plan_from_bits", "profile_model", "size_mb", "uniform_plan",
    "fold_bn", "budget_plan", "hq_plan", "kmeans_1d",
    "ActQuantizer", "QuantConv2d", "WeightQuantizer", "act_quantizers", "calibrate_activations", "is_quantized",
    "quant_layers", "quantize_model",
]
