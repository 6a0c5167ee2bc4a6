"""Does IR help? Train the demo teacher with `rgb+ir` and with `rgb` only; per-class AP50 on the test split.

The embedded set has classes that look the same in RGB and differ only in IR (car vs car_running), so a
model that ignores IR cannot separate them. Writes OUT/modality.{json,md}.

    python benchmarks/modality.py [--out runs/modality] [--recipe demo]
"""
import argparse
from pathlib import Path

from ghost_deploy.train.ablation import score_checkpoint
from ghost_deploy.checkpoint import read_meta
from ghost_deploy.data import load_dataset_yaml
from ghost_deploy.io import write_json_atomic
from ghost_deploy.recipe import load_recipe
from ghost_deploy.train.loop import train_teacher

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="demo")
parser.add_argument("--out", default="runs/modality")
parser.add_argument("--split", default="test")
parser.add_argument("--fused-teacher", default=None, help="reuse this rgb+ir teacher (e.g. the pipeline's) instead of training one")
args = parser.parse_args()
recipe = load_recipe(args.recipe)
results = {}
for mode in ("rgb+ir", "rgb"):
    if mode == "rgb+ir" and args.fused_teacher:
        best = args.fused_teacher
    else:
        best = train_teacher({**recipe, "input_mode": mode}, Path(args.out) / mode.replace("+", "_"), progress=False,
                             log=lambda *_: None, overwrite=True)["best"]
    results[mode] = score_checkpoint(best, recipe, args.split)
    print(mode, f"mAP50 {results[mode]['mAP50']:.4f}")
spec = load_dataset_yaml(read_meta(results["rgb+ir"]["checkpoint"])["data"])
ir_only = set(spec.ir_only_classes)
lines = [f"| class ({args.split} split) | IR-only | AP50 rgb+ir | AP50 rgb | difference (points) |", "|---|---|---|---|---|"]
for index, name in enumerate(spec.names):
    fused, rgb = results["rgb+ir"]["per_class_ap50"][index], results["rgb"]["per_class_ap50"][index]
    diff = "" if fused is None or rgb is None else f"{100 * (fused - rgb):+.1f}"
    lines.append(f"| {name} | {'yes' if name in ir_only else ''} | {fused if fused is None else f'{fused:.3f}'} | "
                 f"{rgb if rgb is None else f'{rgb:.3f}'} | {diff} |")
lines.append(f"| **all (mAP50)** | | {results['rgb+ir']['mAP50']:.3f} | {results['rgb']['mAP50']:.3f} | "
             f"{100 * (results['rgb+ir']['mAP50'] - results['rgb']['mAP50']):+.1f} |")
table = "\n".join(lines) + "\n"
write_json_atomic(Path(args.out) / "modality.json", results)
(Path(args.out) / "modality.md").write_text(table)
print(table)
