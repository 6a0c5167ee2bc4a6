"""GHOST ablation on the embedded set (issue: GHOST training evidence). Writes OUT/ablation.{json,md}.

    python benchmarks/ablation.py [--teacher CKPT] [--out runs/ablation] [--recipe demo]
"""
import argparse

from ghost_deploy.train.ablation import format_table, run_ablation
from ghost_deploy.recipe import load_recipe

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="demo")
parser.add_argument("--teacher", default=None, help="reuse this FP32 teacher checkpoint")
parser.add_argument("--out", default="runs/ablation")
parser.add_argument("--epochs", type=int, default=None, help="override the GHOST epochs of every row")
parser.add_argument("--split", default="test")
args = parser.parse_args()
rows = run_ablation(load_recipe(args.recipe), args.out, teacher=args.teacher, epochs=args.epochs, split=args.split)
print(format_table(rows, args.split))
