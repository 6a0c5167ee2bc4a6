"""`ghost-deploy train`, `plan` and `pipeline`: the training stage and the whole pipeline."""
from __future__ import annotations

from pathlib import Path

import click

from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.cli.options import (
    COUNT,
    FILE,
    FOLDER,
    NON_NEGATIVE_FLOAT,
    POSITIVE_FLOAT,
    BoundedInt,
    device_option,
    echo_log,
    no_progress_option,
    recipe_option,
    refuse_overwriting_inputs,
)
from ghost_deploy.errors import UserError, handle_cli_errors
from ghost_deploy.pipeline import run_pipeline
from ghost_deploy.quant.hq import choose_plan
from ghost_deploy.quant.plans import with_residual_outputs
from ghost_deploy.recipe import load_recipe
from ghost_deploy.train.loop import AMP_MODES
from ghost_deploy.train.run import run_training


@click.command()
@click.option("--stage", type=click.Choice(["teacher", "ghost", "all"]), default="all", show_default=True,
              help="teacher: FP32 only; ghost: HQ + QAT from --teacher; all: both.")
@recipe_option
@click.option("--data", type=click.Path(), default=None, help="Dataset YAML (default: the recipe's, else the embedded demo set).")
@click.option("--out", "out_dir", type=FOLDER, default=None, help="Run folder (default runs/<recipe>).")
@click.option("--teacher", type=click.Path(), default=None, help="FP32 teacher checkpoint for --stage ghost.")
@click.option("--bit-plan", type=click.Path(), default=None, help="Use this (edited) bit plan JSON instead of HQ.")
@click.option("--epochs", type=COUNT, default=None, help="Override the recipe's epochs for every stage run.")
@device_option
@click.option("--amp", type=click.Choice(AMP_MODES), default=None,
              help="Mixed precision: bf16 (CPU or CUDA), fp16 (CUDA, with loss scaling), off; default the recipe's "
                   "amp (auto: fp16 on CUDA, off on the CPU). Quantizers and losses stay float32.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved epoch.")
@click.option("--force", is_flag=True, help="Replace a run already in --out (without it, such a folder is refused).")
@click.option("--strict", is_flag=True, help="Bad samples are errors instead of skipped with a warning.")
@click.option("--nproc", type=COUNT, default=1, show_default=True, help="Processes for DDP (torchrun-style, gloo on CPU).")
@no_progress_option
@handle_cli_errors
def train(stage, recipe, data, out_dir, teacher, bit_plan, epochs, device, amp, resume, force, strict, nproc,
          no_progress):
    """Train the FP32 teacher and/or the GHOST mixed-precision student.

    With no arguments: the demo recipe on the embedded RGB+IR dataset, teacher then GHOST, into runs/demo.
    """

    for option, value in (("--teacher", teacher), ("--bit-plan", bit_plan)):
        if value and stage == "teacher":  # the teacher stage trains the FP32 model: it reads neither
            raise UserError(option, "has no effect with --stage teacher (it is read by the GHOST stage: "
                                    "--stage ghost or all)")
    loaded = load_recipe(recipe)
    if amp is not None:
        loaded["amp"] = amp
    out = Path(out_dir or Path("runs") / loaded["name"])
    run_training(loaded, out, stage=stage, data=data, teacher=teacher, bit_plan=bit_plan, epochs=epochs, device=device,
                 resume=resume, strict=strict, nproc=nproc, progress=not no_progress, log=echo_log, force=force)


@click.command()
@recipe_option
@click.option("--data", type=click.Path(), default=None, help="Dataset YAML (default: the recipe's; demo: the embedded set).")
@click.option("--out", "out_dir", type=FOLDER, default=None, help="Run folder (default runs/<recipe>).")
@click.option("--target", default="jetson-orin-nano", show_default=True, help="Engine target profile (engines/targets).")
@click.option("--bench-iterations", type=COUNT, default=50, show_default=True, help="Timed iterations per backend.")
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs did not change (and replace a run "
                                            "in --out the pipeline did not make).")
@no_progress_option
@handle_cli_errors
def pipeline(recipe, data, out_dir, target, bench_iterations, force, no_progress):
    """train -> export -> build-engine -> bench in one run folder, with one summary at the end.

    With no arguments: the demo recipe on the embedded RGB+IR set into runs/demo. Stages whose inputs
    did not change since the last run are skipped (runs/demo/pipeline.json records why).
    """

    loaded = load_recipe(recipe)
    run_pipeline(loaded, Path(out_dir or Path("runs") / loaded["name"]), target=target, data=data, force=force,
                 bench_iterations=bench_iterations, progress=not no_progress, log=echo_log)


@click.command("plan")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", type=FILE, required=True, help="Bit plan JSON to write (edit it, then train --bit-plan).")
@click.option("--threshold", type=NON_NEGATIVE_FLOAT, default=None, help="HQ k-means threshold T (paper: 0.1).")
@click.option("--distortion", type=click.Choice(["relative", "raw"]), default="relative", show_default=True,
              help="HQ's score: relative (scale-free, the deployed 2^n-1 levels; T alike on every model) or raw "
                   "(the paper's MSE of the raw weights).")
@click.option("--avg-bits", type=POSITIVE_FLOAT, default=None, help="Budget mode: average weight bits.")
@click.option("--size-mb", type=POSITIVE_FLOAT, default=None, help="Budget mode: model size in MB.")
@click.option("--bops-g", type=POSITIVE_FLOAT, default=None, help="Budget mode: GBOPs.")
@click.option("--act-bits", type=BoundedInt(2, 8), default=8, show_default=True)
@click.option("--residual-outputs", is_flag=True,
              help="Quantize each residual branch's output too (train with it), so ONNX Runtime runs the branch and "
                   "its add in integers (target cpu); TensorRT does not need it. See docs/quantization.md.")
@handle_cli_errors
def plan_command(checkpoint, out, threshold, distortion, avg_bits, size_mb, bops_g, act_bits, residual_outputs):
    """Choose per-layer bits for CHECKPOINT's model: HQ (default) or a size/BOPs/bits budget."""
    refuse_overwriting_inputs("--out", out, {"checkpoint the plan is made for": checkpoint})
    model, meta = model_from_checkpoint(checkpoint, with_sr=False)
    budget = {k: v for k, v in {"avg_bits": avg_bits, "size_mb": size_mb, "bops_g": bops_g}.items() if v is not None}
    options = {"avg_bits": "--avg-bits", "size_mb": "--size-mb", "bops_g": "--bops-g"}
    if len(budget) > 1:
        raise UserError(options[next(iter(budget))], f"give one budget, not {' and '.join(options[k] for k in budget)}")
    if budget and threshold is not None:
        raise UserError("--threshold", f"is HQ's threshold; with a budget ({options[next(iter(budget))]}) the bits "
                                       "come from the budget: give one or the other")
    try:
        plan = choose_plan(model, "budget" if budget else "hq", meta.img_size, budget=budget, act_bits=act_bits,
                           threshold=threshold if threshold is not None else 0.1, distortion=distortion)
    except UserError as error:
        if error.path is None and budget:  # an unreachable budget: name the option it came from
            raise UserError(options[next(iter(budget))], error.problem) from None
        raise
    if residual_outputs:
        plan = with_residual_outputs(plan, model)
    plan.save(out)
    click.echo(plan.summary())
    click.echo(f"bit plan written to {out}")
