"""Training augmentation, applied identically to every modality of a sample.

A sample here is `images` (dict modality -> uint8 array, (H, W, 3) or (H, W), all the same size) and
`boxes`: float64 (n, 6) = [cls, x1, y1, x2, y2, full_area] in pixels of those images. `full_area` is the
box's area before any cropping, in the current pixel frame, so a box that ends up mostly outside the
output can be told from one that is merely small. Every geometric step warps all arrays with the same
matrix and the same interpolation, so pixel alignment between RGB, IR and their HR versions is exact.
Only HSV touches the RGB array alone. Hyper-parameter names follow YOLOv5's hyp.scratch.yaml.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

PAD_VALUE = 114  # letterbox / mosaic / affine fill, as YOLOv5 (114/255 after scaling)

DEFAULT_HYP = {
    "mosaic": 1.0,
    "translate": 0.1,
    "scale": 0.5,
    "degrees": 0.0,
    "shear": 0.0,
    "fliplr": 0.5,
    "flipud": 0.0,
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
}

# A box keeps its label only if at least this share of its area is still visible; smaller fragments
# (mostly outside after mosaic, scale or translate) are dropped.
MIN_VISIBLE = 0.25

Images = dict[str, np.ndarray]


def boxes_from_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, 5) normalised [cls, cx, cy, w, h] -> (n, 6) pixel [cls, x1, y1, x2, y2, full_area]."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1, 5)
    boxes = np.zeros((len(labels), 6))
    boxes[:, 0] = labels[:, 0]
    boxes[:, 1] = (labels[:, 1] - labels[:, 3] / 2) * width
    boxes[:, 2] = (labels[:, 2] - labels[:, 4] / 2) * height
    boxes[:, 3] = (labels[:, 1] + labels[:, 3] / 2) * width
    boxes[:, 4] = (labels[:, 2] + labels[:, 4] / 2) * height
    boxes[:, 5] = _area(boxes)
    return boxes


def labels_from_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, 6) pixel boxes -> (n, 5) normalised [cls, cx, cy, w, h] (float32)."""
    out = np.zeros((len(boxes), 5), dtype=np.float32)
    out[:, 0] = boxes[:, 0]
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / width
    out[:, 2] = (boxes[:, 2] + boxes[:, 4]) / 2 / height
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / width
    out[:, 4] = (boxes[:, 4] - boxes[:, 2]) / height
    return out


def image_hw(images: Images) -> tuple[int, int]:
    first = next(iter(images.values()))
    return first.shape[0], first.shape[1]


def resize_long_side(images: Images, boxes: np.ndarray, size: int) -> tuple[Images, np.ndarray]:
    """Scale so the longer side is `size` (area filter when shrinking, bilinear when enlarging)."""
    height, width = image_hw(images)
    ratio = size / max(height, width)
    if ratio == 1:
        return images, boxes
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    method = Image.Resampling.BOX if ratio < 1 else Image.Resampling.BILINEAR
    resized = {key: np.asarray(Image.fromarray(array).resize((new_w, new_h), method)) for key, array in images.items()}
    return resized, _scale_boxes(boxes, new_w / width, new_h / height)


def letterbox(images: Images, boxes: np.ndarray, size: int) -> tuple[Images, np.ndarray]:
    """Pad (centred, value 114) to size x size; the image must already fit (see `resize_long_side`)."""
    height, width = image_hw(images)
    if (height, width) == (size, size):
        return images, boxes
    top, left = (size - height) // 2, (size - width) // 2
    padded = {}
    for key, array in images.items():
        canvas = np.full((size, size) + array.shape[2:], PAD_VALUE, dtype=np.uint8)
        canvas[top:top + height, left:left + width] = array
        padded[key] = canvas
    return padded, _shift_boxes(boxes, left, top)


def mosaic(frames: list[tuple[Images, np.ndarray]], size: int, rng: np.random.Generator) -> tuple[Images, np.ndarray]:
    """Four samples (each with long side <= size) around a random centre of a 2*size canvas (YOLOv5 layout)."""
    canvas_size = 2 * size
    centre_x = int(rng.uniform(size // 2, 3 * size // 2))
    centre_y = int(rng.uniform(size // 2, 3 * size // 2))
    canvases = {
        key: np.full((canvas_size, canvas_size) + array.shape[2:], PAD_VALUE, dtype=np.uint8)
        for key, array in frames[0][0].items()
    }
    placed = []
    for position, (images, boxes) in enumerate(frames):
        height, width = image_hw(images)
        if position == 0:  # top left: the image's bottom-right corner sits on the centre
            x1a, y1a, x2a, y2a = max(centre_x - width, 0), max(centre_y - height, 0), centre_x, centre_y
            x1b, y1b, x2b, y2b = width - (x2a - x1a), height - (y2a - y1a), width, height
        elif position == 1:  # top right
            x1a, y1a, x2a, y2a = centre_x, max(centre_y - height, 0), min(centre_x + width, canvas_size), centre_y
            x1b, y1b, x2b, y2b = 0, height - (y2a - y1a), min(width, x2a - x1a), height
        elif position == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(centre_x - width, 0), centre_y, centre_x, min(canvas_size, centre_y + height)
            x1b, y1b, x2b, y2b = width - (x2a - x1a), 0, width, min(y2a - y1a, height)
        else:  # bottom right
            x1a, y1a, x2a, y2a = centre_x, centre_y, min(centre_x + width, canvas_size), min(canvas_size, centre_y + height)
            x1b, y1b, x2b, y2b = 0, 0, min(width, x2a - x1a), min(y2a - y1a, height)
        for key, canvas in canvases.items():
            canvas[y1a:y2a, x1a:x2a] = images[key][y1b:y2b, x1b:x2b]
        placed.append(_shift_boxes(boxes, x1a - x1b, y1a - y1b))
    merged = np.concatenate(placed) if placed else np.zeros((0, 6))
    return canvases, _clip_boxes(merged, canvas_size, canvas_size)


def random_affine(
    images: Images, boxes: np.ndarray, out_size: int, rng: np.random.Generator, hyp: dict
) -> tuple[Images, np.ndarray]:
    """Random rotation/scale/shear about the input centre, then translation, into an out_size square."""
    height, width = image_hw(images)
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], dtype=np.float64)
    angle = math.radians(rng.uniform(-hyp["degrees"], hyp["degrees"]))
    scale = rng.uniform(1 - hyp["scale"], 1 + hyp["scale"])
    rotate = np.array([
        [scale * math.cos(angle), scale * math.sin(angle), 0],
        [-scale * math.sin(angle), scale * math.cos(angle), 0],
        [0, 0, 1],
    ])
    shear = np.eye(3)
    shear[0, 1] = math.tan(math.radians(rng.uniform(-hyp["shear"], hyp["shear"])))
    shear[1, 0] = math.tan(math.radians(rng.uniform(-hyp["shear"], hyp["shear"])))
    translate = np.eye(3)
    translate[0, 2] = rng.uniform(0.5 - hyp["translate"], 0.5 + hyp["translate"]) * out_size
    translate[1, 2] = rng.uniform(0.5 - hyp["translate"], 0.5 + hyp["translate"]) * out_size
    matrix = translate @ shear @ rotate @ centre
    return warp_affine(images, boxes, matrix, out_size)


def warp_affine(images: Images, boxes: np.ndarray, matrix: np.ndarray, out_size: int) -> tuple[Images, np.ndarray]:
    """Warp every array with the 3x3 `matrix` (input pixel -> output pixel), bilinear, fill 114."""
    inverse = np.linalg.inv(matrix)
    coefficients = tuple(float(value) for value in inverse[:2].reshape(-1))
    warped = {}
    for key, array in images.items():
        fill = PAD_VALUE if array.ndim == 2 else (PAD_VALUE,) * array.shape[2]
        image = Image.fromarray(array).transform(
            (out_size, out_size), Image.Transform.AFFINE, coefficients,
            resample=Image.Resampling.BILINEAR, fillcolor=fill,
        )
        warped[key] = np.asarray(image)
    if len(boxes) == 0:
        return warped, boxes
    corners = np.stack([
        boxes[:, [1, 2]], boxes[:, [3, 2]], boxes[:, [3, 4]], boxes[:, [1, 4]],
    ], axis=1)  # (n, 4, 2)
    moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
    out = boxes.copy()
    out[:, 1:3] = moved.min(axis=1)
    out[:, 3:5] = moved.max(axis=1)
    out[:, 5] = boxes[:, 5] * abs(np.linalg.det(matrix[:2, :2]))
    return warped, _clip_boxes(out, out_size, out_size)


def flip(images: Images, boxes: np.ndarray, horizontal: bool) -> tuple[Images, np.ndarray]:
    height, width = image_hw(images)
    axis = 1 if horizontal else 0
    flipped = {key: np.ascontiguousarray(np.flip(array, axis=axis)) for key, array in images.items()}
    out = boxes.copy()
    if horizontal:
        out[:, 1], out[:, 3] = width - boxes[:, 3], width - boxes[:, 1]
    else:
        out[:, 2], out[:, 4] = height - boxes[:, 4], height - boxes[:, 2]
    return flipped, out


def augment_hsv(rgb: np.ndarray, rng: np.random.Generator, hue: float, saturation: float, value: float) -> np.ndarray:
    """Random HSV gains (YOLOv5 style) on an (H, W, 3) uint8 RGB image; IR never goes through this."""
    gains = rng.uniform(-1, 1, 3) * np.array([hue, saturation, value]) + 1
    if not (hue or saturation or value):
        return rgb
    levels = np.arange(256, dtype=np.float64)
    luts = (np.mod(levels * gains[0], 256).astype(np.uint8),  # PIL's hue spans 0..255
            np.clip(levels * gains[1], 0, 255).astype(np.uint8), np.clip(levels * gains[2], 0, 255).astype(np.uint8))
    # PIL applies the tables per band in C (the same values as indexing with numpy, without three gathers and a stack)
    bands = Image.fromarray(rgb).convert("HSV").split()
    return np.asarray(Image.merge("HSV", [band.point(lut.tolist()) for band, lut in zip(bands, luts)]).convert("RGB"))


def downsample2x(array: np.ndarray) -> np.ndarray:
    """2x2 mean (area downsampling, rounded): how VEDAI's 512 tiles relate to its 1024 tiles."""
    height, width = array.shape[:2]
    blocks = array.reshape(height // 2, 2, width // 2, 2, *array.shape[2:]).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def keep_visible(boxes: np.ndarray, min_side: float, min_visible: float = MIN_VISIBLE) -> np.ndarray:
    """Drop boxes that are mostly outside (visible share < min_visible) or thinner than min_side pixels."""
    widths = boxes[:, 3] - boxes[:, 1]
    heights = boxes[:, 4] - boxes[:, 2]
    visible = widths * heights / np.maximum(boxes[:, 5], 1e-9)
    return boxes[(widths >= min_side) & (heights >= min_side) & (visible >= min_visible)]


def compose(
    load: Callable[[int], tuple[Images, np.ndarray]],
    index: int,
    count: int,
    size: int,
    hyp: dict,
    rng: np.random.Generator,
    augment: bool,
    min_side: float = 2.0,
    min_visible: float = MIN_VISIBLE,
) -> tuple[Images, np.ndarray]:
    """One training/eval sample of `size` x `size`: mosaic or letterbox, affine, HSV, flips.

    `load(i)` returns sample i resized to long side `size`. Without `augment` this is just the letterbox.
    """
    if augment and hyp["mosaic"] > 0 and rng.random() < hyp["mosaic"]:
        others = rng.integers(0, count, size=3)
        frames = [load(index)] + [load(int(other)) for other in others]
        images, boxes = mosaic(frames, size, rng)
        images, boxes = random_affine(images, boxes, size, rng, hyp)
    else:
        images, boxes = letterbox(*load(index), size)
        if augment:
            images, boxes = random_affine(images, boxes, size, rng, hyp)
    if not augment:
        return images, _clip_boxes(boxes, size, size)
    boxes = keep_visible(boxes, min_side, min_visible)
    if "rgb" in images:
        images["rgb"] = augment_hsv(images["rgb"], rng, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
    if rng.random() < hyp["flipud"]:
        images, boxes = flip(images, boxes, horizontal=False)
    if rng.random() < hyp["fliplr"]:
        images, boxes = flip(images, boxes, horizontal=True)
    return images, boxes


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 3] - boxes[:, 1], 0, None) * np.clip(boxes[:, 4] - boxes[:, 2], 0, None)


def _scale_boxes(boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    out = boxes.copy()
    out[:, [1, 3]] *= scale_x
    out[:, [2, 4]] *= scale_y
    out[:, 5] *= scale_x * scale_y
    return out


def _shift_boxes(boxes: np.ndarray, dx: float, dy: float) -> np.ndarray:
    out = boxes.copy()
    out[:, [1, 3]] += dx
    out[:, [2, 4]] += dy
    return out


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    out = boxes.copy()
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, width)
    out[:, [2, 4]] = out[:, [2, 4]].clip(0, height)
    return out
