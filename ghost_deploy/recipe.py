"""Training recipes: YAML files in `training/` merged over the defaults below.

A recipe names the model, input mode, image size, dataset and every hyper-parameter of both stages
(FP32 teacher and GHOST QAT), so a checkpoint that embeds its recipe can be reproduced.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "training"

DEFAULTS: dict = {
    "name": "custom",
    "model": "ghost-s",
    "input_mode": "rgb+ir",
    "img_size": 512,
    "sr": False,
    "data": None,
    "seed": 0,
    "workers": 0,
    "cache": "off",  # "disk": decoded images kept as raw .npy files (~/.cache/ghost-deploy/decoded), read once
    "amp": "auto",   # auto: fp16 autocast on CUDA, off on the CPU; or off, bf16, fp16 (train --amp)
    "hyp": {
        # YOLOv5 hyp.scratch: loss gains and augmentation.
        "box": 0.05, "cls": 0.5, "obj": 1.0, "anchor_t": 4.0, "sr_weight": 0.1,
        "mosaic": 1.0, "translate": 0.1, "scale": 0.5, "fliplr": 0.5, "flipud": 0.0,
        "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4,
    },
    "teacher": {
        "epochs": 100, "batch_size": 16, "nominal_batch": 64, "optimizer": "sgd",
        "lr0": 0.01, "lrf": 0.2, "momentum": 0.937, "weight_decay": 5e-4, "nesterov": True,
        "warmup_epochs": 3.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1,
        "ema_decay": 0.9999, "ema_tau": 2000, "close_mosaic": 0,
    },
    "ghost": {
        "epochs": 50, "batch_size": 16, "nominal_batch": 64, "optimizer": "sgd",
        "lr0": 0.002, "lrf": 0.2, "momentum": 0.937, "weight_decay": 5e-4, "nesterov": True,
        "warmup_epochs": 1.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.0,
        "ema_decay": 0.9999, "ema_tau": 500, "close_mosaic": 0,
        "plan": {"method": "hq", "threshold": 0.1, "bit_min": 2, "bit_max": 8, "act_bits": 8},
        "calib_batches": 8, "learn_act_scales": False,
        "distill": {"enabled": True, "switch": True, "ost_weight": 400.0, "switch_weight": 1.0, "qk_dim": 128,
                    "tau": 1.0, "open_bounds": [0.1, 0.9], "layer_norm": "paper"},
    },
    "eval": {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300},
    "parity": {"min_cosine": 0.9999, "score_threshold": 0.25, "match_iou": 0.95, "max_score_delta": 0.02,
               "allow_missing": 0, "allow_extra": 0, "images": 8,
               # which comparison decides the gate: "exact" (both sides accumulating integer codes, bit-identical
               # when the export is right) or "float32" (the graph as written, both sides summing in float32, which
               # sits at a trained model's rounding-noise floor: docs/export.md); both always run and are reported
               "arithmetic": "exact"},
}


PARITY_ARITHMETIC = ("float32", "exact")


def _merge(base: dict, override: dict, where: str, path) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base and where:  # nested sections accept only known keys, so typos are caught
            raise UserError(path, f"unknown recipe key {where}.{key}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}.{key}" if where else key, path)
        else:
            out[key] = value
    return out


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise UserError(name_or_path, f"no such recipe file or name (known: {known})")


def load_recipe(name_or_path: str | os.PathLike = "demo") -> dict:
    path = resolve_recipe_path(name_or_path)
    raw = read_user_yaml(path, "recipe") or {}
    if not isinstance(raw, dict):
        raise UserError(path, "a recipe must be a YAML mapping")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise UserError(path, f"unknown recipe key {sorted(unknown)[0]!r}")
    recipe = _merge(DEFAULTS, raw, "", path)
    if recipe["parity"]["arithmetic"] not in PARITY_ARITHMETIC:
        raise UserError(path, f"parity.arithmetic must be one of {', '.join(PARITY_ARITHMETIC)}, "
                              f"got {recipe['parity']['arithmetic']!r}")
    recipe["recipe_path"] = str(path)
    data = recipe.get("data")
    if data and data != "embedded" and not Path(data).is_absolute():
        recipe["data"] = str((path.parent / data).resolve())
    return recipe
