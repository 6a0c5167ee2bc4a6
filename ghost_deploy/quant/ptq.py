"""Post-training quantization: an FP32 checkpoint plus a calibration set -> a quantized checkpoint (stage "ptq").

The baseline GHOST is measured against. Weights per output channel (max|w| or the MSE-optimal clip),
activations per tensor with a choice of calibrator: max, percentile (99.99 % of |x|), MSE, or entropy
(TensorRT's KL-divergence calibrator on a 2048-bin histogram of |x|). INT8 everywhere by default, or any
bit plan (e.g. the GHOST run's, to separate what the plan buys from what training buys).

The result is an ordinary quantized checkpoint: the exporter treats it exactly like a GHOST one (same QDQ
writer, checks and parity gate against the PyTorch model with the same quantizers).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from ghost_deploy.checkpoint import model_from_checkpoint, read_meta, save_checkpoint
from ghost_deploy.data.calib import calib_batches, load_calib_set
from ghost_deploy.errors import UserError
from ghost_deploy.io import sha256_file
from ghost_deploy.quant import (
    BitPlan,
    act_quantizers,
    calibrate_activations,
    check_plan_against_model,
    quantize_model,
    uniform_plan,
)
from ghost_deploy.quant.coverage import as_model_inputs, tensor_absmax
from ghost_deploy.quant.quantizers import MIN_SCALE
from ghost_deploy.quant.trace import example_inputs

CALIBRATORS = ("max", "percentile", "mse", "entropy")
WEIGHT_METHODS = ("max", "mse")
PERCENTILE = 99.99  # what ActQuantizer's "percentile" calibrator keeps
ENTROPY_BINS = 2048  # TensorRT's histogram size


def ptq_checkpoint(fp32_ckpt, out_path, calib_manifest, plan=None, weight_method: str = "mse",
                   act_calibrator: str = "mse", batch_size: int = 8, log=None) -> Path:
    """Quantize the FP32 model of `fp32_ckpt` after training and save it as a checkpoint of stage "ptq".

    plan: None (every conv W8/A8), a BitPlan, a bit plan JSON, or a quantized checkpoint whose plan to use.
    The checkpoint meta records the plan, the calibration set (name, manifest, SHA-256), the calibrator
    and the weight method, and the FP32 checkpoint it came from.
    """

    log = log or (lambda *_: None)
    if weight_method not in WEIGHT_METHODS:
        raise UserError("--weight-method", f"must be one of {', '.join(WEIGHT_METHODS)}, got {weight_method!r}")
    if act_calibrator not in CALIBRATORS:
        raise UserError("--calibrator", f"must be one of {', '.join(CALIBRATORS)}, got {act_calibrator!r}")
    fp32_ckpt = Path(fp32_ckpt)
    stored = read_meta(fp32_ckpt)
    if stored.quantized:
        raise UserError(fp32_ckpt, f"already quantized (stage {stored.stage!r}); "
                                   "PTQ starts from an FP32 checkpoint")
    calib_set = load_calib_set(calib_manifest)  # before the model: a changed file fails fast
    model, meta = model_from_checkpoint(fp32_ckpt, with_sr=False)
    if calib_set.names and list(calib_set.names) != list(meta.names):
        log(f"warning: {calib_set.path} was drawn from a dataset with classes {list(calib_set.names)}, "
            f"the model detects {list(meta.names)}")
    img_size = int(meta.img_size)
    bit_plan = resolve_plan(plan, model, img_size)
    batches = calib_batches(calib_set, img_size, batch_size, model.input_names)
    model = quantize_model(model, bit_plan, example_inputs=example_inputs(model, img_size), scale_init=weight_method)
    calibrate(model, batches, act_calibrator)
    log(f"ptq: {fp32_ckpt} with {bit_plan.method} plan, weights {weight_method}, activations {act_calibrator} on "
        f"{calib_set.name} ({len(calib_set)} pairs)")

    # The FP32 run's metrics and epoch describe the teacher, not this model.
    extra = {k: v for k, v in meta.extra.items() if k not in ("metrics", "epoch", "best", "resume")}
    extra.update({
        "teacher": {"path": str(fp32_ckpt), "sha256": sha256_file(fp32_ckpt), "metrics": meta.get("metrics")},
        "ptq": {"weight_method": weight_method, "act_calibrator": act_calibrator,
                "percentile": PERCENTILE if act_calibrator == "percentile" else None,
                "entropy_bins": ENTROPY_BINS if act_calibrator == "entropy" else None,
                "plan_source": _plan_source(plan), "calib_set": calib_set.record()},
    })
    header = dataclasses.replace(meta, stage="ptq", sr=False, bit_plan=bit_plan, extra=extra)
    return save_checkpoint(out_path, model.eval(), header)


def resolve_plan(plan, model, img_size: int):
    """A BitPlan for `model` from None (uniform W8/A8), a BitPlan, a plan JSON or a quantized checkpoint."""
    if plan is None:
        return uniform_plan(model, weight_bits=8, act_bits=8, image_size=img_size)
    if isinstance(plan, BitPlan):
        check_plan_against_model(plan, model)
        return plan
    path = Path(plan)
    if path.suffix == ".safetensors":
        bit_plan = read_meta(path).bit_plan
        if bit_plan is None:
            raise UserError(path, "checkpoint has no bit plan (an FP32 model); "
                                  "pass a quantized checkpoint or a plan JSON")
    else:
        bit_plan = BitPlan.load(path)
    check_plan_against_model(bit_plan, model)
    return bit_plan


def _plan_source(plan) -> str:
    if plan is None:
        return "uniform W8/A8"
    if isinstance(plan, (str, os.PathLike)):
        return str(plan)
    return plan.source or f"BitPlan ({plan.method})"


# ------------------------------------------------------------------------------------------ calibration
@torch.no_grad()
def calibrate(model, batches, method: str = "mse") -> dict[str, float]:
    """Set every activation scale of a quantized model from `batches`; returns {tensor: scale}.

    max / percentile / mse are ActQuantizer's own calibrators; entropy is computed here from histograms.
    """

    if method not in CALIBRATORS:
        raise UserError("--calibrator", f"must be one of {', '.join(CALIBRATORS)}, got {method!r}")
    if method == "entropy":
        calibrate_entropy(model, batches)
    else:
        calibrate_activations(model, batches, method=method)
    return {name: float(q.scale.detach()) for name, q in act_quantizers(model).items()}


@torch.no_grad()
def collect_histograms(model, batches, bins: int = ENTROPY_BINS) -> dict[str, tuple[np.ndarray, float]]:
    """{tensor: (histogram of |x| over [0, max|x|], max|x|)} per activation quantizer: two passes over
    `batches`, the first for the range, the second for the histogram (quantizers pass values through)."""

    quantizers = act_quantizers(model)
    maxima = tensor_absmax(model, batches)
    histograms = {name: torch.zeros(bins, dtype=torch.float64) for name in quantizers}
    handles = []

    def recorder(name):
        def hook(module, args):
            top = maxima.get(name, 0.0)
            if top > 0:
                values = args[0].detach().abs().flatten().float()
                histograms[name] += torch.histc(values, bins=bins, min=0.0, max=top).double().cpu()
        return hook

    for name, quantizer in quantizers.items():
        handles.append(quantizer.register_forward_pre_hook(recorder(name)))
    was_training = model.training
    model.eval()
    for quantizer in quantizers.values():
        quantizer.observing = True  # pass-through
    try:

        for batch in batches:
            model(*as_model_inputs(batch, model))
    finally:
        for handle in handles:
            handle.remove()
        for quantizer in quantizers.values():
            quantizer._reset_observation()
            quantizer.observing = False
        model.train(was_training)
    return {name: (histograms[name].numpy(), maxima.get(name, 0.0)) for name in quantizers}


@torch.no_grad()
def calibrate_entropy(model, batches, bins: int = ENTROPY_BINS) -> None:
    """Entropy calibration: each scale is threshold / qmax with the threshold of least KL divergence."""
    quantizers = act_quantizers(model)
    for name, (histogram, top) in collect_histograms(model, batches, bins).items():
        quantizer = quantizers[name]
        if top <= 0:
            continue  # never saw a non-zero value: keep the current scale (as ActQuantizer does)
        threshold = entropy_threshold(histogram, top, quantizer.qmax + 1)
        quantizer.scale.copy_(torch.tensor(max(threshold / quantizer.qmax, MIN_SCALE)).to(quantizer.scale))


def entropy_threshold(histogram: np.ndarray, top: float, levels: int) -> float:
    """TensorRT's entropy calibrator on a histogram of |x| over [0, top]; returns the clip value.

    For every candidate clip of i bins (i = `levels` .. all), P is the histogram's first i bins with everything
    beyond folded into bin i-1, and Q is those i bins merged into `levels` groups (bin k in group
    floor(k * levels / i)), each group's total spread evenly over its non-empty bins. The clip with the least
    KL(P || Q) wins. Inside a group Q is flat, so the KL reduces to per-group sums read off cumulative sums:
    all candidates at once in O(candidates * levels) instead of O(candidates * bins).
    """
    h = np.array(histogram, dtype=np.float64)
    if len(h) > 1:
        # Exact zeros (padding, ReLU floors) pile up in bin 0 and would pull every clip towards the smallest
        # one; like pytorch-quantization's entropy calibrator, bin 0 counts as its neighbour.
        h[0] = h[1]
    bins, total = len(h), h.sum()
    if bins <= levels or total <= 0:
        return top
    h_log_h = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    mass_before = np.concatenate([[0.0], np.cumsum(h)])  # [k] = mass of bins < k
    filled_before = np.concatenate([[0.0], np.cumsum(h > 0)])
    h_log_h_before = np.concatenate([[0.0], np.cumsum(h_log_h)])

    sizes = np.arange(levels, bins + 1)  # candidate clips, in bins
    starts = -((-np.arange(levels + 1)[None, :] * sizes[:, None]) // levels)  # ceil(g * i / levels)
    group_mass = np.diff(mass_before[starts], axis=1)
    group_filled = np.diff(filled_before[starts], axis=1)
    per_bin = np.divide(group_mass, group_filled, out=np.ones_like(group_mass), where=group_filled > 0)
    mass_log_per = (group_mass * np.log(per_bin)).sum(axis=1)  # sum over bins of h_k * log(Q's value at k)

    last = h[sizes - 1]  # bin i-1: the last group's, it also receives the tail
    per_last = per_bin[:, -1]
    kept = mass_before[sizes]  # Q's total
    inner = mass_before[sizes - 1]  # P's mass before bin i-1
    with np.errstate(divide="ignore"):
        log_kept = np.log(np.where(kept > 0, kept, 1.0))
        # sum over k < i-1 of p_k * (log p_k - log q_k), with p_k = h_k / T and q_k = per_bin / kept
        divergence = (h_log_h_before[sizes - 1] - inner * math.log(total)
                      - (mass_log_per - last * np.log(np.where(last > 0, per_last, 1.0))) + inner * log_kept) / total
        p_last = (last + total - kept) / total
        q_last = np.where(last > 0, per_last / np.where(kept > 0, kept, 1.0), 1e-12)
        divergence += np.where(p_last > 0, p_last * (np.log(np.where(p_last > 0, p_last, 1.0)) - np.log(q_last)), 0.0)
    divergence = np.where(kept > 0, divergence, np.inf)
    best = int(sizes[int(np.argmin(divergence))])
    return best * top / bins


__all__ = ["CALIBRATORS", "WEIGHT_METHODS", "ptq_checkpoint", "resolve_plan", "calibrate", "calibrate_entropy",
           "collect_histograms", "entropy_threshold"]
