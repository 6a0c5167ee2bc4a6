"""`ghost-deploy data`: convert VEDAI annotations, generate the embedded demo set."""
from __future__ import annotations

import click

from ghost_deploy.data import convert_vedai, ensure_synthetic_dataset
from ghost_deploy.errors import handle_cli_errors


@click.group("data")
def data_group() -> None:
    """Datasets: convert VEDAI annotations, generate the embedded demo set."""


@data_group.command("convert-vedai")
@click.argument("annotation_file", type=click.Path())
@click.argument("labels_dir", type=click.Path(file_okay=False))
@click.option("--image-size", type=int, default=1024, show_default=True, help="Pixel size the annotation coordinates refer to.")
@handle_cli_errors
def convert_vedai_command(annotation_file, labels_dir, image_size):
    """Turn VEDAI's annotation file (e.g. annotation1024.txt) into YOLO labels in LABELS_DIR.

    Classes in GHOST's order: car, pickup, camping, truck, other, tractor, boat, van. Motorcycles,
    buses and planes are dropped and counted (not merged into van). See docs/data.md for the map.
    """

    stats = convert_vedai(annotation_file, labels_dir, image_size=image_size)
    click.echo(" ".join(f"{k}={v}" for k, v in stats.items()))


@data_group.command("synth")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Where to write (default: the cache folder).")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_cli_errors
def synth_command(root, seed):
    """Generate (or find) the embedded RGB+IR demo set and print its dataset YAML."""
    click.echo(str(ensure_synthetic_dataset(root=root, seed=seed)))
