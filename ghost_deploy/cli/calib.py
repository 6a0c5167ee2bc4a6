"""`ghost-deploy calib`: make a calibration / parity set manifest, measure its range coverage."""
from __future__ import annotations

import click

from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.cli.options import (
    COUNT,
    FILE,
    FOLDER,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    refuse_overwriting_inputs,
)
from ghost_deploy.data.calib import DEFAULT_BRIGHTNESS_BINS, EMBEDDED, calib_batches, load_calib_set, make_calib_set
from ghost_deploy.data.dataset import Dataset
from ghost_deploy.errors import handle_cli_errors
from ghost_deploy.io import write_json_atomic
from ghost_deploy.quant.coverage import coverage_ratios, format_coverage, tensor_absmax
from ghost_deploy.train.loop import make_loader


# ------------------------------------------------------------------------------------------- CLI
@click.group("calib")
def calib_group() -> None:
    """Calibration and parity sets: RGB+IR pairs chosen from a split, hashed in a manifest."""


@calib_group.command("make")
@click.option("--data", default=EMBEDDED, show_default=True, help="Dataset YAML, or 'embedded' for the demo set.")
@click.option("--n", "count", type=COUNT, default=256, show_default=True, help="Pairs to choose.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--name", default=None,
              help="Set name (default <dataset>-<split>-<n>); the file is <out-dir>/<name>.yaml.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--out-dir", type=FOLDER, default="calib", show_default=True)
@click.option("--brightness-bins", type=COUNT, default=DEFAULT_BRIGHTNESS_BINS, show_default=True,
              help="Brightness bins per modality (at the split's quantiles).")
@click.option("--force", is_flag=True, help="Replace an existing manifest of that name with different content.")
@handle_cli_errors
def make_command(data, count, split, name, seed, out_dir, brightness_bins, force):
    """Choose N pairs of a split, stratified by class and brightness of each sensor, and write a manifest."""
    path = make_calib_set(data, count, split=split, name=name, seed=seed, out_dir=out_dir,
                          brightness_bins=brightness_bins, force=force)
    calib_set = load_calib_set(path)
    click.echo(f"{path}: {len(calib_set)} pairs of {calib_set.selection.get('split_size')} in {split} "
               f"(sha256 {calib_set.sha256[:12]})")
    for class_name, row in calib_set.classes.items():
        click.echo(f"  {class_name:<16} {row['images']:>5} images {row['instances']:>6} objects "
                   f"(split: {row['split_images']} images)")


@calib_group.command("coverage")
@click.option("--weights", required=True, type=click.Path(), metavar="CKPT", help="Checkpoint (FP32 or quantized).")
@click.option("--calib", "manifest", required=True, type=click.Path(), metavar="MANIFEST", help="calib/<name>.yaml")
@click.option("--split", default=None, help="Split to compare with (default: the one the set was drawn from).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--low", type=NON_NEGATIVE_FLOAT, default=0.9, show_default=True, help="Flag tensors covered below this.")
@click.option("--json", "json_out", type=FILE, default=None, help="Also write the numbers here.")
@handle_cli_errors
def coverage_command(weights, manifest, split, batch_size, low, json_out):
    """Per activation tensor: max|x| on the set over max|x| on the whole split (1.0 = the set reaches it)."""
    if json_out:
        refuse_overwriting_inputs("--json", json_out, {"checkpoint given as --weights": weights,
                                                       "manifest given as --calib": manifest})
    model, meta = model_from_checkpoint(weights, with_sr=False)
    calib_set = load_calib_set(manifest)
    img_size = int(meta.img_size)
    split_name = split or calib_set.split
    dataset = Dataset(calib_set.spec(), split_name, img_size, augment=False)
    on_set = tensor_absmax(model, calib_batches(calib_set, img_size, batch_size, model.input_names))
    on_split = tensor_absmax(model, make_loader(dataset, batch_size, False, 0))
    coverage = coverage_ratios(on_set, on_split)
    click.echo(f"{calib_set.name}: {len(calib_set)} pairs vs {len(dataset)} images of {split_name}")
    click.echo(format_coverage(coverage, on_set, on_split, low))
    if json_out:
        write_json_atomic(json_out, {"calib_set": calib_set.record(), "checkpoint": str(weights), "split": split_name,
                                     "split_images": len(dataset), "coverage": coverage, "set_max": on_set,
                                     "split_max": on_split})
