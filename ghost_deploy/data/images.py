"""Image files of a sample: finding them, checking their headers, decoding them with PIL.

RGB is read as RGB (PIL order, never OpenCV's BGR). IR is one band: a PNG whose three channels are
identical (VEDAI stores its near-infrared band that way) is read as that one band.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ghost_deploy.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# File-name tags of each modality (VEDAI: <id>_co.png colour, <id>_ir.png infrared).
MODALITY_TAGS = {"rgb": "_co", "ir": "_ir"}

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def find_image(prefix: Path, tag: str, allow_untagged: bool) -> Path | None:
    """The first existing `<prefix><tag><suffix>` (or `<prefix><suffix>` when untagged names are allowed)."""
    tags = (tag, "") if allow_untagged else (tag,)
    for candidate_tag in tags:
        for suffix in IMAGE_SUFFIXES:
            candidate = prefix.parent / f"{prefix.name}{candidate_tag}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def probe_image(path: Path) -> tuple[int, int]:
    """(height, width) from the header after PIL's integrity check (chunk CRCs, truncation); no decode."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except FileNotFoundError:
        raise UserError(path, "image file not found") from None
    except _DECODE_ERRORS as exc:
        raise UserError(path, f"corrupt or unreadable image ({exc})") from None
    return height, width


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 in R, G, B order."""
    image = _decode(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    return np.asarray(image.convert("RGB"))


def read_ir(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8. Grey replicated into 3 channels collapses to one; other colour IR becomes luminance."""
    image = _decode(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _to_uint8(np.asarray(image))
    if image.mode == "L":
        return np.asarray(image)
    if image.mode in ("RGB", "RGBA"):
        array = np.asarray(image)
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            return np.ascontiguousarray(array[..., 0])
    return np.asarray(image.convert("L"))


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise UserError(path, "image file not found") from None
    except _DECODE_ERRORS as exc:
        raise UserError(path, f"corrupt or unreadable image ({exc})") from None


def _to_uint8(array: np.ndarray) -> np.ndarray:
    # 16-bit thermal: keep the full range in 8 bits (the network sees [0, 1] either way).
    return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


class DecodedCache:
    """Decoded images kept as raw `.npy` files, so each image file is decoded once per machine, not per epoch.

    PNG decoding is most of a training sample's cost (a mosaic reads 4 pairs: measured 45-54% of a worker's time
    at 512 and 1024 px, benchmarks/loader_throughput.py); reading the raw array back is a plain file read. The key
    is the file's absolute path, size, mtime and the reader, so an edited image is decoded again; entries are
    written atomically (temp name, rename), so parallel workers never read half a file.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def read(self, reader, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise UserError(path, "image file not found") from None
        key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{reader.__name__}".encode()).hexdigest()
        entry = self.folder / key[:2] / f"{key}.npy"
        try:
            return np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # absent, or unreadable (then decoded and written again)
            pass
        array = reader(path)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=entry.parent)
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
            os.replace(temp, entry)
        except OSError:  # a full or read-only cache disk costs speed, never the run
            pass
        return array


def default_cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ghost-deploy" / "decoded"
