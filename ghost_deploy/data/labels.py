"""YOLO label files: one object per line, `cls cx cy w h`, coordinates normalised to [0, 1]."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_text

# Converters print 6 decimals and round-trips through float32 add a little more; anything beyond this
# slack is a real out-of-range coordinate, not rounding.
COORD_TOLERANCE = 1e-6
COLUMNS = ("cx", "cy", "w", "h")


def parse_label_file(path: str | os.PathLike, nc: int) -> np.ndarray:
    """Read a label file into an (n, 5) float32 array [cls, cx, cy, w, h]; an empty file means no objects."""
    path = Path(path)
    text = read_user_text(path, "label file")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(_parse_row(path, number, line, nc))
    if not rows:
        return np.zeros((0, 5), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


def _parse_row(path: Path, number: int, line: str, nc: int) -> list[float]:
    fields = line.split()
    if len(fields) != 5:
        raise UserError(path, f"line {number}: expected 5 columns (cls cx cy w h), got {len(fields)}")
    values = []
    for field in fields:
        try:
            values.append(float(field))
        except ValueError:
            raise UserError(path, f"line {number}: {field!r} is not a number") from None
    for name, value in zip(("class",) + COLUMNS, values):
        if not math.isfinite(value):
            raise UserError(path, f"line {number}: {name} is {value} (not finite)")
    cls = values[0]
    if cls != int(cls):
        raise UserError(path, f"line {number}: class {fields[0]} is not an integer")
    if cls < 0:
        raise UserError(path, f"line {number}: class {int(cls)} < 0")
    if cls >= nc:
        raise UserError(path, f"line {number}: class {int(cls)} >= nc {nc}")
    coords = []
    for name, value in zip(COLUMNS, values[1:]):
        if value < -COORD_TOLERANCE or value > 1 + COORD_TOLERANCE:
            raise UserError(path, f"line {number}: {name} {value:g} outside [0, 1]")
        if name in ("w", "h") and np.float32(value) <= 0:  # labels are float32: 1e-243 would become a 0-size box
            raise UserError(path, f"line {number}: {name} {value:g} <= 0")
        coords.append(min(max(value, 0.0), 1.0))
    return [float(int(cls))] + coords


def label_path_for(image_prefix: str | os.PathLike) -> Path:
    """`<dir>/images/<id>` -> `<dir>/labels/<id>.txt`: the LAST `images` folder becomes `labels`.

    Only that path component changes: the file name keeps everything (an id containing `co` or
    `images` stays intact, unlike a blind string replace).
    """
    prefix = Path(image_prefix)
    parts = list(prefix.parent.parts)
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts) / f"{prefix.name}.txt"
    raise UserError(prefix.parent, "images must sit in a folder named 'images' (labels are read from the sibling 'labels' folder)")


def format_label_rows(rows: np.ndarray) -> str:
    """(n, 5) [cls, cx, cy, w, h] -> label file text, 6 decimals (as VEDAI's and YOLOv5's files)."""
    lines = [f"{int(row[0])} {row[1]:.6f} {row[2]:.6f} {row[3]:.6f} {row[4]:.6f}" for row in np.asarray(rows)]
    return "".join(line + "\n" for line in lines)
