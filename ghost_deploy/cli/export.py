"""`ghost-deploy export`: a thin click wrapper over `export_onnx` (and PTQ with --weights/--calib)."""
from __future__ import annotations

from pathlib import Path

import click

from ghost_deploy.checkpoint import read_meta
from ghost_deploy.cli.options import COUNT, FILE, NON_NEGATIVE_INT, BoundedInt, refuse_overwriting_inputs
from ghost_deploy.errors import UserError, handle_cli_errors
from ghost_deploy.export.api import check_options, export_onnx
from ghost_deploy.export.onnx_qdq import INT4_OPSET
from ghost_deploy.export.sample import make_sample
from ghost_deploy.quant.ptq import ptq_checkpoint


def default_out_path(checkpoint: Path, fp32: bool, int4_weights: bool, target: str) -> Path:
    stem = checkpoint.name[: -len(checkpoint.suffix)] if checkpoint.suffix else checkpoint.name
    tags = [tag for tag, on in (("fp32", fp32), ("int4", int4_weights), ("cpu", target == "cpu")) if on]
    return checkpoint.with_name(".".join([stem, *tags, "onnx"]))


@click.command("export")
@click.option("--onnx", "checkpoint", type=click.Path(), metavar="CKPT", default=None,
              help="Checkpoint (.safetensors) to export as ONNX (GHOST, PTQ or, with --fp32, FP32).")
@click.option("--out", type=FILE, default=None,
              help="ONNX path (default: beside the checkpoint, <stem>[.fp32|.int4|.cpu].onnx).")
@click.option("--fp32", is_flag=True, help="Export the float model (teacher, or student without quantizers).")
@click.option("--int4-weights", is_flag=True,
              help="Store <=4-bit layers as INT4 initializers (opset 21): a smaller file; engines use the INT8 export.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim (it never changes Q/DQ; checked either way).")
@click.option("--opset", type=BoundedInt(), default=17, show_default=True, help="ONNX opset (13..21; INT4 needs 21).")
@click.option("--target", type=click.Choice(["trt", "cpu"]), default="trt", show_default=True,
              help="trt: TensorRT explicit quantization; cpu: the same values in ONNX Runtime's fast integer form.")
@click.option("--decode", is_flag=True, help="Also output decoded boxes (B, N, 5+nc) as 'boxes'.")
@click.option("--no-parity", is_flag=True, help="Skip the parity gate (no parity set is written).")
@click.option("--parity-images", type=click.Path(), default=None,
              help="Folder of images, or a calib manifest (calib/<name>.yaml), for the parity set (default: the dataset's val split).")
@click.option("--weights", type=click.Path(), default=None,
              help="PTQ: an FP32 checkpoint to quantize after training (instead of --onnx); needs --calib.")
@click.option("--calib", "calib_manifest", type=click.Path(), default=None,
              help="PTQ: calibration set manifest from `ghost-deploy calib make`.")
@click.option("--calibrator", type=click.Choice(["max", "percentile", "mse", "entropy"]), default="mse", show_default=True,
              help="PTQ: how activation ranges are chosen.")
@click.option("--weight-method", type=click.Choice(["mse", "max"]), default="mse", show_default=True,
              help="PTQ: per-channel weight scale search.")
@click.option("--bit-plan", type=click.Path(), default=None,
              help="PTQ: bit plan JSON or a GHOST checkpoint whose plan to use (default: INT8 everywhere).")
@click.option("--data", type=click.Path(), default=None, help="Dataset YAML for the parity images.")
@click.option("--parity-arithmetic", type=click.Choice(["float32", "exact"]), default=None,
              help="Which comparison decides the gate (default: the recipe's parity.arithmetic, exact): both sides "
                   "accumulating integer codes (bit-exact when correct), or the graph as written in float32. "
                   "Both are always run and reported.")
@click.option("--parity-count", type=COUNT, default=None,
              help="Images in the parity set (default: the recipe's parity.images, 8).")
@click.option("--per-layer", is_flag=True,
              help="Compare every layer and measure the model's float32 noise floor (automatic when the gate fails).")
@click.option("--no-progress", is_flag=True, help="Print nothing but errors.")
@handle_cli_errors
def export_command(checkpoint, out, fp32, int4_weights, no_simplify, opset, target, decode, no_parity, parity_images,
                   weights, calib_manifest, calibrator, weight_method, bit_plan, data, parity_arithmetic, parity_count,
                   per_layer, no_progress):
    """Export a checkpoint to a QDQ ONNX (per-layer bits kept), lint it for TensorRT, gate it on parity.

    Exit 0: written and within budget. Exit 1: a check failed; the report is saved and the model is kept only
    as <stem>.FAILED.onnx. Exit 2: bad input.
    """

    if out is not None:
        refuse_overwriting_inputs("--out", out, {"checkpoint being exported": checkpoint, "FP32 checkpoint": weights})
    _check_before_work(click.get_current_context(), weights, out, opset, target, fp32, int4_weights)
    if weights:  # PTQ: quantize the FP32 model into a checkpoint of its own, then the very same export path
        if checkpoint or not calib_manifest:
            raise UserError("--weights", "PTQ takes --weights FP32_CKPT with --calib MANIFEST (and no --onnx)")
        weights = Path(weights)
        stem = weights.name[: -len(weights.suffix)] if weights.suffix else weights.name
        checkpoint = ptq_checkpoint(weights, weights.with_name(f"{stem}.ptq-{calibrator}.safetensors"), calib_manifest,
                                    plan=bit_plan, weight_method=weight_method, act_calibrator=calibrator,
                                    log=None if no_progress else click.echo)
    elif not checkpoint:
        raise UserError("--onnx", "name the checkpoint to export (--onnx CKPT), or --weights FP32_CKPT --calib MANIFEST for PTQ")
    checkpoint = Path(checkpoint)
    out_path = Path(out) if out else default_out_path(checkpoint, fp32, int4_weights, target)
    export_onnx(checkpoint, out_path, fp32=fp32, int4_weights=int4_weights, simplify=not no_simplify, opset=opset,
                target=target, decode=decode, parity=not no_parity, parity_images=parity_images,
                parity_arithmetic=parity_arithmetic, parity_count=parity_count, per_layer=per_layer, data=data,
                progress=not no_progress)


PTQ_OPTIONS = ("calib_manifest", "calibrator", "weight_method", "bit_plan")


def _check_before_work(ctx: click.Context, weights, out, opset, target, fp32, int4_weights) -> None:
    """What would be refused only after PTQ or the graph build, refused first: PTQ options without --weights (they
    would be ignored), an --out that is no .onnx (it would land on a parity set or a report), the opset and target."""
    if not weights:
        for name in PTQ_OPTIONS:
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                option = next(p for p in ctx.command.params if p.name == name).opts[0]
                raise UserError(option, "is read only for PTQ (--weights FP32_CKPT --calib MANIFEST); with --onnx it "
                                        "would be ignored")
    if int4_weights and opset < INT4_OPSET and \
            ctx.get_parameter_source("opset") is not click.core.ParameterSource.DEFAULT:
        raise UserError("--opset", f"{opset}: INT4 weights need opset {INT4_OPSET} (leave --opset out with "
                                   "--int4-weights, it is then raised for you)")
    if out is not None and Path(out).suffix != ".onnx":
        raise UserError("--out", f"{out} must end in .onnx (its parity set and report are written beside it)")
    check_options(target, opset, fp32, int4_weights)


@click.command("sample")
@click.argument("model")
@click.option("--img-size", type=BoundedInt(32, 2048), default=512, show_default=True, help="Input side in pixels.")
@click.option("--bits", default="hq", show_default=True,
              help="hq (HQ's rule on the sample's weights), mixed (random 3..8 per layer), fp32 (a teacher), or N bits.")
@click.option("--nc", type=BoundedInt(1, 10000), default=8, show_default=True, help="Classes.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--snap", is_flag=True, help="Snap weights and scales to power-of-two grids (bit-exact on any backend).")
@click.option("--residual-outputs", is_flag=True,
              help="Quantize each residual branch's output too, so ONNX Runtime runs the branch and its add in integers "
                   "(target cpu); see docs/export.md.")
@click.option("--out", type=FILE, required=True, help="Checkpoint to write (.safetensors).")
@handle_cli_errors
def sample_command(model, img_size, bits, nc, seed, snap, residual_outputs, out):
    """A random-weight, calibrated checkpoint of MODEL (ghost-s-vedai, ghost-s, ghost-n, ghost-p), off the grid like
    a trained one: try export, build-engine and bench on the real architecture before training."""
    path = make_sample(model, out, img_size=img_size, bits=bits, nc=nc, seed=seed, snap=snap,
                       residual_outputs=residual_outputs)
    header = read_meta(path)
    plan = header.bit_plan
    click.echo(f"{path}: {model} at {img_size} px, {nc} classes, "
               + (f"{plan.totals['avg_weight_bits']:.2f} average weight bits" if plan else "FP32"))
