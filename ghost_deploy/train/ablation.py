"""The GHOST ablation: one teacher, one seed, each ingredient added in turn, scored on the test split.

Rows: FP32 teacher; uniform 8-bit QAT; uniform 4-bit QAT without distillation; HQ plan without
distillation; HQ + GQSD (every layer distilled, no switch); HQ + GQSD + OST/SCM (the full method); and the
post-training baselines from the same teacher: INT8 PTQ and PTQ at the GHOST bit plan.
"""
from __future__ import annotations

from pathlib import Path

from ghost_deploy.checkpoint import model_from_checkpoint, read_meta
from ghost_deploy.data import load_dataset_yaml
from ghost_deploy.data.calib import make_calib_set
from ghost_deploy.data.dataset import Dataset
from ghost_deploy.eval.val import evaluate_model
from ghost_deploy.io import write_json_atomic
from ghost_deploy.quant import average_weight_bits, bops, size_mb, uniform_plan
from ghost_deploy.quant.ptq import ptq_checkpoint
from ghost_deploy.train.loop import make_loader, train_ghost, train_teacher

ROWS = (
    ("uniform W8 QAT", {"plan": ("uniform", 8), "distill": False}),
    ("uniform W4 QAT, no distillation", {"plan": ("uniform", 4), "distill": False}),
    ("HQ plan, no distillation", {"plan": "hq", "distill": False}),
    ("HQ + GQSD (no switch)", {"plan": "hq", "distill": True, "switch": False}),
    ("HQ + GQSD + OST/SCM (GHOST)", {"plan": "hq", "distill": True, "switch": True}),
)


def score_checkpoint(path, recipe: dict, split: str = "test", data: str | None = None) -> dict:
    """mAP on `split` of `data` (default: the dataset the checkpoint trained on), average bits, size and BOPs."""
    model, meta = model_from_checkpoint(path, with_sr=False)
    spec = load_dataset_yaml(data or meta.dataset(path))
    loader = make_loader(Dataset(spec, split, meta.img_size, augment=False), 16, False, 0)
    metrics = evaluate_model(model, loader, meta.nc, recipe["eval"]["conf_thres"], recipe["eval"]["iou_thres"])
    plan = meta.bit_plan or uniform_plan(model, weight_bits=32, act_bits=32, image_size=meta.img_size)
    return {"mAP50": metrics["mAP50"], "mAP50_95": metrics["mAP50_95"], "per_class_ap50": metrics["per_class"]["ap50"],
            "avg_weight_bits": average_weight_bits(plan)["param_weighted"], "size_mb": size_mb(plan),
            "bops_g": bops(plan) / 1e9, "checkpoint": str(path)}


def run_ablation(recipe: dict, out: Path, teacher: str | None = None, epochs: int | None = None, split: str = "test",
                 progress: bool = False, log=print) -> list[dict]:

    out = Path(out)
    if teacher is None:
        teacher = train_teacher(recipe, out / "teacher", progress=progress, log=log, overwrite=True)["best"]
    rows = [{"row": "FP32 teacher", **score_checkpoint(teacher, recipe, split)}]
    log(_format_row(rows[-1]))
    for index, (name, setup) in enumerate(ROWS):
        if isinstance(setup["plan"], tuple):
            bits = setup["plan"][1]
            plan = lambda student, bits=bits: uniform_plan(student, weight_bits=bits, act_bits=8, image_size=recipe["img_size"])
        else:
            plan = None  # the recipe's HQ plan
        row_recipe = {**recipe, "ghost": {**recipe["ghost"], "distill": {**recipe["ghost"]["distill"], "switch": setup.get("switch", True)}}}
        result = train_ghost(row_recipe, out / f"row{index + 1}", teacher, bit_plan_path=plan, distill=setup["distill"], overwrite=True,
                             epochs=epochs, progress=progress, log=lambda *_: None)
        rows.append({"row": name, **score_checkpoint(result["best"], recipe, split)})
        log(_format_row(rows[-1]))
    rows += ptq_rows(recipe, out, teacher, ghost_checkpoint=result["best"], split=split, log=log)
    write_json_atomic(out / "ablation.json", rows)
    (out / "ablation.md").write_text(format_table(rows, split))
    return rows


def ptq_rows(recipe: dict, out: Path, teacher: str, ghost_checkpoint: str, split: str, log=print) -> list[dict]:
    """The post-training baselines from the same teacher: INT8 PTQ, and PTQ at the GHOST run's bit plan."""
    manifest = make_calib_set(read_meta(teacher).dataset(teacher), 256, split="train", out_dir=out / "calib",
                              force=True)
    rows = []
    for name, plan in (("PTQ INT8 (MSE calibration)", None), ("PTQ at the GHOST plan", ghost_checkpoint)):
        tag = "ptq-int8" if plan is None else "ptq-ghost-plan"
        path = ptq_checkpoint(teacher, out / f"{tag}.safetensors", manifest, plan=plan)
        rows.append({"row": name, **score_checkpoint(path, recipe, split)})
        log(_format_row(rows[-1]))
    return rows


def _format_row(row: dict) -> str:
    return (f"{row['row']:34s} mAP50 {row['mAP50']:.4f}  mAP50:95 {row['mAP50_95']:.4f}  bits {row['avg_weight_bits']:.2f}  "
            f"size {row['size_mb']:.3f} MB  BOPs {row['bops_g']:.2f} G")


def format_table(rows: list[dict], split: str) -> str:
    teacher = rows[0]["mAP50"] or 1e-12
    lines = [f"| model ({split} split) | mAP50 | mAP50:95 | % of teacher mAP50 | avg weight bits | size MB | BOPs G |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['mAP50']:.4f} | {row['mAP50_95']:.4f} | {100 * row['mAP50'] / teacher:.1f}% | "
                     f"{row['avg_weight_bits']:.2f} | {row['size_mb']:.3f} | {row['bops_g']:.2f} |")
    return "\n".join(lines) + "\n"
