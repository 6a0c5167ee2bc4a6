"""VEDAI's original annotation file -> YOLO label files in GHOST's 8-class order.

Annotation lines: `id xc yc angle x1 x2 x3 x4 y1 y2 y3 y4 class contained occluded`, in pixels of the
frame the file was made for (1024 for annotation1024.txt, 512 for the Annotations512 files). A label row
is the vehicle's oriented box turned axis-aligned: centre = the annotated centre (xc, yc), width and
height = the extent of the four corners (this is how the published VEDAI YOLO labels were made; the hull's
own centre can differ by up to 3 px because the corners are rounded to whole pixels), clipped to the image.
Motorcycles, buses and planes have no GHOST class: they are dropped and counted, never merged into van
(the reference code merged motorcycles into van, bug B15).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ghost_deploy.data.labels import format_label_rows
from ghost_deploy.errors import UserError
from ghost_deploy.io import make_folder, read_user_text, write_text_atomic

GHOST_NAMES = ("car", "pickup", "camping", "truck", "other", "tractor", "boat", "van")
# VEDAI raw class -> GHOST class index.
RAW_TO_GHOST = {1: 0, 11: 1, 5: 2, 2: 3, 10: 4, 4: 5, 23: 6, 9: 7}
DROPPED = {7: "motorcycle", 8: "bus", 31: "plane"}
FIELDS = 15


def convert_vedai(
    annotation_file: str | os.PathLike,
    out_labels_dir: str | os.PathLike,
    image_size: int = 1024,
    ids=None,
) -> dict:
    """Write `<out_labels_dir>/<id>.txt` for every id (all ids of the file, or `ids`); returns stats.

    Ids are zero-padded to 8 digits. An id with no kept object gets an empty label file.
    """
    annotation_file = Path(annotation_file)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, float)) or image_size <= 0:
        raise UserError("--image-size", f"must be a positive number, got {image_size!r}")
    named = re.fullmatch(r"annotation(\d+)\.txt", annotation_file.name)
    if named and int(named[1]) != image_size:  # VEDAI ships annotation512.txt and annotation1024.txt
        raise UserError("--image-size", f"{image_size:g}, but {annotation_file.name} holds coordinates of "
                                        f"{named[1]} px images: pass --image-size {named[1]}")
    objects = read_annotations(annotation_file)
    if not objects and ids is None:
        raise UserError(annotation_file, "no annotation line: nothing to convert (images without objects get "
                                         "empty label files through --ids or --images)")
    wanted = sorted(objects) if ids is None else sorted({_pad_id(annotation_file, value) for value in ids})
    out_dir = Path(out_labels_dir)
    make_folder(out_dir)
    stats = {
        "images": 0, "objects": 0, "kept": 0, "outside": 0,
        "dropped": {name: 0 for name in DROPPED.values()},
        "per_class": {name: 0 for name in GHOST_NAMES},
        "ids_without_annotations": 0,
    }
    for image_id in wanted:
        rows = []
        entries = objects.get(image_id, [])
        if not entries:
            stats["ids_without_annotations"] += 1
        for raw_class, centre, corners_x, corners_y in entries:
            stats["objects"] += 1
            if raw_class in DROPPED:
                stats["dropped"][DROPPED[raw_class]] += 1
                continue
            row = _yolo_row(RAW_TO_GHOST[raw_class], centre, corners_x, corners_y, image_size)
            if row is None:
                stats["outside"] += 1
                continue
            rows.append(row)
            stats["kept"] += 1
            stats["per_class"][GHOST_NAMES[row[0]]] += 1
        write_text_atomic(out_dir / f"{image_id}.txt", format_label_rows(np.array(rows).reshape(-1, 5)))
        stats["images"] += 1
    return stats


def read_annotations(annotation_file: Path) -> dict[str, list]:
    """id -> [(raw class, (xc, yc), corners_x (4,), corners_y (4,)), ...]; UserError on a malformed line."""
    text = read_user_text(annotation_file, "annotation file")
    objects: dict[str, list] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != FIELDS:
            raise UserError(annotation_file, f"line {number}: expected {FIELDS} fields "
                            f"(id xc yc angle x1 x2 x3 x4 y1 y2 y3 y4 class contained occluded), got {len(fields)}")
        image_id = _pad_id(annotation_file, fields[0], number)
        try:
            values = np.array([float(value) for value in fields[1:12]])
            raw_class = int(fields[12])
        except ValueError:
            raise UserError(annotation_file, f"line {number}: non-numeric field") from None
        if not np.isfinite(values).all():
            raise UserError(annotation_file, f"line {number}: non-finite coordinate")
        if raw_class not in RAW_TO_GHOST and raw_class not in DROPPED:
            raise UserError(annotation_file, f"line {number}: unknown VEDAI class {raw_class}")
        objects.setdefault(image_id, []).append((raw_class, values[0:2], values[3:7], values[7:11]))
    return objects


def _yolo_row(cls: int, centre, corners_x, corners_y, image_size: float):
    half_w = (corners_x.max() - corners_x.min()) / 2
    half_h = (corners_y.max() - corners_y.min()) / 2
    x1, x2 = np.clip([centre[0] - half_w, centre[0] + half_w], 0, image_size)
    y1, y2 = np.clip([centre[1] - half_h, centre[1] + half_h], 0, image_size)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return [cls, (x1 + x2) / 2 / image_size, (y1 + y2) / 2 / image_size, (x2 - x1) / image_size, (y2 - y1) / image_size]


def _pad_id(annotation_file: Path, value, number: int | None = None) -> str:
    text = str(value).strip()
    if not text.isdigit() or len(text) > 8:
        where = f"line {number}: " if number else ""
        raise UserError(annotation_file, f"{where}image id {text!r} is not a number of at most 8 digits")
    return text.zfill(8)


def known_image_ids(id_lists=(), images_dir=None, annotation_file=None) -> list[str]:
    """Every image id the user knows of: the annotated ones, the ids of fold lists, the `<id>_co.*` files of a folder."""
    ids = set(read_annotations(Path(annotation_file))) if annotation_file else set()
    for listing in id_lists:
        text = read_user_text(listing, "id list")
        ids.update(_pad_id(Path(listing), line.strip()) for line in text.splitlines() if line.strip())
    if images_dir is not None:
        folder = Path(images_dir)
        if not folder.is_dir():
            raise UserError(folder, "image folder not found")
        ids.update(_pad_id(folder, path.name.split("_co")[0]) for path in folder.iterdir() if "_co." in path.name)
    return sorted(ids)
