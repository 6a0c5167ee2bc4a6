"""The embedded default dataset: procedural RGB + thermal-IR aerial tiles of vehicles, in the VEDAI layout.

Deterministic from the seed (one generator per image, seeded by (seed, image number)), written atomically
into a cache folder, reused when complete. Each tile is drawn at 2x the requested size (the `hr/` pairs,
super-resolution targets) and the `images/` pairs are its 2x2 mean, as VEDAI's 512 and 1024 tiles.

Classes (nc 5): car, car_running, truck, van, boat. `car` and `car_running` are drawn by the same RGB
code from the same distributions (size, colour, placement): in RGB they are indistinguishable; only the
IR band tells them apart (a running car has a hot engine block under its hood).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ghost_deploy.data.augment import downsample2x
from ghost_deploy.data.labels import format_label_rows
from ghost_deploy.errors import UserError
from ghost_deploy.io import destination_errors, make_parent_folder, sha256_file

SYNTH_VERSION = 2  # v2: a running car is warm all over, not only over its engine block
CLASS_NAMES = ("car", "car_running", "truck", "van", "boat")
IR_ONLY_CLASSES = ("car_running",)          # tells apart from its RGB twin only in IR
RGB_TWINS = {"car_running": "car"}          # drawn in RGB exactly as this class
DEFAULT_COUNTS = {"n_train": 400, "n_val": 100, "n_test": 100, "img_size": 128}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Vehicle sizes in pixels of a 128-px tile: (length range, width range).
SIZES = {
    "car": ((8.0, 10.5), (3.8, 4.8)),
    "van": ((11.5, 13.5), (5.4, 6.2)),
    "truck": ((15.0, 20.0), (5.5, 6.5)),
    "boat": ((9.0, 16.0), (3.5, 5.5)),
}
LAND_CLASS_WEIGHTS = {"car": 0.33, "car_running": 0.31, "truck": 0.18, "van": 0.18}
CAR_COLOURS = np.array([
    (226, 226, 222), (172, 174, 178), (40, 40, 44), (86, 88, 92), (176, 34, 32),
    (38, 64, 146), (44, 88, 56), (196, 180, 142), (214, 182, 44),
], dtype=np.float32)
CAR_COLOUR_WEIGHTS = np.array([0.2, 0.16, 0.08, 0.1, 0.13, 0.13, 0.07, 0.07, 0.06])
VAN_COLOURS = np.array([(234, 234, 230), (236, 232, 218), (190, 192, 194), (44, 74, 136)], dtype=np.float32)
CARGO_COLOURS = np.array([(236, 236, 232), (200, 200, 196), (206, 110, 40), (52, 90, 160), (150, 40, 36)], dtype=np.float32)
GLASS = np.array((28, 34, 46), dtype=np.float32)


def cache_dir() -> Path:
    """Cache base: $GHOST_DEPLOY_CACHE, else $XDG_CACHE_HOME/ghost-deploy, else ~/.cache/ghost-deploy."""
    if os.environ.get("GHOST_DEPLOY_CACHE"):
        return Path(os.environ["GHOST_DEPLOY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ghost-deploy"


def ensure_synthetic_dataset(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    n_train: int = DEFAULT_COUNTS["n_train"],
    n_val: int = DEFAULT_COUNTS["n_val"],
    n_test: int = DEFAULT_COUNTS["n_test"],
    img_size: int = DEFAULT_COUNTS["img_size"],
    hr: bool = False,
) -> Path:
    """Path to the synthetic dataset's data.yaml; generates it (atomically) unless a complete copy exists.

    `hr=True` also writes `hr/`: every tile at 2x resolution (the super-resolution targets); the
    `images/` tiles are then the 2x2 mean of those, and generation is about three times slower.
    """
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "img_size": img_size}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (16 if key == "img_size" else 0):
            raise UserError(None, f"synthetic dataset: {key} must be a {'integer >= 16' if key == 'img_size' else 'non-negative integer'}, got {value!r}")
    if img_size % 16:
        raise UserError(None, f"synthetic dataset: --img-size must be a multiple of 16, got {img_size}")
    if n_train < 1 or n_val < 1:
        raise UserError(None, "synthetic dataset: n_train and n_val must be at least 1")
    if root is None:
        name = f"synth-v{SYNTH_VERSION}-seed{seed}"
        if counts != DEFAULT_COUNTS:
            name += f"-{n_train}-{n_val}-{n_test}-{img_size}px"
        if hr:
            name += "-hr"
        root = cache_dir() / name
    root = Path(root)
    params = {"version": SYNTH_VERSION, "seed": seed, **counts, "hr": bool(hr)}
    if _is_complete(root, params):
        return root / "data.yaml"
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not _made_here(root):
        # never replace a folder this module did not make, or one whose files were changed or added to since
        raise UserError(root, "exists and is not a synthetic dataset folder made by ghost-deploy (its stamp is missing "
                              "or its files changed); choose another --root")
    make_parent_folder(root)
    with destination_errors(root, every_oserror=True):  # only the build folder is written: a full or read-only disk
        build = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        try:
            _generate(build, params)
            _publish(build, root, params)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
    return root / "data.yaml"


def _is_complete(root: Path, params: dict) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and (root / "data.yaml").is_file()


MADE_BY = "ghost_deploy.data.synth"


def _file_hashes(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): sha256_file(path) for path in sorted(root.rglob("*"))
            if path.is_file() and path.name != "manifest.json"}


def _made_here(root: Path) -> bool:
    """True when `root` holds exactly the files our manifest stamped, unchanged (so replacing it loses nothing)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("made_by") == MADE_BY \
        and manifest.get("files") == _file_hashes(root)


def _publish(build: Path, root: Path, params: dict) -> None:
    """Rename the finished build onto `root`; a stale or different dataset there is moved away first."""
    if root.exists():
        if _is_complete(root, params):  # another process finished first
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
        os.replace(root, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(build, root)
    except OSError:
        if not _is_complete(root, params):
            raise


def _generate(build: Path, params: dict) -> None:
    started = time.perf_counter()
    folders = ("images", "labels", "hr/images", "hr/labels") if params["hr"] else ("images", "labels")
    for folder in folders:
        (build / folder).mkdir(parents=True)
    ids = {}
    number = 0
    for split in ("train", "val", "test"):
        ids[split] = []
        for position in range(params[f"n_{split}"]):
            image_id = f"{number:08d}"
            rng = np.random.default_rng([params["seed"], SPLIT_CODES[split], position])
            if params["hr"]:
                rgb_hr, ir_hr, labels = render_tile(rng, 2 * params["img_size"])
                _save_png(build / "hr" / "images" / f"{image_id}_co.png", rgb_hr)
                _save_png(build / "hr" / "images" / f"{image_id}_ir.png", ir_hr)
                rgb, ir = downsample2x(rgb_hr), downsample2x(ir_hr)
            else:
                rgb, ir, labels = render_tile(rng, params["img_size"])
            _save_png(build / "images" / f"{image_id}_co.png", rgb)
            _save_png(build / "images" / f"{image_id}_ir.png", ir)
            text = format_label_rows(labels)
            (build / "labels" / f"{image_id}.txt").write_text(text, encoding="utf-8")
            if params["hr"]:
                (build / "hr" / "labels" / f"{image_id}.txt").write_text(text, encoding="utf-8")
            ids[split].append(image_id)
            number += 1
        (build / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids[split]), encoding="utf-8")
    (build / "data.yaml").write_text(_data_yaml(params, ids), encoding="utf-8")
    manifest = {"made_by": MADE_BY, "params": params, "counts": {split: len(values) for split, values in ids.items()},
                "seconds": round(time.perf_counter() - started, 2), "files": _file_hashes(build)}
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _data_yaml(params: dict, ids: dict) -> str:
    lines = [
        "# ghost-deploy synthetic RGB + thermal-IR vehicles (procedural, made by ghost_deploy.data.synth).",
        f"# seed {params['seed']}, {params['img_size']} px tiles"
        + ("; hr/ holds the same tiles at 2x (images/ is their 2x2 mean)." if params["hr"] else "."),
        "# car_running looks exactly like car in RGB: only its hot engine block in IR tells them apart.",
        "path: .",
        "train: train.txt",
        "val: val.txt",
    ]
    if ids["test"]:
        lines.append("test: test.txt")
    if params["hr"]:
        lines.append("hr: hr")
    lines += [
        "modalities: [rgb, ir]",
        f"nc: {len(CLASS_NAMES)}",
        f"names: [{', '.join(CLASS_NAMES)}]",
        f"ir_only_classes: [{', '.join(IR_ONLY_CLASSES)}]",
    ]
    return "\n".join(lines) + "\n"


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


# ---- rendering --------------------------------------------------------------------------------------

class _Canvas:
    """Float RGB (0..255) and IR temperature (0..1) planes of one tile, painted in layers."""

    def __init__(self, size: int):
        self.size = size
        self.unit = size / 128.0  # pixels per pixel-of-a-128-tile
        self.rgb = np.zeros((size, size, 3), dtype=np.float32)
        self.ir = np.zeros((size, size), dtype=np.float32)
        self.water = np.zeros((size, size), dtype=np.float32)


def render_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tile: RGB (size, size, 3) uint8, IR (size, size) uint8, labels (n, 5) [cls, cx, cy, w, h]."""
    canvas = _Canvas(size)
    sun = rng.uniform(0, 2 * math.pi)
    shadow = np.array([math.cos(sun), math.sin(sun)])
    _paint_ground(canvas, rng)
    roads = _paint_roads(canvas, rng)
    lot = _paint_lot(canvas, rng, roads) if rng.random() < 0.3 else None
    obstacles = []  # (x, y, radius) of everything objects must not overlap
    _paint_buildings(canvas, rng, obstacles, shadow, roads, lot)
    _paint_trees(canvas, rng, obstacles, shadow, roads)
    labels = _place_vehicles(canvas, rng, obstacles, shadow, roads, lot)
    return _finish(canvas, rng) + (labels,)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Gaussian noise on a cells x cells grid, bicubic-upsampled to size x size (roughly unit variance)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _paint_ground(canvas: _Canvas, rng: np.random.Generator) -> None:
    size = canvas.size
    layout = _smooth_noise(rng, size, 3) + 0.5 * _smooth_noise(rng, size, 7)
    soil_share = rng.uniform(0.1, 0.6)
    threshold = np.float32(np.quantile(layout[::4, ::4], 1 - soil_share))
    soil = _sigmoid((layout - threshold) * np.float32(6.0))
    texture = _smooth_noise(rng, size, int(24 * canvas.unit))
    grass_colour = np.array((72, 100, 52), np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    soil_colour = np.array((140, 114, 84), np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    canvas.rgb[:] = grass_colour
    _blend(canvas.rgb, soil, soil_colour)
    canvas.rgb += (12 + 2 * soil[..., None]) * texture[..., None]
    warm = _smooth_noise(rng, size, 4)
    canvas.ir[:] = 0.38 + 0.12 * soil + 0.03 * warm + 0.02 * texture
    if rng.random() < 0.45:
        field = _smooth_noise(rng, size, 3) + 0.3 * _smooth_noise(rng, size, 8)
        threshold = np.float32(np.quantile(field[::4, ::4], 1 - rng.uniform(0.18, 0.4)))
        water = _sigmoid((field - threshold) * np.float32(10.0))
        ripple = _smooth_noise(rng, size, int(40 * canvas.unit))
        water_colour = np.array((36, 70, 92), np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        _blend(canvas.rgb, water, water_colour)
        canvas.rgb += (4 * water * ripple)[..., None]
        _blend(canvas.ir, water, 0.17)
        canvas.ir += 0.01 * water * ripple
        canvas.water[:] = water


def _paint_roads(canvas: _Canvas, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """0 to 2 straight asphalt roads with dashed centre lines; returns (point, direction, half width)."""
    size, unit = canvas.size, canvas.unit
    roads = []
    count = rng.choice([0, 1, 1, 2])
    if count == 0:
        return roads
    coords = np.arange(size, dtype=np.float32) + 0.5
    for _ in range(count):
        point = rng.uniform(0.2, 0.8, 2) * size
        angle = rng.uniform(0, math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)], np.float32)
        half_width = rng.uniform(6.5, 9.0) * unit
        along = (coords[None, :] - point[0]) * direction[0] + (coords[:, None] - point[1]) * direction[1]
        across = np.abs((coords[:, None] - point[1]) * direction[0] - (coords[None, :] - point[0]) * direction[1])
        road = np.clip(half_width + 0.5 - across, 0, 1)
        asphalt = np.array((88, 88, 92), np.float32) * np.float32(rng.uniform(0.85, 1.15))
        _blend(canvas.rgb, road, asphalt)
        _blend(canvas.ir, road, 0.52)
        dash = (np.mod(along, 8.0 * unit) < 4.0 * unit) * np.clip(0.5 * unit + 0.5 - across, 0, 1)
        _blend(canvas.rgb, dash, np.array((222, 222, 210), np.float32))
        _blend(canvas.ir, dash, 0.5)
        canvas.water *= 1 - road  # a road over water is a bridge: no boats on it
        roads.append((point, direction, half_width))
    return roads


def _blend(plane: np.ndarray, coverage: np.ndarray, value) -> None:
    """plane <- plane + (value - plane) * coverage, in place (coverage broadcast over colour)."""
    alpha = coverage[..., None] if plane.ndim == 3 else coverage
    plane += (np.asarray(value, np.float32) - plane) * alpha


def _paint_lot(canvas: _Canvas, rng: np.random.Generator, roads) -> dict | None:
    """A concrete parking lot with stall lines beside the roads; vehicles parked in it share its orientation."""
    unit = canvas.unit
    half = rng.uniform(14, 22, 2) * unit
    angle = rng.uniform(0, math.pi)
    for _attempt in range(10):
        centre = rng.uniform(0.25, 0.75, 2) * canvas.size
        if _off_roads(centre, float(np.hypot(*half)), roads):
            break
    else:
        return None
    window = _Window(canvas, centre, angle, float(np.hypot(*half)) + 2)
    area = window.rect(-half[0], half[0], -half[1], half[1])
    concrete = np.array((156, 154, 148), np.float32) * rng.uniform(0.9, 1.1)
    window.paint_rgb(area, concrete)
    window.paint_ir(area, 0.5)
    stall_lines = (np.mod((window.u + half[0]) / unit, 6.0) < 0.5).astype(np.float32) * area
    window.paint_rgb(stall_lines, np.array((214, 214, 206), np.float32))
    canvas.water[window.slices] *= 1 - area
    return {"centre": centre, "angle": angle, "half": half}


def _paint_buildings(canvas, rng, obstacles, shadow, roads, lot) -> None:
    """Up to 2 buildings: larger and squarer than any vehicle, gable roofs, warm in IR."""
    unit = canvas.unit
    for _ in range(rng.choice([0, 0, 1, 2])):
        half = rng.uniform(11, 17, 2) * unit
        radius = float(np.hypot(*half))
        for _attempt in range(10):
            centre = rng.uniform(radius, canvas.size - radius, 2) if canvas.size > 2 * radius else None
            if centre is None:
                return
            if _clear(centre, radius, obstacles) and _off_roads(centre, radius, roads) and canvas.water[int(centre[1]), int(centre[0])] < 0.1:
                break
        else:
            continue
        angle = rng.uniform(0, math.pi)
        offset = shadow * 3.5 * unit
        shade = _Window(canvas, centre + offset, angle, radius + 2)
        shade.darken(shade.rect(-half[0], half[0], -half[1], half[1]), 0.5, 0.05)
        window = _Window(canvas, centre, angle, radius + 2)
        roof = np.array([(150, 72, 60), (122, 122, 128), (182, 176, 166)][rng.integers(3)], np.float32)
        window.paint_rgb(window.rect(-half[0], half[0], -half[1], 0), roof)
        window.paint_rgb(window.rect(-half[0], half[0], 0, half[1]), roof * 0.78)
        window.paint_ir(window.rect(-half[0], half[0], -half[1], half[1]), rng.uniform(0.66, 0.78))
        obstacles.append((centre[0], centre[1], radius))


def _paint_trees(canvas, rng, obstacles, shadow, roads) -> None:
    unit = canvas.unit
    for _ in range(rng.integers(0, 7)):
        radius = rng.uniform(2.5, 5.0) * unit
        centre = rng.uniform(radius, canvas.size - radius, 2)
        if not _clear(centre, radius, obstacles) or not _off_roads(centre, radius, roads):
            continue
        if canvas.water[int(centre[1]), int(centre[0])] > 0.1:
            continue
        shade = _Window(canvas, centre + shadow * 2.0 * unit, 0.0, radius + 2)
        shade.darken(shade.disc(radius), 0.55, 0.03)
        window = _Window(canvas, centre, 0.0, radius + 2)
        crown = window.disc(radius)
        colour = np.array((38, 66, 34), np.float32) * rng.uniform(0.85, 1.15)
        window.paint_rgb(crown, colour + 10 * np.clip(window.u / radius, -1, 1)[..., None])
        window.paint_ir(crown, 0.31)
        obstacles.append((centre[0], centre[1], radius))


def _place_vehicles(canvas, rng, obstacles, shadow, roads, lot) -> np.ndarray:
    """2 to 8 non-overlapping vehicles (boats only on water); returns their labels."""
    water_share = float(canvas.water.mean())
    total = int(rng.integers(2, 9))
    boats = min(total, int(rng.integers(1, 4))) if water_share > 0.05 else 0
    land_names = list(LAND_CLASS_WEIGHTS)
    land_weights = np.array(list(LAND_CLASS_WEIGHTS.values()))
    kinds = ["boat"] * boats + list(rng.choice(land_names, size=total - boats, p=land_weights / land_weights.sum()))
    labels = []
    for kind in kinds:
        looks_like = RGB_TWINS.get(kind, kind)
        geometry = _sample_geometry(rng, canvas, looks_like)
        look = _sample_look(rng, looks_like)
        placed = _find_place(rng, canvas, looks_like, geometry, obstacles, roads, lot)
        if placed is None:
            continue
        centre, angle = placed
        draw_vehicle(canvas, looks_like, centre, angle, geometry, look, running=kind in RGB_TWINS, shadow=shadow)
        obstacles.append((centre[0], centre[1], geometry["radius"]))
        labels.append(_label(canvas, CLASS_NAMES.index(kind), centre, angle, geometry))
    return np.array(labels, dtype=np.float32).reshape(-1, 5)


def _sample_geometry(rng, canvas, looks_like: str) -> dict:
    (l0, l1), (w0, w1) = SIZES[looks_like]
    length = rng.uniform(l0, l1) * canvas.unit
    width = rng.uniform(w0, w1) * canvas.unit
    return {"length": length, "width": width, "radius": math.hypot(length, width) / 2 + 1.0 * canvas.unit}


def _sample_look(rng, looks_like: str) -> dict:
    if looks_like == "car":
        colour = CAR_COLOURS[rng.choice(len(CAR_COLOURS), p=CAR_COLOUR_WEIGHTS)]
    elif looks_like == "van":
        colour = VAN_COLOURS[rng.choice(len(VAN_COLOURS), p=[0.5, 0.2, 0.2, 0.1])]
    elif looks_like == "truck":
        colour = CAR_COLOURS[rng.choice(len(CAR_COLOURS), p=CAR_COLOUR_WEIGHTS)]
    else:
        colour = np.array((232, 232, 226), np.float32)
    return {
        "colour": colour * rng.uniform(0.92, 1.08),
        "cargo": CARGO_COLOURS[rng.integers(len(CARGO_COLOURS))] * rng.uniform(0.92, 1.08),
        "deck": np.array([(150, 110, 70), (60, 92, 150), (200, 200, 196)][rng.integers(3)], np.float32),
        "body_heat": rng.uniform(-0.02, 0.06),
        "engine_heat": rng.uniform(0.95, 1.05),
        "wake": rng.random() < 0.5,
    }


def _find_place(rng, canvas, looks_like, geometry, obstacles, roads, lot):
    """A free centre and heading: boats on water; others on a road, in the lot, or on open ground."""
    size, radius = canvas.size, geometry["radius"]
    for _attempt in range(40):
        if looks_like == "boat":
            centre = rng.uniform(radius, size - radius, 2)
            angle = rng.uniform(0, 2 * math.pi)
        else:
            where = rng.random()
            if roads and where < 0.5:
                point, direction, half_width = roads[rng.integers(len(roads))]
                side = rng.choice([-1.0, 1.0])
                normal = np.array([-direction[1], direction[0]])
                centre = point + direction * rng.uniform(-size, size) + normal * side * half_width * 0.5
                angle = math.atan2(direction[1], direction[0]) + (math.pi if side < 0 else 0.0) + rng.normal(0, 0.04)
            elif lot is not None and where < 0.8:
                offset = rng.uniform(-1, 1, 2) * (lot["half"] - radius * 0.6)
                cos, sin = math.cos(lot["angle"]), math.sin(lot["angle"])
                centre = lot["centre"] + np.array([offset[0] * cos - offset[1] * sin, offset[0] * sin + offset[1] * cos])
                angle = lot["angle"] + math.pi / 2 + (math.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.05)
            else:
                centre = rng.uniform(radius, size - radius, 2)
                angle = rng.uniform(0, 2 * math.pi)
        if not (radius <= centre[0] <= size - radius and radius <= centre[1] <= size - radius):
            continue
        if not _clear(centre, radius, obstacles):
            continue
        least_water, most_water = _water_under(canvas, centre, angle, geometry)
        if looks_like == "boat" and least_water < 0.9:
            continue
        if looks_like != "boat" and most_water > 0.05:
            continue
        return centre, angle
    return None


def draw_vehicle(canvas, looks_like: str, centre, angle: float, geometry: dict, look: dict,
                 running: bool = False, shadow=(0.0, 0.0)) -> None:
    """Paint one vehicle (top view). RGB depends only on looks_like/geometry/look; `running` adds IR heat."""
    length, width, unit = geometry["length"], geometry["width"], canvas.unit
    half_l, half_w = length / 2, width / 2
    if looks_like != "boat":
        shade = _Window(canvas, np.asarray(centre) + np.asarray(shadow) * 1.3 * unit, angle, geometry["radius"] + 2)
        shade.darken(shade.rect(-half_l, half_l, -half_w, half_w), 0.55, 0.04)
    window = _Window(canvas, np.asarray(centre), angle, geometry["radius"] + 3)
    rect = window.rect
    colour = look["colour"]
    ground_heat = float(canvas.ir[int(centre[1]), int(centre[0])])
    if looks_like == "car":
        window.paint_rgb(rect(-half_l, half_l, -half_w, half_w), colour)
        window.paint_ir(rect(-half_l, half_l, -half_w, half_w), ground_heat + look["body_heat"])
        window.paint_rgb(rect(-0.27 * length, 0.12 * length, -0.4 * width, 0.4 * width), np.minimum(colour * 1.08 + 6, 255))
        for u0, u1 in ((0.12, 0.3), (-0.38, -0.27)):  # windshield, rear window
            glass = rect(u0 * length, u1 * length, -0.42 * width, 0.42 * width)
            window.paint_rgb(glass, GLASS)
            window.paint_ir(glass, 0.24)
        if running:  # a car that has been driven is warm all over, with a hot engine block under the hood
            window.paint_ir(rect(-0.38 * length, 0.5 * length, -0.45 * width, 0.45 * width), 0.72)
            window.paint_ir(rect(0.26 * length, 0.5 * length, -0.45 * width, 0.45 * width), 0.85)
            window.paint_ir(rect(0.3 * length, 0.47 * length, -0.36 * width, 0.36 * width), look["engine_heat"])
    elif looks_like == "van":
        window.paint_rgb(rect(-half_l, half_l, -half_w, half_w), colour)
        window.paint_ir(rect(-half_l, half_l, -half_w, half_w), ground_heat + look["body_heat"] + 0.06)
        # raised roof panel with a dark rim and two roof-rack bars: the van's top-view signature
        window.paint_rgb(rect(-0.46 * length, 0.28 * length, -0.4 * width, 0.4 * width), colour * 0.55)
        window.paint_rgb(rect(-0.42 * length, 0.24 * length, -0.3 * width, 0.3 * width), np.minimum(colour * 1.1 + 12, 255))
        for bar in (-0.25, 0.05):
            window.paint_rgb(rect(bar * length, bar * length + 0.7 * unit, -0.36 * width, 0.36 * width), colour * 0.45)
        glass = rect(0.3 * length, 0.42 * length, -0.44 * width, 0.44 * width)
        window.paint_rgb(glass, GLASS)
        window.paint_ir(glass, 0.24)
    elif looks_like == "truck":
        cargo = rect(-half_l, 0.27 * length, -half_w, half_w)
        window.paint_rgb(cargo, look["cargo"])
        window.paint_ir(cargo, 0.56 + look["body_heat"])
        ribs = (np.mod(window.u / unit, 2.0) < 0.4).astype(np.float32) * cargo
        window.paint_rgb(ribs * 0.6, look["cargo"] * 0.8)
        cab = rect(0.3 * length, half_l, -0.46 * width, 0.46 * width)
        window.paint_rgb(cab, colour)
        window.paint_ir(cab, 0.68)
        glass = rect(0.4 * length, 0.47 * length, -0.42 * width, 0.42 * width)
        window.paint_rgb(glass, GLASS)
    else:  # boat: square stern, pointed bow, deck, optional wake behind the stern
        if look["wake"]:
            flare = 1.0 + np.clip((-half_l - window.u) / length, 0, 1.5)
            wake = rect(-2.2 * length, -half_l, -half_w * 2.5, half_w * 2.5) * np.clip(
                half_w * flare - np.abs(window.v) + 0.5, 0, 1) * np.clip(1 + (window.u + half_l) / (1.7 * length), 0, 1)
            window.paint_rgb(wake * 0.55, np.array((196, 208, 214), np.float32))
            window.paint_ir(wake * 0.3, 0.22)
        bow_start = 0.2 * length
        taper = np.clip((half_l - window.u) / (half_l - bow_start), 0, 1)
        hull = rect(-half_l, half_l, -half_w, half_w) * np.clip(half_w * taper - np.abs(window.v) + 0.5, 0, 1)
        window.paint_rgb(hull, colour)
        window.paint_ir(hull, 0.55 + look["body_heat"])
        deck = rect(-0.35 * length, 0.1 * length, -0.28 * width, 0.28 * width)
        window.paint_rgb(deck, look["deck"])
        window.paint_ir(rect(-half_l, -0.38 * length, -0.3 * width, 0.3 * width), 0.85)


def _label(canvas, class_id, centre, angle, geometry) -> list[float]:
    """Axis-aligned hull of the vehicle's outline, normalised."""
    half_l, half_w = geometry["length"] / 2, geometry["width"] / 2
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    extent_x = half_l * cos + half_w * sin
    extent_y = half_l * sin + half_w * cos
    size = canvas.size
    return [class_id, centre[0] / size, centre[1] / size, 2 * extent_x / size, 2 * extent_y / size]


def _finish(canvas, rng) -> tuple[np.ndarray, np.ndarray]:
    size = canvas.size
    rgb = canvas.rgb
    rgb *= np.float32(rng.uniform(0.9, 1.1))
    rgb += np.float32(3.0) * rng.standard_normal((size, size, 3), dtype=np.float32)
    ir = canvas.ir
    ir *= np.float32(rng.uniform(0.9, 1.1) * 255)
    ir += np.float32(rng.uniform(-0.03, 0.03) * 255)
    ir += np.float32(0.012 * 255) * rng.standard_normal((size, size), dtype=np.float32)
    return (
        np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
        np.clip(np.rint(ir), 0, 255).astype(np.uint8),
    )


class _Window:
    """A square window of the canvas around `centre`, with local coordinates u (along `angle`) and v."""

    def __init__(self, canvas: _Canvas, centre: np.ndarray, angle: float, radius: float):
        self.canvas = canvas
        size = canvas.size
        x0, x1 = max(0, int(centre[0] - radius)), min(size, int(centre[0] + radius) + 1)
        y0, y1 = max(0, int(centre[1] - radius)), min(size, int(centre[1] + radius) + 1)
        self.slices = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
        ys, xs = np.mgrid[y0:max(y0, y1), x0:max(x0, x1)].astype(np.float32) + 0.5
        dx, dy = xs - centre[0], ys - centre[1]
        cos, sin = math.cos(angle), math.sin(angle)
        self.u = dx * cos + dy * sin
        self.v = -dx * sin + dy * cos

    def rect(self, u0, u1, v0, v1) -> np.ndarray:
        """Anti-aliased coverage of the local rectangle [u0, u1] x [v0, v1]."""
        along = np.clip(np.minimum(self.u - u0, u1 - self.u) + 0.5, 0, 1)
        across = np.clip(np.minimum(self.v - v0, v1 - self.v) + 0.5, 0, 1)
        return along * across

    def disc(self, radius: float) -> np.ndarray:
        return np.clip(radius - np.hypot(self.u, self.v) + 0.5, 0, 1)

    def paint_rgb(self, coverage: np.ndarray, colour) -> None:
        _blend(self.canvas.rgb[self.slices], coverage, colour)

    def paint_ir(self, coverage: np.ndarray, heat) -> None:
        _blend(self.canvas.ir[self.slices], coverage, heat)

    def darken(self, coverage: np.ndarray, factor: float, cooling: float) -> None:
        self.canvas.rgb[self.slices] *= (1 - coverage * (1 - factor))[..., None]
        self.canvas.ir[self.slices] -= cooling * coverage


def _water_under(canvas, centre, angle, geometry) -> tuple[float, float]:
    """Smallest and largest water share at the centre and the four outline corners."""
    half_l, half_w = geometry["length"] / 2, geometry["width"] / 2
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(0.0, 0.0), (half_l, half_w), (half_l, -half_w), (-half_l, half_w), (-half_l, -half_w)]
    shares = []
    limit = canvas.size - 1
    for u, v in points:
        x = min(max(int(centre[0] + u * cos - v * sin), 0), limit)
        y = min(max(int(centre[1] + u * sin + v * cos), 0), limit)
        shares.append(canvas.water[y, x])
    return float(min(shares)), float(max(shares))


def _clear(centre, radius, obstacles) -> bool:
    return all(math.hypot(centre[0] - x, centre[1] - y) > radius + r for x, y, r in obstacles)


def _off_roads(centre, radius, roads) -> bool:
    for point, direction, half_width in roads:
        across = abs(-(centre[0] - point[0]) * direction[1] + (centre[1] - point[1]) * direction[0])
        if across < half_width + radius:
            return False
    return True


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-values))
