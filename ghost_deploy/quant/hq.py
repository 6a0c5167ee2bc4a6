"""Per-layer bit selection: GHOST's HQ k-means rule, and a budget mode that targets size, BOPs or mean bits.

HQ (paper rule, deterministic here): for each conv, the smallest n in bit_min..bit_max whose 1-D k-means
(k-means++ seeded with `seed`) leaves a within-cluster mean squared error D(n) below T; else bit_max.
Activation bits are a separate decision (8 by default); the reference copied the weight bits to the
activations (bug B9). Two distortions (`distortion`):

- `raw` (the paper's): K = 2^n clusters of the raw weights, D(n) = inertia / N * 1e6. A BatchNorm follows every
  conv, so w -> a * w changes nothing in the network but D by a^2: T means different things on different models
  (the demo's ghost-p needed T = 10 where ghost-s-vedai keeps ~6.4 bits at the paper's 0.1), and n = 2 scores
  4 clusters where the narrow-range quantizer deploys 3 levels.
- `relative` (default in recipes): K = 2^n - 1, the levels the deployed symmetric quantizer has, and D(n) =
  inertia / (N * var(w)) * REFERENCE_WEIGHT_VARIANCE * 1e6: the share of the layer's weight variance k-means
  leaves, in the paper's units for a layer of variance REFERENCE_WEIGHT_VARIANCE, so it is scale-free and the
  paper's T = 0.1 means the same on every model.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ghost_deploy.bitplan import BitPlan, average_weight_bits, bops, size_mb
from ghost_deploy.errors import UserError
from ghost_deploy.quant.plans import model_sites, plan_from_bits
from ghost_deploy.quant.quantizers import MIN_SCALE, _mse_scales, qrange
from ghost_deploy.quant.trace import example_inputs

# Layers with more weights are clustered on this many values: an evenly spaced subsample of the *sorted*
# weights (every quantile kept), so the result does not depend on weight order and stays fast.
HQ_MAX_SAMPLES = 100_000
KMEANS_MAX_ITER = 50
BUDGET_TARGETS = ("size_mb", "bops_g", "avg_bits")
DISTORTIONS = ("raw", "relative")
# The parameter-weighted mean variance of ghost-s-vedai's conv weights as initialised (sigma ~ 0.022): a layer of
# this variance scores the same under `relative` as under the paper's `raw` distortion.
REFERENCE_WEIGHT_VARIANCE = 4.83e-4


def sorted_subsample(values: np.ndarray, max_samples: int = HQ_MAX_SAMPLES) -> np.ndarray:
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size <= max_samples:
        return values
    return values[np.linspace(0, values.size - 1, max_samples).round().astype(np.int64)]


def kmeans_1d(values: np.ndarray, clusters: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER) -> tuple[np.ndarray, float]:
    """Lloyd's k-means on 1-D data with k-means++ seeding; returns (sorted centroids, inertia).

    On sorted data every cluster is a contiguous run, so one iteration is a searchsorted of the K-1
    midpoints plus prefix sums: O(K log N) after the O(N K) seeding.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        return np.zeros(0), 0.0
    clusters = min(clusters, n)
    rng = np.random.default_rng(seed)
    centers = np.empty(clusters)
    centers[0] = x[rng.integers(n)]
    dist2 = (x - centers[0]) ** 2
    scratch = np.empty_like(x)
    for index in range(1, clusters):
        total = dist2.sum()
        if total <= 0:  # fewer distinct values than clusters: every point already sits on a centroid
            centers[index:] = centers[0]
            break
        pick = np.searchsorted(np.cumsum(dist2), rng.random() * total, side="right")
        centers[index] = x[min(pick, n - 1)]
        np.subtract(x, centers[index], out=scratch)
        np.minimum(dist2, np.square(scratch, out=scratch), out=dist2)
    centers = np.unique(centers)
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(max_iter):
        bounds = np.concatenate([[0], np.searchsorted(x, (centers[:-1] + centers[1:]) / 2, side="right"), [n]])
        counts = np.diff(bounds)
        keep = counts > 0
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        updated = sums[keep] / counts[keep]
        if updated.shape == centers.shape and np.array_equal(updated, centers):
            break
        centers = updated
    bounds = np.searchsorted(x, (centers[:-1] + centers[1:]) / 2, side="right")
    assignment = np.repeat(np.arange(centers.size), np.diff(np.concatenate([[0], bounds, [n]])))
    inertia = float(((x - centers[assignment]) ** 2).sum())
    return centers, inertia


def kmeans_distortion(values: np.ndarray, bits: int, seed: int = 0, distortion: str = "raw") -> float:
    """HQ's D(n) of the values at `bits` (module doc: `raw` K = 2^n, `relative` K = 2^n - 1 and scale-free)."""
    values = np.asarray(values, dtype=np.float64)
    if distortion == "raw":
        _, inertia = kmeans_1d(values, 2 ** bits, seed)
        return inertia / max(values.size, 1) * 1e6
    _check_distortion(distortion)
    variance = float(values.var()) if values.size else 0.0
    if variance <= 0.0:
        return 0.0  # every weight equal: any number of levels represents them
    _, inertia = kmeans_1d(values, 2 ** bits - 1, seed)
    return inertia / (values.size * variance) * REFERENCE_WEIGHT_VARIANCE * 1e6


def hq_bits(weight: torch.Tensor, threshold: float = 0.1, bit_min: int = 2, bit_max: int = 8, seed: int = 0,
            max_samples: int = HQ_MAX_SAMPLES, distortion: str = "raw") -> tuple[int, str]:
    """(bits, criterion) for one conv's weights under the HQ rule."""
    values = sorted_subsample(weight.detach().cpu().numpy(), max_samples)
    score = float("nan")
    tag = "kmeans D" if distortion == "raw" else "kmeans relative D"
    for bits in range(bit_min, bit_max + 1):
        score = kmeans_distortion(values, bits, seed, distortion)
        if score < threshold:
            return bits, f"{tag}({bits})={score:.3g}<{threshold:g}"
    return bit_max, f"{tag}({bit_max})={score:.3g}>={threshold:g}: max bits"


def _check_distortion(distortion: str) -> None:
    if distortion not in DISTORTIONS:
        raise UserError(None, f"ghost.plan.distortion must be one of {', '.join(DISTORTIONS)}, got {distortion!r}")


def hq_plan(model: nn.Module, threshold: float = 0.1, bit_min: int = 2, bit_max: int = 8, seed: int = 0,
            act_bits: int | None = 8, img_size: int = 512, max_samples: int = HQ_MAX_SAMPLES,
            distortion: str = "raw") -> BitPlan:
    """GHOST's HQ rule for every conv (stem and Detect included), deterministic for a given seed."""
    _check_bit_range(bit_min, bit_max)
    _check_distortion(distortion)
    sites = model_sites(model, img_size)
    bits, criteria = {}, {}
    for site in sites:
        bits[site.name], criteria[site.name] = hq_bits(site.module.weight, threshold, bit_min, bit_max, seed, max_samples,
                                                       distortion)
    plan = plan_from_bits(model, bits, act_bits, img_size, method="hq", criteria=criteria, sites=sites,
                          threshold=threshold)
    what = ("MSE of the raw weights x 1e6 (K=2^n)" if distortion == "raw" else
            f"MSE / var(w) x {REFERENCE_WEIGHT_VARIANCE:g} x 1e6 (K=2^n-1, the deployed levels)")
    plan.notes = (f"HQ: smallest n in {bit_min}..{bit_max} with 1-D k-means (k-means++, seed {seed}) {what} "
                  f"< {threshold:g}, else {bit_max}; layers over {max_samples} weights use a sorted subsample; "
                  f"activation bits {act_bits} (not copied from the weights)")
    return plan


# --- budget mode ---
def weight_quant_error(weight: torch.Tensor, bits: int, max_columns: int = 512) -> float:
    """Squared weight error of the deployed quantizer (per-channel symmetric, MSE scale), summed per channel.

    Estimated on a strided subsample of at most `max_columns` weights per channel, scaled to the full row.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    row_length = rows.shape[1]
    if row_length > max_columns:
        rows = rows[:, :: -(-row_length // max_columns)]
    qmin, qmax = qrange(bits)
    absmax = rows.abs().amax(dim=1).clamp_min(MIN_SCALE)
    scale = _mse_scales(rows, absmax, qmin, qmax)[:, None]
    quantized = torch.clamp(torch.round(rows * scale.reciprocal()), qmin, qmax) * scale
    return float((quantized - rows).pow(2).mean(dim=1).mean() * row_length)


@torch.no_grad()
def output_energy_sensitivity(model: nn.Module, sites, inputs) -> dict[str, float]:
    """E[x^2] / E[y^2] per conv: turns a per-channel weight error sum into a relative output noise power."""
    stats: dict[str, tuple[float, float]] = {}
    handles = []
    for site in sites:
        def hook(module, args, output, name=site.name):
            # The conv's linear part only: a large bias (Detect's priors) is no signal the noise competes with.
            linear = output if module.bias is None else output - module.bias.view(1, -1, 1, 1)
            stats[name] = (float(args[0].float().pow(2).mean()), float(linear.float().pow(2).mean()))
        handles.append(site.module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in inputs:
            model(*batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: x2 / max(y2, 1e-30) for name, (x2, y2) in stats.items()}


def budget_plan(model: nn.Module, target: dict, sensitivity: dict | None = None, act_bits: int | None = 8,
                img_size: int = 512, bit_min: int = 2, bit_max: int = 8, calib_batches=None,
                log: Callable[[str], None] | None = None) -> BitPlan:
    """Per-layer weight bits that meet one budget while adding the least weighted quantization error.

    target: {"size_mb": MB (deployable size)} or {"bops_g": G} or {"avg_bits": param-weighted mean}.
    Error of a layer at b bits = the real quantizer's weight error (per-channel symmetric, MSE scale),
    summed per output channel, times its sensitivity (default: E[x^2]/E[y^2] from a forward pass over
    `calib_batches`, or deterministic random images), i.e. the relative noise power it adds to its output.
    Greedy: start at bit_max everywhere; lower, one bit at a time, the layer with the smallest error
    increase per unit of budget saved, until the plan is within the budget.
    """
    _check_bit_range(bit_min, bit_max)
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in BUDGET_TARGETS:
        raise UserError(None, f"budget target must be one of {', '.join(BUDGET_TARGETS)} (exactly one), got {target!r}")
    (kind, limit), = target.items()
    sites = model_sites(model, img_size)
    names = [site.name for site in sites]
    sensitivity_source = "given" if sensitivity is not None else "E[x^2]/E[y^2] of each conv"
    if sensitivity is None:

        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib_batches] if calib_batches else [
            example_inputs(model, min(img_size, 128), batch=2)]
        sensitivity = output_energy_sensitivity(model, sites, batches)
    missing = [name for name in names if name not in sensitivity]
    if missing:
        raise UserError(None, f"sensitivity has no value for layer {missing[0]!r}")
    errors = {site.name: {b: weight_quant_error(site.module.weight, b) * float(sensitivity[site.name])
                          for b in range(bit_min, bit_max + 1)} for site in sites}

    bits = {name: bit_max for name in names}
    plan = plan_from_bits(model, bits, act_bits, img_size, method="budget", sites=sites, budget=dict(target))
    total_params = sum(site.params for site in sites)

    def measure() -> float:
        if kind == "size_mb":
            return size_mb(plan)
        if kind == "bops_g":
            return bops(plan) / 1e9
        return average_weight_bits(plan)["param_weighted"]

    def saved(name: str) -> float:  # budget units saved by one bit less on this layer
        layer = plan.layers[name]
        if kind == "size_mb":
            return layer.params / 8 / 1e6
        if kind == "bops_g":
            return layer.macs * layer.input_bits / 1e9
        return layer.params / total_params

    while measure() > limit:
        candidates = [name for name in names if plan.layers[name].weight_bits > bit_min and saved(name) > 0]
        if not candidates:
            raise UserError(None, f"budget {kind} <= {limit} is unreachable: every layer at {bit_min} bits gives {measure():.4g}")
        name = min(candidates, key=lambda n: ((errors[n][plan.layers[n].weight_bits - 1] -
                                               errors[n][plan.layers[n].weight_bits]) / saved(n), names.index(n)))
        plan.layers[name].weight_bits -= 1
    for name in names:
        layer = plan.layers[name]
        layer.criterion = f"budget {kind}<={limit:g}: err {errors[name][layer.weight_bits]:.3g}"
    plan.notes = (f"budget: greedy from {bit_max} bits, lowest weighted-error increase per saved unit first; "
                  f"error = per-channel symmetric MSE-scale weight error x sensitivity "
                  f"({sensitivity_source})")
    if log is not None:
        log(plan.summary())
    return plan


def _check_bit_range(bit_min: int, bit_max: int) -> None:
    if not 2 <= bit_min <= bit_max <= 8:
        raise UserError(None, f"bit range must satisfy 2 <= bit_min <= bit_max <= 8, got {bit_min}..{bit_max}")


def choose_plan(model: nn.Module, method: str, img_size: int, *, threshold: float = 0.1, bit_min: int = 2,
                bit_max: int = 8, seed: int = 0, act_bits: int | None = 8, budget: dict | None = None,
                source=None, distortion: str = "raw") -> BitPlan:
    """The one dispatch from a plan request to a plan: HQ's k-means rule (`hq`) or a budget (`budget`:
    avg_bits, size_mb and/or bops_g). Training (the recipe's ghost.plan) and `ghost-deploy plan` both call it."""
    if method == "hq":
        return hq_plan(model, threshold=threshold, bit_min=bit_min, bit_max=bit_max, seed=seed, act_bits=act_bits,
                       img_size=img_size, distortion=distortion)
    if method == "budget":
        return budget_plan(model, budget or {}, act_bits=act_bits, img_size=img_size)
    raise UserError(source, f"ghost.plan.method must be hq or budget, got {method!r}")
