"""`ghost-deploy data`: convert VEDAI annotations, generate the embedded demo set."""
from __future__ import annotations

import click

from ghost_deploy.cli.options import COUNT, FILE, FOLDER, NON_NEGATIVE_INT
from ghost_deploy.data import convert_vedai, ensure_synthetic_dataset
from ghost_deploy.data.vedai import known_image_ids
from ghost_deploy.errors import handle_cli_errors


@click.group("data")
def data_group() -> None:
    """Datasets: convert VEDAI annotations, generate the embedded demo set."""


@data_group.command("convert-vedai")
@click.argument("annotation_file", type=click.Path())
@click.argument("labels_dir", type=FOLDER)
@click.option("--image-size", type=COUNT, default=1024, show_default=True, help="Pixel size the annotation coordinates refer to.")
@click.option("--ids", "id_lists", type=FILE, multiple=True,
              help="A fold list (e.g. fold01.txt) whose ids all get a label file; repeatable.")
@click.option("--images", "images_dir", type=FOLDER, default=None,
              help="The image folder: every <id>_co.png in it gets a label file.")
@handle_cli_errors
def convert_vedai_command(annotation_file, labels_dir, image_size, id_lists, images_dir):
    """Turn VEDAI's annotation file (e.g. annotation1024.txt) into YOLO labels in LABELS_DIR.

    Classes in GHOST's order: car, pickup, camping, truck, other, tractor, boat, van. Motorcycles,
    buses and planes are dropped and counted (not merged into van). See docs/data.md for the map.
    Images without objects have no line in the annotation file: name the fold lists (--ids) or the image folder
    (--images) so they get an empty label file and stay in training and evaluation.
    """
    ids = known_image_ids(id_lists, images_dir, annotation_file) if id_lists or images_dir else None
    stats = convert_vedai(annotation_file, labels_dir, image_size=image_size, ids=ids)
    click.echo(" ".join(f"{k}={v}" for k, v in stats.items()))


@data_group.command("synth")
@click.option("--root", type=FOLDER, default=None, help="Where to write (default: the cache folder).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@handle_cli_errors
def synth_command(root, seed):
    """Generate (or find) the embedded RGB+IR demo set and print its dataset YAML."""
    click.echo(str(ensure_synthetic_dataset(root=root, seed=seed)))
