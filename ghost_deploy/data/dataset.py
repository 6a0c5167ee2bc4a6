"""Dataset, collate and loader for RGB / IR / RGB+IR detection data in the VEDAI layout.

Layout: `<dir>/images/<id>_co.png` (RGB), `<dir>/images/<id>_ir.png` (IR), `<dir>/labels/<id>.txt`.
Single-modality datasets may also name images `<id>.<ext>` (NWPU, DOTA, DIOR style). Every sample is
checked when the dataset is built (files present, image headers and CRCs, sizes, labels), so a bad file
is reported before training starts rather than in the middle of an epoch.

With an `hr` folder and `with_hr=True`, every sample is read at 2x resolution, augmented there, and the
detector input is its 2x2 mean, exactly how VEDAI's 512 tiles relate to its 1024 tiles; the HR arrays
are returned as `hr_rgb` / `hr_ir` (the super-resolution targets).
"""
from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ghost_deploy.data.augment import (
    DEFAULT_HYP,
    boxes_from_labels,
    compose,
    downsample2x,
    labels_from_boxes,
    resize_long_side,
)
from ghost_deploy.data.images import (
    IMAGE_SUFFIXES,
    MODALITY_TAGS,
    DecodedCache,
    default_cache_folder,
    find_image,
    probe_image,
    read_ir,
    read_rgb,
)
from ghost_deploy.data.labels import label_path_for, parse_label_file
from ghost_deploy.data.spec import DatasetSpec, load_dataset_yaml
from ghost_deploy.errors import UserError

__all__ = [
    "DataWarning", "Dataset", "DatasetSpec", "Sample", "collate", "load_dataset_yaml",
    "parse_label_file",
]

_READERS = {"rgb": read_rgb, "ir": read_ir}


class DataWarning(UserWarning):
    """Bad samples were skipped while indexing a dataset (strict=False)."""


@dataclass(frozen=True)
class Sample:
    key: str                      # the id, e.g. 00000000
    images: dict[str, Path]       # modality -> file actually read
    label_path: Path
    labels: np.ndarray            # (n, 5) [cls, cx, cy, w, h] normalised
    shape: tuple[int, int]        # (h, w) at detector-input resolution, before letterbox
    from_hr: bool                 # images are the 2x pair; the input is their 2x2 mean


class Dataset(torch.utils.data.Dataset):
    """One split of a dataset yaml; items are dicts of float tensors (see `__getitem__`)."""

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        img_size: int,
        augment: bool = False,
        hyp: dict | None = None,
        strict: bool = False,
        with_hr: bool = False,
        seed: int = 0,
        cache: str | None = None,
    ):
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
            raise UserError(None, f"--img-size must be an integer >= 8, got {img_size!r}")
        if with_hr and spec.hr_root is None:
            raise UserError(spec.yaml_path, "with_hr needs the 'hr' key (folder of the 2x-resolution pairs)")
        self.spec = spec
        self.split = split
        self.img_size = img_size
        self.augment = augment
        self.hyp = _merge_hyp(hyp)
        self.strict = strict
        self.with_hr = with_hr
        self.seed = seed
        if cache not in (None, "off", "disk"):
            raise UserError("cache", f"must be 'disk' or 'off', got {cache!r}")
        self.cache = DecodedCache(default_cache_folder()) if cache == "disk" else None
        self.epoch = 0
        self.modalities = spec.modalities
        self.source = spec.split_source(split)
        self.samples: list[Sample] = []
        self.skipped: list[tuple[str, str]] = []
        self._bad_at_load: set[int] = set()  # samples that failed to decode after indexing (non-strict: skipped)
        self._index()

    # ---- indexing -------------------------------------------------------------------------------
    def _index(self) -> None:
        for prefix in _list_prefixes(self.source, self.spec.root):
            try:
                self.samples.append(self._index_sample(prefix))
            except UserError as exc:
                if self.strict:
                    raise
                self.skipped.append((exc.path or str(prefix), exc.problem))
        if self.skipped:
            shown = "; ".join(f"{path}: {problem}" for path, problem in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            warnings.warn(
                f"{self.spec.yaml_path} [{self.split}]: skipped {len(self.skipped)} bad sample(s): {shown}{more}",
                DataWarning, stacklevel=3,
            )
        if not self.samples:
            detail = f" ({len(self.skipped)} skipped, first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise UserError(self.source, f"no usable samples in split {self.split!r}{detail}")

    def _index_sample(self, prefix: Path) -> Sample:
        lr_files = self._find_files(prefix)
        hr_prefix = self._hr_prefix(prefix)
        hr_files = self._find_files(hr_prefix) if hr_prefix is not None else None
        if self.with_hr:
            _require_all(hr_files, hr_prefix, "HR ")
            files, image_prefix, from_hr = hr_files, hr_prefix, True
        elif all(lr_files.values()):
            files, image_prefix, from_hr = lr_files, prefix, False
        elif hr_files is not None and not any(lr_files.values()) and all(hr_files.values()):
            # Only the 2x pair exists (VEDAI_1024-only ids): read it and halve it.
            files, image_prefix, from_hr = hr_files, hr_prefix, True
        else:
            _require_all(lr_files, prefix, "")
        sizes = {modality: probe_image(path) for modality, path in files.items()}
        first_modality, first_size = next(iter(sizes.items()))
        for modality, size in sizes.items():
            if size != first_size:
                raise UserError(
                    files[modality],
                    f"size {size[1]}x{size[0]} differs from its {first_modality.upper()} partner "
                    f"{files[first_modality].name} ({first_size[1]}x{first_size[0]})",
                )
        height, width = first_size
        if from_hr:
            if height % 2 or width % 2:
                raise UserError(files[first_modality], f"HR image size {width}x{height} is not even (needs a 2x2 mean)")
            height, width = height // 2, width // 2
        label_path = label_path_for(image_prefix)
        labels = parse_label_file(label_path, self.spec.nc)
        return Sample(prefix.name, files, label_path, labels, (height, width), from_hr)

    def _find_files(self, prefix: Path) -> dict[str, Path | None]:
        untagged = len(self.modalities) == 1  # plain <id>.jpg names only make sense with one modality
        return {modality: find_image(prefix, MODALITY_TAGS[modality], untagged) for modality in self.modalities}

    def _hr_prefix(self, prefix: Path) -> Path | None:
        hr_root = self.spec.hr_root
        if hr_root is None:
            return None
        try:
            return hr_root / prefix.relative_to(self.spec.root)
        except ValueError:
            return hr_root / "images" / prefix.name

    # ---- items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        """item: an index, or (index, seed) as `make_loader`'s sampler yields.

        Returns {"rgb": (3,H,W), "ir": (1,H,W) float32 in [0,1] (the modalities present), "labels": (n,6)
        [0, cls, cx, cy, w, h] normalised to the letterboxed output, "path": str, "shape": (h0, w0)}, plus
        "hr_rgb" / "hr_ir" at 2H x 2W when with_hr.
        """
        if isinstance(item, tuple):
            index, seed = item
            rng = np.random.default_rng(seed)
        else:
            index = int(item)
            rng = np.random.default_rng([self.seed, self.epoch, index])
        if not 0 <= index < len(self.samples):
            raise IndexError(index)
        scale = 2 if self.with_hr else 1
        work_size = self.img_size * scale
        images, boxes = compose(
            lambda i: self._load_or_skip(i, work_size), index, len(self.samples), work_size, self.hyp, rng,
            self.augment, min_side=2.0 * scale,
        )
        labels = labels_from_boxes(boxes, work_size, work_size)
        out = {}
        if self.with_hr:
            for modality in self.modalities:
                out[f"hr_{modality}"] = _to_tensor(images[modality])
            images = {modality: downsample2x(array) for modality, array in images.items()}
        for modality in self.modalities:
            out[modality] = _to_tensor(images[modality])
        targets = torch.zeros((len(labels), 6), dtype=torch.float32)
        targets[:, 1:] = torch.from_numpy(labels)
        sample = self.samples[index]
        out["labels"] = targets
        out["path"] = str(next(iter(sample.images.values())))
        out["shape"] = sample.shape
        return out

    def set_epoch(self, epoch: int) -> None:
        """Augmentation epoch for plain integer indices. Call it before each epoch when the loader is not
        `make_loader` (whose sampler passes (index, seed) pairs); otherwise every epoch repeats the same
        mosaics and flips. Set in the main process, it reaches workers that start with the epoch."""
        self.epoch = int(epoch)

    def _load_or_skip(self, index: int, size: int):
        """`_load`, except that without --strict a sample that fails to decode now (it passed indexing: only its
        header was read) is skipped like one found bad at indexing, with the same warning line, and the next good
        sample stands in for it."""
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if candidate in self._bad_at_load:
                continue
            try:
                return self._load(candidate, size)
            except UserError as exc:
                if self.strict:
                    raise
                self._bad_at_load.add(candidate)
                self.skipped.append((exc.path or self.samples[candidate].key, exc.problem))
                warnings.warn(f"{self.spec.yaml_path} [{self.split}]: skipped 1 bad sample(s): {exc.line()}",
                              DataWarning, stacklevel=2)
        raise UserError(self.source, f"no usable samples in split {self.split!r}: every image failed to decode")

    def _load(self, index: int, size: int):
        """Sample `index` as arrays with long side `size` and pixel boxes."""
        sample = self.samples[index]
        if self.cache is None:
            arrays = {modality: _READERS[modality](path) for modality, path in sample.images.items()}
        else:
            arrays = {modality: self.cache.read(_READERS[modality], path) for modality, path in sample.images.items()}
        shapes = {array.shape[:2] for array in arrays.values()}
        if len(shapes) != 1:  # headers agreed at indexing; a decoded size can still differ if a file changed
            raise UserError(sample.images[self.modalities[-1]], "decoded size differs from its partner image")
        if sample.from_hr and not self.with_hr:
            arrays = {modality: downsample2x(array) for modality, array in arrays.items()}
        height, width = next(iter(arrays.values())).shape[:2]
        boxes = boxes_from_labels(sample.labels, height, width)
        return resize_long_side(arrays, boxes, size)

    @property
    def labels(self) -> list[np.ndarray]:
        """Per-sample (n, 5) labels as indexed (for class counts and anchor checks)."""
        return [sample.labels for sample in self.samples]


def collate(samples: list[dict]) -> dict:
    """Stack a list of items into the batch dict of DESIGN.md (targets column 0 = index in the batch)."""
    batch = {}
    for key in ("rgb", "ir", "hr_rgb", "hr_ir"):
        if key in samples[0]:
            batch[key] = torch.stack([sample[key] for sample in samples])
    targets = []
    for position, sample in enumerate(samples):
        labels = sample["labels"].clone()
        labels[:, 0] = position
        targets.append(labels)
    batch["targets"] = torch.cat(targets) if targets else torch.zeros((0, 6))
    batch["paths"] = [sample["path"] for sample in samples]
    batch["shapes"] = [sample["shape"] for sample in samples]
    return batch


def _merge_hyp(hyp: dict | None) -> dict:
    merged = dict(DEFAULT_HYP)
    for key, value in (hyp or {}).items():
        if key in DEFAULT_HYP:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise UserError(None, f"hyp {key!r}: expected a non-negative number, got {value!r}")
            merged[key] = float(value)
    return merged


def _require_all(files: dict[str, Path | None] | None, prefix: Path, kind: str) -> None:
    """Raise the UserError that names what is missing among a sample's image files."""
    files = files or {}
    found = {modality: path for modality, path in files.items() if path is not None}
    missing = [modality for modality, path in files.items() if path is None]
    if not missing:
        return
    folder = prefix.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(folder, f"is a file, not a folder: the images of {prefix.name} are looked for in it")
    for modality in missing:  # an image that is there but cannot be opened is not a missing one
        for link in folder.glob(f"{glob.escape(prefix.name)}{MODALITY_TAGS[modality]}.*") if folder.is_dir() else ():
            if link.is_symlink() and not link.exists():
                raise UserError(link, "symlink that does not resolve (a loop, or its target is gone)")
    if not found:
        tags = [MODALITY_TAGS[modality] for modality in files] or ["_co"]
        raise UserError(f"{prefix}{tags[0]}.png", f"no {kind}image found for {prefix.name}")
    partner = next(iter(found.values()))
    modality = missing[0]
    expected = partner.parent / f"{prefix.name}{MODALITY_TAGS[modality]}{partner.suffix}"
    raise UserError(expected, f"missing {kind}{modality.upper()} partner of {partner.name}")


def _list_prefixes(source: Path, root: Path) -> list[Path]:
    """Sample prefixes (path without modality tag and suffix) from a folder or a list file."""
    if source.is_dir():
        folder = source
        if not _has_images(folder) and (folder / "images").is_dir():
            folder = folder / "images"
        prefixes = {folder / _strip_name(path.name) for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
        return sorted(prefixes)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(source, f"cannot read list file: {exc}") from None
    prefixes = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        path = path.parent / _strip_name(path.name)
        if path.is_absolute():
            prefixes.append(path)
        elif entry.startswith(("./", "../")):  # YOLOv5 convention: relative to the list file
            prefixes.append(Path(os.path.normpath(source.parent / path)))
        elif len(path.parts) == 1:  # a bare id
            prefixes.append(root / "images" / path)
        else:
            prefixes.append(root / path)
    return prefixes


def _strip_name(name: str) -> str:
    """`00000000_co.png` -> `00000000`; `00000000` stays."""
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in IMAGE_SUFFIXES:
        name = stem
    for tag in MODALITY_TAGS.values():
        if name.endswith(tag):
            return name[: -len(tag)]
    return name


def _has_images(folder: Path) -> bool:
    return any(path.suffix.lower() in IMAGE_SUFFIXES for path in folder.iterdir())


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.divide(array, 255.0, dtype=np.float32))
