"""The `ghost-deploy` command line: thin wrappers over the stage functions.

Exit codes: 0 success, 1 a parity gate failed (the report is saved), 2 bad input (one line naming the
file and the problem; `--debug` shows the traceback).
"""
from __future__ import annotations

import os
import sys

# Before torch or onnxruntime load OpenMP: idle threads sleep instead of spinning, so a busy machine (or ORT and
# PyTorch in one process) does not slow every parallel region several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import warnings
from pathlib import Path

import click

from ghost_deploy.errors import DEBUG, EXIT_USER, UserError, handle_cli_errors

_handle_errors = handle_cli_errors  # stage commands (bench, export) import it from here or from errors


class _StageGroup(click.Group):
    """Loads `export` only when it is named: ghost_deploy.export imports torch, which the other commands skip."""

    lazy = {"export": ("ghost_deploy.cli.export", "export_command"), "calib": ("ghost_deploy.data.calib", "calib_group")}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attribute = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=_StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (they are one line otherwise).")
@click.version_option(package_name="ghost-deploy")
def main(debug: bool) -> None:
    """ghost-deploy: GHOST mixed-precision detectors for RGB+IR imagery, from training to TensorRT engines.

    \b
    Typical flow (each stage reads the previous stage's artifact):
      ghost-deploy train                       FP32 teacher -> HQ bit plan -> GHOST QAT with self-distillation
      ghost-deploy export --onnx RUN/ghost.safetensors   QDQ ONNX + parity gate vs PyTorch (ONNX Runtime)
      ghost-deploy build-engine --target jetson          TensorRT engine, or a deployment bundle off-device
      ghost-deploy bench                       latency, size and mAP of every form of the model
      ghost-deploy pipeline                    all of the above on the embedded demo set
    """
    DEBUG["on"] = debug
    if not debug:
        previous = warnings.showwarning
        warnings.showwarning = _warning_line
        click.get_current_context().call_on_close(lambda: setattr(warnings, "showwarning", previous))


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (e.g. bad samples skipped) as one `warning: ...` line on stderr; --debug keeps Python's format."""
    click.echo(f"warning: {message}", err=True)


def _log(message: str) -> None:
    click.echo(message, err=False)


@main.command()
@click.option("--stage", type=click.Choice(["teacher", "ghost", "all"]), default="all", show_default=True,
              help="teacher: FP32 only; ghost: HQ + QAT from --teacher; all: both.")
@click.option("--recipe", default="demo", show_default=True, help="Recipe name in training/ or a YAML path.")
@click.option("--data", type=click.Path(), default=None, help="Dataset YAML (default: the recipe's, else the embedded demo set).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<recipe>).")
@click.option("--teacher", type=click.Path(), default=None, help="FP32 teacher checkpoint for --stage ghost.")
@click.option("--bit-plan", type=click.Path(), default=None, help="Use this (edited) bit plan JSON instead of HQ.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs for every stage run.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved epoch.")
@click.option("--strict", is_flag=True, help="Bad samples are errors instead of skipped with a warning.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Processes for DDP (torchrun-style, gloo on CPU).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@_handle_errors
def train(stage, recipe, data, out_dir, teacher, bit_plan, epochs, device, resume, strict, nproc, no_progress):
    """Train the FP32 teacher and/or the GHOST mixed-precision student.

    With no arguments: the demo recipe on the embedded RGB+IR dataset, teacher then GHOST, into runs/demo.
    """
    from ghost_deploy.train.run import run_training
    from ghost_deploy.recipe import load_recipe

    loaded = load_recipe(recipe)
    out = Path(out_dir or Path("runs") / loaded["name"])
    run_training(loaded, out, stage=stage, data=data, teacher=teacher, bit_plan=bit_plan, epochs=epochs, device=device,
                 resume=resume, strict=strict, nproc=nproc, progress=not no_progress, log=_log)


@main.command("build-engine")
@click.option("--onnx", "onnx_path", type=click.Path(), default=None,
              help="QDQ ONNX from `export` (default: the newest in runs/demo/export).")
@click.option("--target", default="jetson", show_default=True,
              help="Target profile in engines/targets (jetson = the board we run on, else jetson-agx-orin).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder (default: beside the ONNX, engine/).")
@click.option("--parity-set", type=click.Path(), default=None, help="Parity set .npz (default: the one export saved beside the ONNX).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint the ONNX came from (hashed into the receipt).")
@click.option("--dla-core", type=int, multiple=True, help="Also build for this DLA core (parity-checked separately).")
@click.option("--timing-cache", type=click.Path(), default=None, help="TensorRT timing cache file (read and updated).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimisation level.")
@click.option("--strongly-typed", is_flag=True, help="TensorRT 10.x: build strongly typed (11.x always is).")
@click.option("--require-engine", is_flag=True, help="Exit 1 when no engine can be built here (instead of writing a bundle).")
@click.option("--verify", "verify_engine", type=click.Path(), default=None,
              help="Check this machine's TensorRT/GPU/JetPack against ENGINE's receipt, then exit.")
@_handle_errors
def build_engine(onnx_path, target, out_dir, parity_set, checkpoint, dla_core, timing_cache, opt_level, strongly_typed,
                 require_engine, verify_engine):
    """Compile the QDQ ONNX into a TensorRT engine for TARGET, parity-checked on every build.

    Where TensorRT or the target GPU is absent (any x86 dev box or CI), writes a deployment bundle
    instead: the ONNX, the profile, the parity set, a partial receipt, a one-command build script
    for the device and the equivalent trtexec lines. It says plainly that no engine was built.
    """
    from ghost_deploy.engines import build, verify_runtime

    if verify_engine:
        receipt = Path(verify_engine)
        receipt = receipt if receipt.suffix == ".json" else receipt.with_suffix(".receipt.json")
        if not receipt.exists():
            raise UserError(receipt, "no receipt beside this engine")
        problems = verify_runtime(receipt)
        for problem in problems:
            click.echo(f"mismatch: {problem}")
        click.echo("runtime matches the receipt" if not problems else f"{len(problems)} mismatch(es): rebuild the engine here")
        sys.exit(EXIT_USER if problems else 0)
    onnx = Path(onnx_path) if onnx_path else _newest(Path("runs/demo/export"), "*.onnx")
    result = build(onnx, target, Path(out_dir) if out_dir else onnx.parent.parent / "engine", require_engine=require_engine,
                   dla_core=list(dla_core) or None, timing_cache=timing_cache, parity_set=parity_set, checkpoint=checkpoint,
                   opt_level=opt_level, strongly_typed=strongly_typed, require_export=True)
    if result["status"] == "engine":
        for engine in result["engines"]:
            click.echo(f"engine: {engine['engine']} (receipt {engine['receipt']})")
    sys.exit(result["exit_code"])  # build() has said plainly that no engine was built, and where the bundle is


def _newest(folder: Path, pattern: str) -> Path:
    found = sorted((p for p in folder.glob(pattern) if ".FAILED." not in p.name), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(folder, f"no {pattern} here; pass the file explicitly")
    return found[-1]


@main.command()
@click.option("--recipe", default="demo", show_default=True, help="Recipe name in training/ or a YAML path.")
@click.option("--data", type=click.Path(), default=None, help="Dataset YAML (default: the recipe's; demo: the embedded set).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<recipe>).")
@click.option("--target", default="jetson-orin-nano", show_default=True, help="Engine target profile (engines/targets).")
@click.option("--bench-iterations", type=int, default=50, show_default=True, help="Timed iterations per backend.")
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs did not change.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@_handle_errors
def pipeline(recipe, data, out_dir, target, bench_iterations, force, no_progress):
    """train -> export -> build-engine -> bench in one run folder, with one summary at the end.

    With no arguments: the demo recipe on the embedded RGB+IR set into runs/demo. Stages whose inputs
    did not change since the last run are skipped (runs/demo/pipeline.json records why).
    """
    from ghost_deploy.pipeline import run_pipeline
    from ghost_deploy.recipe import load_recipe

    loaded = load_recipe(recipe)
    run_pipeline(loaded, Path(out_dir or Path("runs") / loaded["name"]), target=target, data=data, force=force,
                 bench_iterations=bench_iterations, progress=not no_progress, log=_log)


@main.group()
def data() -> None:
    """Datasets: convert VEDAI annotations, generate the embedded demo set."""


@data.command("convert-vedai")
@click.argument("annotation_file", type=click.Path())
@click.argument("labels_dir", type=click.Path(file_okay=False))
@click.option("--image-size", type=int, default=1024, show_default=True, help="Pixel size the annotation coordinates refer to.")
@_handle_errors
def convert_vedai_command(annotation_file, labels_dir, image_size):
    """Turn VEDAI's annotation file (e.g. annotation1024.txt) into YOLO labels in LABELS_DIR.

    Classes in GHOST's order: car, pickup, camping, truck, other, tractor, boat, van. Motorcycles,
    buses and planes are dropped and counted (not merged into van). See docs/data.md for the map.
    """
    from ghost_deploy.data import convert_vedai

    stats = convert_vedai(annotation_file, labels_dir, image_size=image_size)
    click.echo(" ".join(f"{k}={v}" for k, v in stats.items()))


@data.command("synth")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Where to write (default: the cache folder).")
@click.option("--seed", type=int, default=0, show_default=True)
@_handle_errors
def synth_command(root, seed):
    """Generate (or find) the embedded RGB+IR demo set and print its dataset YAML."""
    from ghost_deploy.data import ensure_synthetic_dataset

    click.echo(str(ensure_synthetic_dataset(root=root, seed=seed)))


@main.command("plan")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Bit plan JSON to write (edit it, then train --bit-plan).")
@click.option("--threshold", type=float, default=None, help="HQ k-means threshold T (paper: 0.1).")
@click.option("--avg-bits", type=float, default=None, help="Budget mode: average weight bits.")
@click.option("--size-mb", type=float, default=None, help="Budget mode: model size in MB.")
@click.option("--bops-g", type=float, default=None, help="Budget mode: GBOPs.")
@click.option("--act-bits", type=click.IntRange(2, 8), default=8, show_default=True)
@_handle_errors
def plan_command(checkpoint, out, threshold, avg_bits, size_mb, bops_g, act_bits):
    """Choose per-layer bits for CHECKPOINT's model: HQ (default) or a size/BOPs/bits budget."""
    from ghost_deploy.quant import budget_plan, hq_plan
    from ghost_deploy.checkpoint import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint, with_sr=False)
    budget = {k: v for k, v in {"avg_bits": avg_bits, "size_mb": size_mb, "bops_g": bops_g}.items() if v is not None}
    if budget:
        plan = budget_plan(model, budget, act_bits=act_bits, img_size=meta.img_size)
    else:
        plan = hq_plan(model, threshold=threshold if threshold is not None else 0.1, act_bits=act_bits, img_size=meta.img_size)
    plan.save(out)
    click.echo(plan.summary())
    click.echo(f"bit plan written to {out}")


def _register_stage_commands() -> None:
    from ghost_deploy.cli.bench import bench_command

    main.add_command(bench_command)


_register_stage_commands()

if __name__ == "__main__":
    main()
