"""The low-bit ablation (issue 16): GHOST's parts where quantization hurts. Writes docs/results/ablation-lowbit.json.

    python benchmarks/ablation_lowbit.py --teacher runs/demo/teacher/weights/best.safetensors \
        [--out runs/ablation-lowbit] [--seeds 0 1 2] [--epochs 6] [--threads 2] [--max-avg-bits 2.75 --bit-range 2 3]

The embedded set is drawn larger here (400 train, 300 val, 500 test; the train images are the demo's own, so the
demo teacher can be reused). One teacher; each seed re-runs every row after it. Rows: ghost_deploy/train/lowbit.py.
An interrupted run continues: finished rows are read back from <out>/seed<k>/<row>/score.json.
"""
import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from ghost_deploy.data.synth import ensure_synthetic_dataset
from ghost_deploy.io import write_json_atomic
from ghost_deploy.recipe import load_recipe
from ghost_deploy.train.loop import train_teacher
from ghost_deploy.train.lowbit import ROW_ORDER, format_summary, paired, run_extra_rows, run_seed, summarise

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="demo")
parser.add_argument("--teacher", default=None, help="FP32 teacher to reuse (default: train one on the train split)")
parser.add_argument("--out", default="runs/ablation-lowbit")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--epochs", type=int, default=6, help="epochs of every QAT row and of teacher-finetuned")
parser.add_argument("--max-avg-bits", type=float, default=2.75)
parser.add_argument("--bit-range", type=int, nargs=2, default=[2, 3], help="HQ's bit_min bit_max for the main plan")
parser.add_argument("--no-extra", action="store_true", help="skip the W3.5 and A4 rows")
parser.add_argument("--ost-weights", type=float, nargs=2, default=[4.0, 16.0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--json", default="docs/results/ablation-lowbit.json")
parser.add_argument("--summarise-only", action="store_true",
                    help="train nothing: summarise the rows already finished under --out (e.g. while extras still run)")
args = parser.parse_args()

torch.set_num_threads(args.threads)
recipe = load_recipe(args.recipe)
data_yaml = str(ensure_synthetic_dataset(n_train=400, n_val=300, n_test=500, img_size=recipe["img_size"]))
out = Path(args.out)
teacher = args.teacher or train_teacher(recipe, out / "teacher", data=data_yaml, progress=False, overwrite=False)["best"]
started = time.time()
scores = []
if args.summarise_only:
    scores = [json.loads(path.read_text()) for seed in args.seeds
              for path in sorted((out / f"seed{seed}").glob("*/score.json"))]
    order = {name: index for index, name in enumerate(ROW_ORDER)}
    scores.sort(key=lambda score: (order.get(score["name"], len(order)), score["name"], score["seed"]))
for seed in [] if args.summarise_only else args.seeds:
    scores += run_seed(recipe, teacher, data_yaml, out, seed, args.epochs, tuple(args.ost_weights), args.max_avg_bits,
                       tuple(args.bit_range), log=lambda line: print(line, flush=True))
for seed in [] if args.no_extra or args.summarise_only else args.seeds:  # after every seed's main rows, so those finish first
    scores += run_extra_rows(recipe, teacher, data_yaml, out, seed, args.epochs, args.ost_weights[1], args.max_avg_bits,
                             tuple(args.bit_range), log=lambda line: print(line, flush=True))
summary = summarise(scores)
low, high = args.ost_weights
finite = lambda value: value if isinstance(value, int) or math.isfinite(value) else None  # noqa: E731 (JSON has no NaN)
summary["paired"] = {f"{a} - {b}": dict(zip(("mean", "std", "seeds"), map(finite, paired(summary, a, b)))) for a, b in (
    (f"gqsd-ost{low:g}", "qat"), (f"gqsd-ost{high:g}", "qat"), ("ghost", "ghost-random-gate"), ("ghost", "qat"),
    ("ghost", "uniform-same-bits"), ("teacher-finetuned", "teacher"), ("qat", "ptq"))}
summary["setup"] = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "recipe": args.recipe,
                    "teacher": teacher, "data": data_yaml, "split_sizes": {"train": 400, "val": 300, "test": 500},
                    "epochs": args.epochs, "max_avg_bits": args.max_avg_bits, "bit_range": args.bit_range, "ost_weights": args.ost_weights,
                    "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads", "wall_s": round(time.time() - started, 1)}
write_json_atomic(Path(args.json), summary)
print(format_summary(summary))
print(json.dumps(summary["paired"], indent=1))
