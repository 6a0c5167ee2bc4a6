"""A quantized checkpoint without training: random weights, a random bit plan, BN statistics that make
folding non-trivial (negative and zero gammas included), activation scales calibrated on random images.

For tests, the export benchmark and trying `export` before a model is trained. Its detections are noise,
but every number in it is a real quantized model's, so export and parity are fully exercised.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ghost_deploy import __version__
from ghost_deploy.checkpoint import save_checkpoint
from ghost_deploy.contract import CheckpointHeader
from ghost_deploy.errors import UserError
from ghost_deploy.model import CONFIGS, build_model
from ghost_deploy.model.detector import INPUT_CHANNELS
from ghost_deploy.quant import calibrate_activations, plan_from_bits, quant_layers, quantize_model
from ghost_deploy.quant.hq import choose_plan
from ghost_deploy.quant.plans import with_residual_outputs
from ghost_deploy.quant.trace import conv_names, example_inputs
from ghost_deploy.recipe import DEFAULTS


def random_bits(layer_names, low: int = 3, high: int = 8, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {name: int(rng.integers(low, high + 1)) for name in layer_names}


def randomize_batchnorm(model: nn.Module, img_size: int = 64, seed: int = 0) -> None:
    """BN far from identity but with a healthy signal: random gammas (one negative, one zero per BN) and betas,
    running statistics measured on random images (as training would leave them), so folding is non-trivial and
    activations neither vanish nor explode through the random network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                gamma = torch.rand(size, generator=generator) * 1.2 + 0.4
                gamma[0] = -gamma[0]
                if size > 2:
                    gamma[1] = 0.0
                module.weight.copy_(gamma)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.3 + 0.2)
    measure_batchnorm(model, img_size, generator)


@torch.no_grad()
def measure_batchnorm(model: nn.Module, img_size: int, generator) -> None:
    """Running statistics := the statistics of one batch of random images (with the weights as they are now,
    quantized or not; activation quantizers pass values through meanwhile)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    quantizers = list(getattr(model, "act_quantizers", {}).values())
    momentum = {m: m.momentum for m in norms}
    for module in norms:
        module.momentum = 1.0
    for quantizer in quantizers:
        quantizer.observing = True
    model.train()
    try:
        model(*example_inputs_like(model, img_size, 4, generator))
    finally:
        for module in norms:
            module.momentum = momentum[module]
        for quantizer in quantizers:
            quantizer.observing = False
            quantizer._reset_observation()
        model.eval()


def build_sample_model(model_name: str = "ghost-n", nc: int = 5, input_mode: str = "rgb+ir", img_size: int = 64,
                       weight_bits=(3, 8), act_bits: int = 8, seed: int = 0, float_layers=(), calib_batches: int = 2,
                       exact_grid: bool = True, residual_outputs: bool = False):
    """(quantized model, bit plan). `weight_bits`: (low, high) for a random plan, an int, {layer: bits}, or
    None for a float teacher (plan None). `residual_outputs`: quantize the residual branches' outputs too
    (`quant.plans.with_residual_outputs`).

    `exact_grid` snaps the model onto power-of-two grids (see `snap_to_exact_grid`), so any two correct
    backends compute it bit for bit whatever their summation order.
    """

    torch.manual_seed(seed)
    model = build_model(model_name, nc=nc, input_mode=input_mode).eval()
    randomize_batchnorm(model, img_size, seed)
    if weight_bits is None:  # an FP32 teacher
        return model, None
    names = conv_names(model)
    if isinstance(weight_bits, tuple):
        bits = random_bits(names, weight_bits[0], weight_bits[1], seed)
    elif isinstance(weight_bits, dict):
        bits = dict(weight_bits)
    else:
        bits = {name: int(weight_bits) for name in names}
    for name in float_layers:
        bits[name] = None
    plan = plan_from_bits(model, bits, act_bits=act_bits, image_size=img_size, method="edited")
    if residual_outputs:
        plan = with_residual_outputs(plan, model)
    # max-based scales: fast, and snapping to powers of two below still leaves some values saturating
    model = quantize_model(model, plan, example_inputs=example_inputs(model, img_size), scale_init="max")
    generator = torch.Generator().manual_seed(seed + 1)
    measure_batchnorm(model, img_size, generator)  # as QAT would leave them: statistics of the quantized weights
    batches = [example_inputs_like(model, img_size, 2, generator) for _ in range(calib_batches)]
    calibrate_activations(model, batches, method="max")
    if exact_grid:
        snap_to_exact_grid(model)
    return model.eval(), plan


def _power_of_two(values: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(values.abs().clamp_min(1e-30))))


@torch.no_grad()
def snap_to_exact_grid(model: nn.Module) -> None:
    """Make every intermediate value exactly representable in float32, so parity must be exact.

    A quantized network amplifies rounding noise: float32 convs summed in a different order (PyTorch vs ONNX
    Runtime vs TensorRT) flip an activation code now and then, and the flips spread. On this grid they cannot
    happen: activation and weight scales are powers of two, each BN's gamma / sigma is +-2^e (so folding keeps
    the grid), and BN means, betas and conv biases are integer multiples of the conv's accumulator step
    s_in * s_w. Products of codes are then exact and so are their sums (well below 2^24 steps), in any order.
    A non-zero parity error on such a model is a bug, not noise.
    """

    for quantizer in getattr(model, "act_quantizers", {}).values():
        quantizer.scale.copy_(_power_of_two(quantizer.scale))
    for name, conv in quant_layers(model):
        if conv.weight_quantizer is not None:
            conv.weight_quantizer.scale.copy_(_power_of_two(conv.weight_quantizer.scale))
        if conv.input_quantizer is None or conv.weight_quantizer is None:
            continue
        step = conv.input_quantizer.scale * conv.weight_quantizer.scale  # (out,) accumulator step, a power of two
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bn = getattr(parent, "bn", None)
        if attr == "conv" and isinstance(bn, nn.BatchNorm2d):
            sigma = _power_of_two(torch.sqrt(bn.running_var + bn.eps))
            bn.running_var.copy_(sigma * sigma - bn.eps)
            sigma = torch.sqrt(bn.running_var + bn.eps)  # what BN will compute, exactly a power of two or not
            factor = torch.where(bn.weight == 0, 0.0, torch.sign(bn.weight) * _power_of_two(bn.weight / sigma))
            bn.weight.copy_(factor * sigma)
            bn.running_mean.copy_(torch.round(bn.running_mean / step) * step)
            out_step = step * factor.abs().clamp_min(1e-30)
            bn.bias.copy_(torch.where(factor == 0, torch.round(bn.bias / step) * step,
                                      torch.round(bn.bias / out_step) * out_step))
        elif conv.bias is not None:
            conv.bias.copy_(torch.round(conv.bias / step) * step)


def example_inputs_like(model, img_size: int, batch: int, generator) -> tuple[torch.Tensor, ...]:

    return tuple(torch.rand(batch, INPUT_CHANNELS[name], img_size, img_size, generator=generator)
                 for name in model.input_names)


def save_sample_checkpoint(path: str | os.PathLike, model_name: str = "ghost-n", nc: int = 5, img_size: int = 64,
                           weight_bits=(3, 8), act_bits: int = 8, seed: int = 0, float_layers=(),
                           parity: dict | None = None, model=None, plan=None) -> Path:
    """Write a self-describing checkpoint of a sample quantized model (or of `model`/`plan` if given)."""
    if model is None:  # weight_bits=None: an FP32 teacher checkpoint
        model, plan = build_sample_model(model_name, nc, img_size=img_size, weight_bits=weight_bits,
                                         act_bits=act_bits, seed=seed, float_layers=float_layers)
    recipe = {**DEFAULTS, "name": "sample", "model": model_name, "img_size": img_size, "data": None}
    recipe["parity"] = {**DEFAULTS["parity"], **(parity or {})}
    header = CheckpointHeader(
        version=__version__, stage="ghost" if plan is not None else "teacher", model=model_name,
        nc=nc, names=[f"class{i}" for i in range(nc)], input_mode=model.input_mode,
        input_names=list(model.input_names), img_size=img_size, sr=False, data=None, recipe=recipe,
        strides=model.detect.stride.tolist(), anchors_pixels=model.detect.anchors_pixels.tolist(), bit_plan=plan)
    return save_checkpoint(path, model, header)


def sample_bits(model_name: str, bits: str, img_size: int, nc: int, seed: int, threshold: float = 0.1):
    """What `--bits` means for `make_sample`: 'fp32' (a teacher), 'hq' (HQ's k-means rule on the sample's own
    weights at threshold T), 'mixed' (random 3..8 bits per layer), or N (every conv at N bits)."""
    if bits == "fp32":
        return None
    if bits == "mixed":
        return (3, 8)
    if bits == "hq":
        teacher, _ = build_sample_model(model_name, nc, img_size=img_size, weight_bits=None, seed=seed)
        plan = choose_plan(teacher, "hq", img_size, threshold=threshold, seed=seed)
        return {name: layer.weight_bits for name, layer in plan.layers.items()}
    if not bits.isdigit() or not 2 <= int(bits) <= 8:
        raise UserError("--bits", f"must be hq, mixed, fp32 or a number of bits 2..8, got {bits!r}")
    return int(bits)


def make_sample(model_name: str, out, *, img_size: int = 512, bits: str = "hq", nc: int = 8, seed: int = 0,
                snap: bool = False, threshold: float = 0.1, residual_outputs: bool = False) -> Path:
    """A random-weight, calibrated checkpoint of any config, to try export, build-engine and bench on the real
    architecture before training. Off the power-of-two grid like a trained model unless `snap` (then any two
    correct backends compute it bit for bit, which hides the float32 rounding a trained model shows)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError("--out", f"{out} must end in .safetensors")
    if model_name not in CONFIGS:
        raise UserError("MODEL", f"unknown model {model_name!r} (known: {', '.join(CONFIGS)})")
    stride = CONFIGS[model_name].max_stride
    if img_size % stride:
        raise UserError("--img-size", f"{img_size} must be a multiple of {stride} (the deepest stride of {model_name})")
    weight_bits = sample_bits(model_name, bits, img_size, nc, seed, threshold)
    model, plan = build_sample_model(model_name, nc, img_size=img_size, weight_bits=weight_bits, seed=seed,
                                     exact_grid=snap, residual_outputs=residual_outputs)
    return save_sample_checkpoint(out, model_name=model_name, nc=nc, img_size=img_size, model=model, plan=plan)
