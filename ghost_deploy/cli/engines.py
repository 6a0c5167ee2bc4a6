"""`ghost-deploy build-engine`: ONNX -> engine (TensorRT, OpenVINO) parity-checked, or a deployment bundle.

Torch-free: it runs on a Jetson where only the engine stage is installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ghost_deploy.cli.options import FOLDER, NON_NEGATIVE_INT, BoundedInt
from ghost_deploy.engines import build, verify_runtime
from ghost_deploy.errors import EXIT_USER, UserError, handle_cli_errors


@click.command("build-engine")
@click.option("--onnx", "onnx_path", type=click.Path(), default=None,
              help="QDQ ONNX from `export` (default: the newest in runs/demo/export).")
@click.option("--target", default="jetson", show_default=True,
              help="Target profile in engines/targets (jetson = the board we run on, else jetson-agx-orin).")
@click.option("--out", "out_dir", type=FOLDER, default=None, help="Output folder (default: beside the ONNX, engine/).")
@click.option("--parity-set", type=click.Path(), default=None, help="Parity set .npz (default: the one export saved beside the ONNX).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint the ONNX came from (hashed into the receipt).")
@click.option("--dla-core", type=NON_NEGATIVE_INT, multiple=True,
              help="Also build for this DLA core (parity-checked separately).")
@click.option("--timing-cache", type=click.Path(), default=None, help="TensorRT timing cache file (read and updated; created when missing, in an existing folder).")
@click.option("--opt-level", type=BoundedInt(0, 5), default=3, show_default=True, help="Builder optimisation level.")
@click.option("--strongly-typed", is_flag=True, help="TensorRT 10.x: build strongly typed (11.x always is).")
@click.option("--require-engine", is_flag=True, help="Exit 1 when no engine can be built here (instead of writing a bundle).")
@click.option("--verify", "verify_engine", type=click.Path(), default=None,
              help="Check this machine's TensorRT/GPU/JetPack against ENGINE's receipt, then exit.")
@handle_cli_errors
def build_engine(onnx_path, target, out_dir, parity_set, checkpoint, dla_core, timing_cache, opt_level, strongly_typed,
                 require_engine, verify_engine):
    """Compile the QDQ ONNX into a TensorRT engine for TARGET, parity-checked on every build.

    Where TensorRT or the target GPU is absent (any x86 dev box or CI), writes a deployment bundle
    instead: the ONNX, the profile, the parity set, a partial receipt, a one-command build script
    for the device and the equivalent trtexec lines. It says plainly that no engine was built.
    """

    if verify_engine:
        given = Path(verify_engine)
        if given.suffix == ".onnx":
            raise UserError("--verify", f"{given} is an ONNX, not an engine: pass the engine (or its .receipt.json) "
                                        "that build-engine wrote")
        if not given.exists():
            raise UserError("--verify", f"{given}: no such engine or receipt")
        receipt = given if given.suffix == ".json" else given.with_suffix(".receipt.json")
        if not receipt.exists():
            raise UserError(receipt, f"no receipt beside the engine {given.name} (build-engine writes one beside "
                                     "each engine it builds)")
        problems = verify_runtime(receipt)
        for problem in problems:
            click.echo(f"mismatch: {problem}")
        click.echo("runtime matches the receipt" if not problems else f"{len(problems)} mismatch(es): rebuild the engine here")
        sys.exit(EXIT_USER if problems else 0)
    if timing_cache:
        _check_timing_cache(Path(timing_cache))
    onnx = Path(onnx_path) if onnx_path else _newest(Path("runs/demo/export"), "*.onnx")
    result = build(onnx, target, Path(out_dir) if out_dir else onnx.parent.parent / "engine", require_engine=require_engine,
                   dla_core=list(dla_core) or None, timing_cache=timing_cache, parity_set=parity_set, checkpoint=checkpoint,
                   opt_level=opt_level, strongly_typed=strongly_typed, require_export=True)
    if result["status"] == "engine":
        for engine in result["engines"]:
            click.echo(f"engine: {engine['engine']} (receipt {engine['receipt']})")
    sys.exit(result["exit_code"])  # build() has said plainly that no engine was built, and where the bundle is


def _check_timing_cache(path: Path) -> None:
    """A timing cache is read when it exists and written after the build; a missing one is created, but only in a
    folder that exists, so a mistyped folder is not silently a fresh cache (and a slow first build) elsewhere."""
    if path.is_dir():
        raise UserError("--timing-cache", f"{path} is a folder; name the cache file (e.g. {path / 'timing.cache'})")
    if not path.exists() and not path.parent.is_dir():
        raise UserError("--timing-cache", f"{path}: no such file, and its folder {path.parent} does not exist "
                                          "(a missing cache file is created, in an existing folder)")


def _newest(folder: Path, pattern: str) -> Path:
    found = sorted((p for p in folder.glob(pattern) if ".FAILED." not in p.name), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(folder, f"no {pattern} here; pass the file explicitly")
    return found[-1]
