"""PTQ vs GHOST: teacher FP32, PTQ INT8, PTQ at the GHOST bit plan and GHOST, each exported through the same
parity gate and scored on the same split. Writes OUT/ptq_table.{md,json}.

    python benchmarks/ptq_table.py --teacher RUN/teacher/weights/best.safetensors \\
                                   --ghost RUN/ghost/weights/best.safetensors [--out runs/ptq_table]

The calibration set is drawn from the teacher's training split (`--n` pairs, stratified; see
docs/calibration.md) unless `--calib` names a manifest. PTQ at the GHOST plan uses the GHOST checkpoint's own
bit plan, so the gap between that row and GHOST is what training buys at equal bits.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ghost_deploy.train.ablation import score_checkpoint
from ghost_deploy.data.calib import load_calib_set, make_calib_set
from ghost_deploy.checkpoint import read_meta
from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.io import write_json_atomic, write_text_atomic
from ghost_deploy.quant.ptq import CALIBRATORS, WEIGHT_METHODS, ptq_checkpoint


def export_verdict(checkpoint: Path, onnx_path: Path, fp32: bool) -> dict:
    """Export with the parity gate; the verdict is a row of the table, so a failed gate does not stop it."""
    from ghost_deploy.export import export_onnx

    try:
        result = export_onnx(checkpoint, onnx_path, fp32=fp32, progress=False)
    except ParityError as error:
        report = error.report or {}
        failures = ((report.get("parity") or {}).get("report") or {}).get("failures") or [str(error)]
        return {"parity": f"FAILED: {failures[0]}", "parity_detail": str(error), "onnx": report.get("onnx"),
                "onnx_mb": (report.get("onnx_bytes") or 0) / 1e6, "parity_images": _source(report)}
    report = result.report
    outputs = (report["parity"]["report"] or {}).get("outputs") or {}
    cosines = [stats.get("min_cosine_per_image") for stats in outputs.values()]
    return {"parity": "PASSED", "parity_detail": "", "onnx": str(result.onnx_path),
            "onnx_mb": report["onnx_bytes"] / 1e6, "parity_images": _source(report),
            "min_cosine": min([c for c in cosines if c is not None], default=None)}


def _source(report: dict) -> str:
    return ((report or {}).get("parity") or {}).get("source", "")


def dataset_key(data_yaml: str) -> str:
    """'embedded' for the embedded demo set (so the manifest resolves on any machine), else the YAML."""
    from ghost_deploy.data import ensure_synthetic_dataset

    if data_yaml in (None, "embedded"):
        return "embedded"
    if Path(data_yaml).resolve() == Path(ensure_synthetic_dataset(seed=0)).resolve():
        return "embedded"
    return data_yaml


def build_table(teacher, ghost, out, calib=None, n: int = 256, calibrators=("mse",), weight_method: str = "mse",
                split: str = "test", log=print) -> dict:
    """Rows: FP32 teacher; per calibrator PTQ INT8 and PTQ at the GHOST plan; GHOST. Each exported + scored."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, ghost = Path(teacher), Path(ghost)
    teacher_meta, ghost_meta = read_meta(teacher), read_meta(ghost)
    if teacher_meta.get("bit_plan"):
        raise UserError(teacher, "--teacher must be an FP32 checkpoint")
    if not ghost_meta.get("bit_plan"):
        raise UserError(ghost, "--ghost must be a quantized checkpoint (it has no bit plan)")
    recipe = teacher_meta["recipe"]
    if calib is None:
        calib = make_calib_set(dataset_key(teacher_meta.get("data")), n, split="train", out_dir=out / "calib",
                               force=True)
    calib_set = load_calib_set(calib)
    log(f"calibration set {calib_set.name}: {len(calib_set)} pairs (sha256 {calib_set.sha256[:12]})")

    plan = [("FP32 teacher", teacher, True)]
    for calibrator in calibrators:
        int8 = out / f"ptq_int8_{calibrator}.safetensors"
        at_plan = out / f"ptq_ghost_plan_{calibrator}.safetensors"
        ptq_checkpoint(teacher, int8, calib, weight_method=weight_method, act_calibrator=calibrator, log=log)
        ptq_checkpoint(teacher, at_plan, calib, plan=ghost, weight_method=weight_method, act_calibrator=calibrator,
                       log=log)
        plan += [(f"PTQ INT8 (W8/A8, {calibrator})", int8, False),
                 (f"PTQ at the GHOST plan ({calibrator})", at_plan, False)]
    plan.append(("GHOST (QAT + distillation)", ghost, False))
    rows = []
    for index, (name, checkpoint, fp32) in enumerate(plan):
        log(f"[{index + 1}/{len(plan)}] {name}: export + parity gate, then mAP on {split}")
        verdict = export_verdict(checkpoint, out / f"row{index + 1}.onnx", fp32)
        score = score_checkpoint(checkpoint, recipe, split)
        rows.append({"row": name, **score, **verdict})
        log(f"  mAP50 {score['mAP50']:.4f}  size {score['size_mb']:.3f} MB  parity {verdict['parity']}")
    table = {"split": split, "calib_set": calib_set.record(), "calibrators": list(calibrators),
             "weight_method": weight_method, "teacher": str(teacher), "ghost": str(ghost), "rows": rows}
    write_json_atomic(out / "ptq_table.json", json.loads(json.dumps(table, default=_plain)))
    write_text_atomic(out / "ptq_table.md", format_table(table))
    return table


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def format_table(table: dict) -> str:
    rows = table["rows"]
    teacher = rows[0]["mAP50"] or 1e-12
    calib = table["calib_set"]
    lines = [f"| model ({table['split']} split) | mAP50 | mAP50:95 | % of teacher mAP50 | avg weight bits | size MB | "
             f"ONNX MB | parity |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['mAP50']:.4f} | {row['mAP50_95']:.4f} | "
                     f"{100 * row['mAP50'] / teacher:.1f}% | {row['avg_weight_bits']:.2f} | {row['size_mb']:.3f} | "
                     f"{row['onnx_mb']:.2f} | {row['parity']} |")
    lines.append("")
    calibrators = ", ".join(table["calibrators"])
    lines.append(f"PTQ: weights per channel ({table['weight_method']}), activations per tensor ({calibrators}), "
                 f"calibrated on `{calib['name']}` ({calib['pairs']} RGB+IR pairs of {calib['split']}, manifest sha256 "
                 f"{calib['sha256'][:12]}). Size MB: packed weight codes + float scales and biases (the bit plan's "
                 f"deployable size). Parity: QDQ ONNX in ONNX Runtime vs the PyTorch model with the same quantizers, "
                 f"on {rows[0].get('parity_images') or 'the parity images'}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="FP32 teacher checkpoint")
    parser.add_argument("--ghost", required=True, help="GHOST checkpoint (its bit plan is the PTQ-at-plan row's)")
    parser.add_argument("--out", default="runs/ptq_table")
    parser.add_argument("--calib", default=None, help="calibration manifest (default: make one from the train split)")
    parser.add_argument("--n", type=int, default=256, help="pairs in the calibration set made when --calib is absent")
    parser.add_argument("--calibrator", default="mse",
                        help=f"activation calibrator, or a comma list for one pair of PTQ rows each "
                             f"({', '.join(CALIBRATORS)})")
    parser.add_argument("--weight-method", choices=WEIGHT_METHODS, default="mse")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    calibrators = [name.strip() for name in args.calibrator.split(",") if name.strip()]
    unknown = [name for name in calibrators if name not in CALIBRATORS]
    if unknown or not calibrators:
        parser.error(f"--calibrator: unknown {unknown} (choose from {', '.join(CALIBRATORS)})")
    try:
        table = build_table(args.teacher, args.ghost, args.out, calib=args.calib, n=args.n, calibrators=calibrators,
                            weight_method=args.weight_method, split=args.split)
    except UserError as error:
        print(f"error: {error.line()}", file=sys.stderr)
        return 2
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
