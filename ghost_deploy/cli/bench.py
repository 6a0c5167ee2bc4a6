"""`ghost-deploy bench`: the click command over `run_bench` and `compare_results`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ghost_deploy.bench.regression import compare_results, format_comparison, load_result
from ghost_deploy.bench.report import format_summary
from ghost_deploy.bench.run import artifacts_from_run, normalise_artifacts, run_bench
from ghost_deploy.bench.timing import WarmupPolicy
from ghost_deploy.checkpoint import read_meta
from ghost_deploy.cli.options import (
    COUNT,
    FOLDER,
    NON_NEGATIVE_FLOAT,
    device_option,
    refuse_overwriting_inputs,
    threads_option,
)
from ghost_deploy.errors import EXIT_PARITY, UserError, handle_cli_errors

DEFAULT_RUN = Path("runs") / "demo"


def _default_data(artifacts: dict) -> str | None:
    """The dataset the first checkpoint was trained on. One that records a dataset not found from here (an old
    checkpoint's relative path, a deleted set) is one line naming both, unless another checkpoint's is found: mAP is
    never silently left out."""
    missing = None
    for path in artifacts.get("checkpoints", []):
        try:
            data = read_meta(path).dataset(path, "--data YAML, or --no-accuracy to time without mAP")
        except UserError as error:
            missing = missing or error
            continue
        if data:
            return str(data)
    if missing is not None:
        raise missing
    return None


def _gate(old_path: str, old: dict, new: dict, max_regression: float, max_map_drop: float) -> None:

    comparison = compare_results(old, new, max_regression, max_map_drop, old_path=old_path)
    click.echo(f"\ncompared with {old_path}:")
    click.echo(format_comparison(comparison))
    if not comparison["passed"]:
        click.echo("bench regression gate FAILED", err=True)
        sys.exit(EXIT_PARITY)


@click.command("bench")
@click.option("--run", "run_dir", type=click.Path(), default=None,
              help=f"Pipeline run folder: teacher/ghost checkpoints, export/*.onnx, engine/*.engine (default {DEFAULT_RUN}).")
@click.option("--checkpoint", multiple=True, type=click.Path(), help="Checkpoint to run in PyTorch (FP32 or GHOST fake-quant). Repeatable.")
@click.option("--onnx", multiple=True, type=click.Path(), help="ONNX to run with ONNX Runtime on the CPU. Repeatable.")
@click.option("--engine", multiple=True, type=click.Path(), help="TensorRT engine (needs TensorRT and its GPU). Repeatable.")
@click.option("--data", default=None, help="Dataset YAML for mAP (default: the checkpoint's dataset if present).")
@click.option("--no-accuracy", is_flag=True, help="Skip mAP even when a dataset is known (--data still gives the frames timed).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--max-images", type=COUNT, default=None, help="Score only the first N images of the split.")
@click.option("--batch", "batch_sizes", multiple=True, type=COUNT, default=(1,), show_default=True,
              help="Batch size to time. Repeatable (e.g. --batch 1 --batch 4).")
@click.option("--iterations", type=COUNT, default=100, show_default=True, help="Timed runs per backend and batch size.")
@click.option("--warmup-cv", type=NON_NEGATIVE_FLOAT, default=0.10, show_default=True,
              help="Warm-up ends when the coefficient of variation of the last 10 runs is at most this.")
@click.option("--warmup-max", type=COUNT, default=300, show_default=True,
              help="Most warm-up runs per backend and batch size (also capped at 20 s).")
@threads_option
@device_option
@click.option("--out", "out_dir", type=FOLDER, default=None, help="Output folder (default RUN/bench or runs/bench).")
@click.option("--compare", "compare_to", type=click.Path(), default=None, help="Older bench.json: print deltas, exit 1 past the thresholds.")
@click.option("--against", type=click.Path(), default=None, help="With --compare: compare this saved bench.json instead of running.")
@click.option("--max-regression", type=NON_NEGATIVE_FLOAT, default=0.10, show_default=True,
              help="Largest allowed relative growth of p50 latency (0.10 = 10 %).")
@click.option("--max-map-drop", type=NON_NEGATIVE_FLOAT, default=0.01, show_default=True,
              help="Largest allowed absolute drop of mAP50 or mAP50:95.")
@click.option("--no-plots", is_flag=True, help="Write the JSON and Markdown without PNG plots.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@handle_cli_errors
def bench_command(run_dir, checkpoint, onnx, engine, data, no_accuracy, split, max_images, batch_sizes, iterations,
                  warmup_cv, warmup_max, threads, device, out_dir, compare_to, against, max_regression, max_map_drop, no_plots, no_progress):
    """How fast, how big and how accurate each form of the model is, measured in one run on the same inputs.

    \b
    Backends: PyTorch FP32 / GHOST fake-quant (checkpoints), ONNX Runtime (each ONNX), TensorRT (engines).
    Writes OUT/bench.json (docs/bench-schema.json), OUT/report.md and its plots.
      ghost-deploy bench                               the demo run (runs/demo)
      ghost-deploy bench --run runs/vedai --batch 1 --batch 4
      ghost-deploy bench --compare old/bench.json      gate: exit 1 if p50 grew > 10 % or mAP fell > 0.01
    """
    # PyTorch's OpenMP threads spin after each run unless told otherwise, stealing the cores from the
    # backend that runs next in an interleaved round; this must be set before torch is first imported.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    if against and not compare_to:
        raise UserError("--against", "needs --compare OLD.json")
    old = load_result(compare_to) if compare_to else None  # a bad --compare file fails before a long run
    if against:
        _gate(compare_to, old, load_result(against), max_regression, max_map_drop)
        return
    explicit = {"checkpoints": list(checkpoint), "onnx": list(onnx), "engines": list(engine)}
    if run_dir is None and not any(explicit.values()):
        if not DEFAULT_RUN.is_dir():
            raise UserError(DEFAULT_RUN, "no artifacts given and no demo run here: pass --run RUN or "
                            "--checkpoint/--onnx/--engine (`ghost-deploy pipeline` writes runs/demo)")
        run_dir = DEFAULT_RUN
    artifacts = artifacts_from_run(run_dir) if run_dir else {}
    for key, paths in explicit.items():
        artifacts[key] = [*artifacts.get(key, []), *paths]
    artifacts = normalise_artifacts(artifacts)
    if data is None and not no_accuracy:
        data = _default_data(artifacts)  # with --no-accuracy and no --data: synthetic frames, nothing to score
    out = Path(out_dir) if out_dir else (Path(run_dir) / "bench" if run_dir else Path("runs") / "bench")
    for written in ("bench.json", "report.md"):
        refuse_overwriting_inputs("--out", out / written, {"baseline given as --compare": compare_to})
    result = run_bench(artifacts, out, data=data, batch_sizes=batch_sizes, iterations=iterations, split=split,
                       max_images=max_images, progress=not no_progress, threads=threads, device=device,
                       warmup=WarmupPolicy(cv_target=warmup_cv, max_iterations=warmup_max,
                                           min_iterations=min(WarmupPolicy.min_iterations, warmup_max)),
                       plots=not no_plots, log=click.echo, accuracy=not no_accuracy)
    click.echo("")
    click.echo(format_summary(result))
    click.echo(f"\nwrote {result['outputs']['json']} and {result['outputs']['report']}"
               + (f" (+{len(result['outputs']) - 2} plots)" if len(result["outputs"]) > 2 else ""))
    if compare_to:
        _gate(compare_to, old, result, max_regression, max_map_drop)
