"""The low-bit study: where quantization hurts (<= 3 average weight bits, A8), does each part of GHOST help?

One FP32 teacher; for every seed, each row trains or calibrates from it and is scored on the same held-out split.
Rows (names as in docs/results/ablation-lowbit.json):

- teacher: the FP32 teacher; teacher-finetuned: the teacher trained as many extra epochs as the QAT rows (so extra
  epochs are not credited to distillation);
- ptq: post-training quantization at the HQ plan; qat: QAT at the plan without distillation;
- gqsd-ost<W>: QAT + OST on every layer (no switch) at two OST weights;
- ghost: QAT + OST gated by the learned switch (SCM); ghost-random-gate: the switch replaced by a blind gate
  open at the ghost run's own measured open rate (same seed);
- uniform-same-bits: the ghost method with every layer at the plan's average bits rounded (HQ vs no plan).

A row's result is kept in `<out>/seed<k>/<row>/score.json`, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ghost_deploy.bitplan import BitPlan, average_weight_bits
from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.data.calib import make_calib_set
from ghost_deploy.io import write_json_atomic
from ghost_deploy.quant import hq_plan, uniform_plan
from ghost_deploy.quant.ptq import ptq_checkpoint
from ghost_deploy.train.ablation import score_checkpoint
from ghost_deploy.train.loop import train_ghost, train_teacher

CALIB_IMAGES = 128  # PTQ calibration pairs from the train split (the MSE calibrator's cost grows with them)
ROW_ORDER = ("teacher", "teacher-finetuned", "ptq", "qat", "gqsd-ost4", "gqsd-ost16", "ghost", "ghost-random-gate",
             "uniform-same-bits", "ptq-w3.5", "ghost-w3.5", "ptq-a4", "ghost-a4")  # at the default OST weights


def hq_plan_for_bits(model, max_avg_bits: float, img_size: int, bit_min: int = 2, bit_max: int = 4) -> BitPlan:
    """HQ's k-means rule with the smallest threshold T whose plan averages <= `max_avg_bits` (bisection on log T):
    the paper's rule, asked for a budget instead of a hand-tuned T."""
    def plan_at(threshold):
        # the raw distortion, as the demo recipe's (and the recorded study's) plans
        return hq_plan(model, threshold=threshold, bit_min=bit_min, bit_max=bit_max, img_size=img_size, distortion="raw")

    low, high = math.log(1e-3), math.log(1e5)
    if average_weight_bits(plan_at(math.exp(high)))["param_weighted"] > max_avg_bits:
        raise ValueError(f"no HQ threshold reaches {max_avg_bits} average bits in {bit_min}..{bit_max}")
    for _ in range(30):
        middle = (low + high) / 2
        if average_weight_bits(plan_at(math.exp(middle)))["param_weighted"] <= max_avg_bits:
            high = middle
        else:
            low = middle
    return plan_at(math.exp(high))


def _row_recipe(recipe: dict, seed: int, epochs: int, switch="off", ost_weight: float = 0.0, enabled: bool = True,
                random_open_rate: float = 0.5) -> dict:
    ghost = {**recipe["ghost"], "epochs": epochs,
             "distill": {**recipe["ghost"]["distill"], "enabled": enabled, "switch": switch, "ost_weight": ost_weight,
                         "random_open_rate": random_open_rate}}
    return {**recipe, "seed": seed, "ghost": ghost}


def _mean_open_rate(run_dir: Path) -> float:
    with open(run_dir / "results.csv") as handle:
        rates = [float(row["open_rate"]) for row in csv.DictReader(handle) if row.get("open_rate")]
    return float(np.mean(rates))


def _switch_log(run_dir: Path) -> dict:
    """Per-epoch switch AUC, target base rate and OST/detection gradient ratio of a run (results.csv)."""
    with open(run_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    pick = lambda key: [float(row[key]) for row in rows if row.get(key) not in (None, "")]  # noqa: E731
    return {"switch_auc": pick("switch_auc"), "switch_base_rate": pick("switch_base_rate"),
            "open_rate": pick("open_rate"), "ost_det_grad_ratio": pick("ost_det_grad_ratio")}


class Study:
    """One seed's rows. `row(name, make)` runs `make()` -> checkpoint once and caches its score."""

    def __init__(self, out: Path, recipe: dict, data_yaml: str, seed: int, log=print):
        self.out, self.recipe, self.data_yaml, self.seed, self.log = Path(out) / f"seed{seed}", recipe, data_yaml, seed, log

    def row(self, name: str, make) -> dict:
        score_file = self.out / name / "score.json"
        if score_file.is_file():
            return json.loads(score_file.read_text())
        checkpoint, extra = make(self.out / name)
        test = score_checkpoint(checkpoint, self.recipe, "test", data=self.data_yaml)
        val = score_checkpoint(checkpoint, self.recipe, "val", data=self.data_yaml)
        score = {"name": name, "seed": self.seed, "avg_weight_bits": test["avg_weight_bits"], "map50": test["mAP50"],
                 "map50_95": test["mAP50_95"], "val_map50": val["mAP50"], "size_mb": test["size_mb"],
                 "checkpoint": str(checkpoint), **extra}
        write_json_atomic(score_file, score)
        self.log(f"seed {self.seed} {name:22s} bits {score['avg_weight_bits']:.2f}  test mAP50 {score['map50']:.4f}  "
                 f"mAP50:95 {score['map50_95']:.4f}")
        return score


def run_seed(recipe: dict, teacher: str, data_yaml: str, out: Path, seed: int, epochs: int, ost_weights=(4.0, 16.0),
             max_avg_bits: float = 2.75, bit_range=(2, 3), log=print) -> list[dict]:
    study = Study(out, recipe, data_yaml, seed, log)
    img_size = recipe["img_size"]
    teacher_model = model_from_checkpoint(teacher, with_sr=False)[0]
    plan = hq_plan_for_bits(teacher_model, max_avg_bits, img_size, *bit_range)
    uniform_bits = round(average_weight_bits(plan)["param_weighted"])
    uniform = uniform_plan(teacher_model, weight_bits=uniform_bits, act_bits=plan_act_bits(plan), image_size=img_size)
    low, high = ost_weights
    rows = [study.row("teacher", lambda _: (teacher, {}))]

    def finetune(folder):
        ghost_cfg = {k: v for k, v in recipe["ghost"].items() if k in recipe["teacher"]}
        finetune_recipe = {**recipe, "seed": seed, "teacher": {**recipe["teacher"], **ghost_cfg, "epochs": epochs}}
        run = train_teacher(finetune_recipe, folder, data=data_yaml, progress=False, overwrite=True, init_from=teacher,
                            log=lambda *_: None)
        return run["best"], {}

    ptq = _ptq_row(teacher, data_yaml, seed, plan)

    def ghost_row(switch, ost_weight, enabled=True, row_plan=plan, open_rate=0.5):
        return _ghost_row(recipe, teacher, data_yaml, seed, epochs, row_plan, switch, ost_weight, enabled, open_rate)

    rows.append(study.row("teacher-finetuned", finetune))
    rows.append(study.row("ptq", ptq))
    rows.append(study.row("qat", ghost_row("off", 0.0, enabled=False)))
    rows.append(study.row(f"gqsd-ost{low:g}", ghost_row("off", low)))
    rows.append(study.row(f"gqsd-ost{high:g}", ghost_row("off", high)))
    rows.append(study.row("ghost", ghost_row("learned", high)))
    open_rate = _mean_open_rate(study.out / "ghost")
    rows.append(study.row("ghost-random-gate", ghost_row("random", high, open_rate=open_rate)))
    rows.append(study.row("uniform-same-bits", ghost_row("learned", high, row_plan=uniform)))
    return rows


def run_extra_rows(recipe: dict, teacher: str, data_yaml: str, out: Path, seed: int, epochs: int, ost_weight: float,
                   max_avg_bits: float = 2.75, bit_range=(2, 3), log=print) -> list[dict]:
    """Beside the main regime: PTQ and GHOST at a milder HQ plan (2..4 bits, <= 3.5 average) and at the main
    plan with 4-bit activations (scales learned in QAT)."""
    study = Study(out, recipe, data_yaml, seed, log)
    img_size = recipe["img_size"]
    teacher_model = model_from_checkpoint(teacher, with_sr=False)[0]
    mild = hq_plan_for_bits(teacher_model, 3.5, img_size, 2, 4)
    a4 = hq_plan_for_bits(teacher_model, max_avg_bits, img_size, *bit_range)
    for name, layer in a4.layers.items():
        if name != next(iter(a4.layers)):  # the stem reads the image: kept at 8 bits, the usual convention
            layer.act_bits = 4
    rows = []
    for tag, row_plan in (("w3.5", mild), ("a4", a4)):
        rows.append(study.row(f"ptq-{tag}", _ptq_row(teacher, data_yaml, seed, row_plan)))
        rows.append(study.row(f"ghost-{tag}", _ghost_row(recipe, teacher, data_yaml, seed, epochs, row_plan, "learned",
                                                         ost_weight)))
    return rows


def _ghost_row(recipe: dict, teacher: str, data_yaml: str, seed: int, epochs: int, plan: BitPlan, switch,
               ost_weight: float, enabled: bool = True, open_rate: float = 0.5):
    """A row maker: QAT of the teacher at `plan` with the given distillation; returns (best, switch log)."""
    def make(folder: Path):
        row_recipe = _row_recipe(recipe, seed, epochs, switch, ost_weight, enabled, open_rate)
        if any(layer.act_bits < 8 for layer in plan.layers.values()):  # low-bit activations: scales learned too
            row_recipe["ghost"] = {**row_recipe["ghost"], "learn_act_scales": True}
        run = train_ghost(row_recipe, folder, teacher, data=data_yaml, bit_plan_path=plan, progress=False,
                          overwrite=True, log=lambda *_: None)
        return run["best"], _switch_log(folder)
    return make


def _ptq_row(teacher: str, data_yaml: str, seed: int, plan: BitPlan):
    """A row maker: PTQ of the teacher at `plan`, calibrated on CALIB_IMAGES train pairs drawn with `seed`."""
    def make(folder: Path):
        manifest = make_calib_set(data_yaml, CALIB_IMAGES, split="train", out_dir=folder / "calib", force=True, seed=seed)
        return ptq_checkpoint(teacher, folder / "ptq.safetensors", manifest, plan=plan), {}
    return make


def plan_act_bits(plan: BitPlan) -> int | None:
    return next(iter(plan.layers.values())).act_bits


def summarise(scores: list[dict]) -> dict:
    """{"rows": [{"name", "avg_weight_bits", "map50": [per seed], "map50_95": [...], ...}]} in row order."""
    names = list(dict.fromkeys(score["name"] for score in scores))
    rows = []
    for name in names:
        mine = sorted((s for s in scores if s["name"] == name), key=lambda s: s["seed"])
        row = {"name": name, "avg_weight_bits": mine[0]["avg_weight_bits"], "seeds": [s["seed"] for s in mine],
               "map50": [s["map50"] for s in mine], "map50_95": [s["map50_95"] for s in mine],
               "val_map50": [s["val_map50"] for s in mine], "size_mb": mine[0]["size_mb"]}
        for key in ("switch_auc", "switch_base_rate", "open_rate", "ost_det_grad_ratio"):
            if any(s.get(key) for s in mine):
                row[key] = [s.get(key, []) for s in mine]
        rows.append(row)
    return {"rows": rows}


def paired(summary: dict, better: str, worse: str, key: str = "map50") -> tuple[float, float, int]:
    """Mean and sample std over seeds of (better - worse), paired by seed."""
    by_name = {row["name"]: row for row in summary["rows"]}
    a, b = by_name[better], by_name[worse]
    common = sorted(set(a["seeds"]) & set(b["seeds"]))
    diffs = [a[key][a["seeds"].index(s)] - b[key][b["seeds"].index(s)] for s in common]
    std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    return float(np.mean(diffs)), std, len(diffs)


def format_summary(summary: dict) -> str:
    rows = summary["rows"]
    teacher = float(np.mean(next(r for r in rows if r["name"] == "teacher")["map50"])) or 1e-12
    lines = ["| row | avg weight bits | test mAP50 (mean +- std) | % of teacher | test mAP50:95 | seeds |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        m50, m95 = np.array(row["map50"]), np.array(row["map50_95"])
        std = float(m50.std(ddof=1)) if m50.size > 1 else 0.0
        lines.append(f"| {row['name']} | {row['avg_weight_bits']:.2f} | {m50.mean():.4f} +- {std:.4f} | "
                     f"{100 * m50.mean() / teacher:.1f}% | {m95.mean():.4f} | {len(row['seeds'])} |")
    return "\n".join(lines) + "\n"
