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


def random_bits(layer_names, low: int = 3, high: int = 8, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {name: int(rng.integers(low, high + 1)) for name in layer_names}


def randomize_batchnorm(model: nn.Module, img_size: int = 64, seed: int = 0) -> None:
    """BN far from identity but with a healthy signal: random gammas (one negative, one zero per BN) and betas,
    running statistics measured on random images (as training would leave them), so folding is non-trivial and
    activations neither vanish nor explode through the random network."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in norms:
            size = module.num_features
            gamma = torch.rand(size, generator=generator) * 1.2 + 0.4
            gamma[0] = -gamma[0]
            if size > 2:
                gamma[1] = 0.0
            module.weight.copy_(gamma)
            module.bias.copy_(torch.randn(size, generator=generator) * 0.3 + 0.2)
        momentum = {m: m.momentum for m in norms}
        for module in norms:
            module.momentum = 1.0  # running stats := this batch's stats
        model.train()
        model(*example_inputs_like(model, img_size, 4, generator))
        for module in norms:
            module.momentum = momentum[module]
    model.eval()


def build_sample_model(model_name: str = "ghost-n", nc: int = 5, input_mode: str = "rgb+ir", img_size: int = 64,
                       weight_bits=(3, 8), act_bits: int = 8, seed: int = 0, float_layers=(), calib_batches: int = 2):
    """(quantized model, bit plan). `weight_bits`: (low, high) for a random plan, an int, or {layer: bits}."""
    from ..model import build_model
    from ..quant import calibrate_activations, plan_from_bits, quantize_model
    from ..quant.trace import conv_names, example_inputs

    torch.manual_seed(seed)
    model = build_model(model_name, nc=nc, input_mode=input_mode).eval()
    randomize_batchnorm(model, img_size, seed)
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
    model = quantize_model(model, plan, example_inputs=example_inputs(model, img_size))
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [example_inputs_like(model, img_size, 2, generator) for _ in range(calib_batches)]
    calibrate_activations(model, batches)
    return model.eval(), plan


def example_inputs_like(model, img_size: int, batch: int, generator) -> tuple[torch.Tensor, ...]:
    from ..model.detector import INPUT_CHANNELS

    return tuple(torch.rand(batch, INPUT_CHANNELS[name], img_size, img_size, generator=generator)
                 for name in model.input_names)


def save_sample_checkpoint(path: str | os.PathLike, model_name: str = "ghost-n", nc: int = 5, img_size: int = 64,
                           weight_bits=(3, 8), act_bits: int = 8, seed: int = 0, float_layers=(),
                           parity: dict | None = None, model=None, plan=None) -> Path:
    """Write a self-describing checkpoint of a sample quantized model (or of `model`/`plan` if given)."""
    from .. import __version__
    from ..checkpoint import save_checkpoint
    from ..recipe import DEFAULTS

    if model is None:
        model, plan = build_sample_model(model_name, nc, img_size=img_size, weight_bits=weight_bits,
                                         act_bits=act_bits, seed=seed, float_layers=float_layers)
    recipe = {**DEFAULTS, "name": "sample", "model": model_name, "img_size": img_size, "data": None}
    recipe["parity"] = {**DEFAULTS["parity"], **(parity or {})}
    meta = {
        "version": __version__, "stage": "ghost" if plan is not None else "teacher", "model": model_name,
        "nc": nc, "names": [f"class{i}" for i in range(nc)], "input_mode": model.input_mode,
        "input_names": list(model.input_names), "img_size": img_size, "sr": False, "data": None, "recipe": recipe,
        "strides": model.detect.stride.tolist(), "anchors_pixels": model.detect.anchors_pixels.tolist(),
        "bit_plan": None if plan is None else plan.to_dict(),
    }
    return save_checkpoint(path, model, meta)
