"""Training recipes: YAML files in `training/` merged over the defaults below.

A recipe names the model, input mode, image size, dataset and every hyper-parameter of both stages
(FP32 teacher and GHOST QAT), so a checkpoint that embeds its recipe can be reproduced.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_yaml
from ghost_deploy.model.configs import CONFIGS
from ghost_deploy.model.detector import INPUT_MODES

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
        # distortion: HQ's k-means score, "relative" (scale-free, the deployed 2^n - 1 levels: T means the same on
        # every model) or "raw" (the paper's MSE of the raw weights; quant/hq.py)
        # residual_outputs: quantize each residual branch's output as well (quant.plans.with_residual_outputs), so
        # ONNX Runtime's integer kernels run the branch and its add (target cpu); TensorRT does not need it
        "plan": {"method": "hq", "threshold": 0.1, "bit_min": 2, "bit_max": 8, "act_bits": 8, "distortion": "relative",
                 "residual_outputs": False},
        "calib_batches": 8, "learn_act_scales": False,
        "distill": {"enabled": True, "switch": True, "ost_weight": 400.0, "switch_weight": 1.0, "qk_dim": 128,
                    "det_weight": 1.0, "random_open_rate": 0.5,
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
# Choices the training stage implements, named here so a recipe is checked when read (train imports these).
AMP_MODES = ("auto", "off", "bf16", "fp16")
LAYER_NORMS = ("paper", "mean")  # train.distill.ost_distance
# learned: SCM as the paper (the switch predicts where the teacher's loss is lower); random: a Bernoulli gate at
# a fixed open rate (the control that tells whether the switch decides anything); off: every layer distilled (GQSD)
SWITCH_MODES = ("learned", "random", "off")


# ------------------------------------------------------------------------------------------- schema
class Rule:
    """What one recipe key may hold: `problem(value)` is None when it fits, else what is wrong ("must be ...")."""

    def __init__(self, wanted: str, fits, allow_null: bool = False):
        self.wanted, self.fits, self.allow_null = wanted, fits, allow_null

    def problem(self, value) -> str | None:
        if value is None and self.allow_null:
            return None
        try:
            ok = value is not None and self.fits(value)
        except TypeError:
            ok = False
        if ok:
            return None
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _looks_numeric(value) else ""
        return f"must be {self.wanted}{' or null' if self.allow_null else ''}, got {value!r}{hint}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(low: float | None = None, high: float | None = None, above_low: bool = False) -> Rule:
    """A finite number (an integer is one) in [low, high], or (low, high] with `above_low`."""
    bounds = (f"> {low:g}" if above_low else f">= {low:g}") if low is not None else ""
    if low is not None and high is not None:
        bounds = f"in {'(' if above_low else '['}{low:g}, {high:g}]"
    elif high is not None:
        bounds = f"<= {high:g}"

    def fits(value) -> bool:
        if not _is_number(value) or high is not None and value > high:
            return False
        return low is None or (value > low if above_low else value >= low)

    return Rule(f"a number {bounds}".strip(), fits)


def integer(low: int, high: int | None = None) -> Rule:
    return Rule(f"an integer >= {low}" if high is None else f"an integer in {low}..{high}",
                lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def one_of(*choices) -> Rule:
    return Rule("one of " + ", ".join(str(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")
RUN_NAME = Rule("a name without '/' (the run folder is runs/<name>)",
                lambda v: isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v)
FRACTION = number(0, 1)
POSITIVE = number(0, above_low=True)
NON_NEGATIVE = number(0)
COUNT = integer(1)
BITS = integer(2, 8)
OPEN_BOUNDS = Rule("two numbers [low, high] with 0 <= low <= high <= 1",
                   lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(FRACTION.fits(x) for x in v)
                   and v[0] <= v[1])
SWITCH = Rule("true, false or one of " + ", ".join(SWITCH_MODES),
              lambda v: isinstance(v, bool) or isinstance(v, str) and v in SWITCH_MODES)


def _stage_schema(**extra) -> dict:
    return {"epochs": COUNT, "batch_size": COUNT, "nominal_batch": COUNT, "optimizer": one_of("sgd", "adamw"),
            "lr0": POSITIVE, "lrf": POSITIVE, "momentum": FRACTION, "weight_decay": NON_NEGATIVE, "nesterov": BOOL,
            "warmup_epochs": NON_NEGATIVE, "warmup_momentum": FRACTION, "warmup_bias_lr": NON_NEGATIVE,
            "ema_decay": FRACTION, "ema_tau": POSITIVE, "close_mosaic": integer(0), **extra}


# Every key of DEFAULTS with what it may hold (nested like DEFAULTS; the dotted name is built when reporting).
SCHEMA: dict = {
    "name": RUN_NAME, "model": one_of(*CONFIGS), "input_mode": one_of(*INPUT_MODES), "img_size": integer(16),
    "sr": BOOL, "data": Rule("a dataset YAML path or 'embedded'", lambda v: isinstance(v, str) and v != "",
                             allow_null=True),
    "seed": integer(0), "workers": integer(0), "cache": one_of("off", "disk"), "amp": one_of(*AMP_MODES),
    "hyp": {"box": NON_NEGATIVE, "cls": NON_NEGATIVE, "obj": NON_NEGATIVE, "anchor_t": POSITIVE,
            "sr_weight": NON_NEGATIVE, "mosaic": FRACTION, "translate": FRACTION, "scale": number(0, 1),
            "fliplr": FRACTION, "flipud": FRACTION, "hsv_h": FRACTION, "hsv_s": FRACTION, "hsv_v": FRACTION},
    "teacher": _stage_schema(),
    "ghost": _stage_schema(
        plan={"method": one_of("hq", "budget"), "threshold": NON_NEGATIVE, "bit_min": BITS, "bit_max": BITS,
              "act_bits": BITS, "distortion": one_of("raw", "relative"), "residual_outputs": BOOL},
        calib_batches=COUNT, learn_act_scales=BOOL,
        distill={"enabled": BOOL, "switch": SWITCH, "ost_weight": NON_NEGATIVE, "switch_weight": NON_NEGATIVE,
                 "qk_dim": COUNT, "det_weight": NON_NEGATIVE, "random_open_rate": FRACTION, "tau": POSITIVE,
                 "open_bounds": OPEN_BOUNDS, "layer_norm": one_of(*LAYER_NORMS)}),
    "eval": {"conf_thres": FRACTION, "iou_thres": FRACTION, "max_det": COUNT},
    "parity": {"min_cosine": number(-1, 1), "score_threshold": FRACTION, "match_iou": FRACTION,
               "max_score_delta": NON_NEGATIVE, "allow_missing": integer(0), "allow_extra": integer(0),
               "images": COUNT, "arithmetic": one_of(*PARITY_ARITHMETIC)},
}


def _check_schema(values: dict, schema: dict, where: str, path) -> None:
    """Every key of the merged recipe against SCHEMA: one line naming the file and the dotted key."""
    for key, rule in schema.items():
        dotted = f"{where}{key}"
        value = values.get(key)
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise UserError(path, f"{dotted}: must be a mapping of {', '.join(rule)}, got {value!r}")
            _check_schema(value, rule, f"{dotted}.", path)
            continue
        problem = rule.problem(value)
        if problem:
            raise UserError(path, f"{dotted}: {problem}")


def check_recipe(recipe: dict, path) -> None:
    """SCHEMA, then what relates keys: the image size fits the model's strides, the bit range is a range."""
    _check_schema(recipe, SCHEMA, "", path)
    stride = CONFIGS[recipe["model"]].max_stride
    if recipe["img_size"] % stride:
        raise UserError(path, f"img_size: must be a multiple of {stride} (the deepest stride of {recipe['model']}), "
                              f"got {recipe['img_size']}")
    plan = recipe["ghost"]["plan"]
    if plan["bit_min"] > plan["bit_max"]:
        raise UserError(path, f"ghost.plan.bit_min: {plan['bit_min']} is above ghost.plan.bit_max {plan['bit_max']}")


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
    raw = read_user_yaml(path, "recipe")
    if raw is None:
        # an empty file would silently train the full-size defaults (100 teacher epochs at 512 px), nothing asked for
        raise UserError(path, "empty recipe: give at least `name:` and what differs from the defaults "
                              "(training/demo.yaml is an example)")
    if not isinstance(raw, dict):
        raise UserError(path, "a recipe must be a YAML mapping")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise UserError(path, f"unknown recipe key {sorted(unknown)[0]!r}")
    recipe = _merge(DEFAULTS, raw, "", path)
    check_recipe(recipe, path)
    recipe["recipe_path"] = str(path)
    data = recipe.get("data")
    if data and data != "embedded" and not Path(data).is_absolute():
        recipe["data"] = str((path.parent / data).resolve())
    return recipe
