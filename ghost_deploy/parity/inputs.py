"""Parity inputs: N images of the dataset's val split (N = recipe parity.images), the images of a folder
(`<id>_co.png` + `<id>_ir.png` pairs, or single-modality files) or of a calibration manifest, letterboxed to
the model's img_size; and the recipe's parity section (budgets, image count, which arithmetic decides).
Torch-free except `images_from_dataset`, which reads through the training Dataset (PyTorch) on purpose: the
parity images are then letterboxed exactly as validation sees them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml
from ghost_deploy.data.augment import letterbox, resize_long_side
from ghost_deploy.data.calib import CalibBatches, CalibSet, load_calib_set, load_pair_arrays
from ghost_deploy.data.images import IMAGE_SUFFIXES, MODALITY_TAGS, find_image, read_ir, read_rgb
from ghost_deploy.errors import UserError
from ghost_deploy.io import sha256_file
from ghost_deploy.parity.compare import Budgets

DETECTOR_INPUT_CHANNELS = {"rgb": 3, "ir": 1}


@dataclass
class ParityInputs:
    inputs: dict[str, np.ndarray]  # name -> (N, C, H, W) float32 in [0, 1]
    paths: list[list[str]]
    sha256: list[list[str]]
    source: str

    @property
    def count(self) -> int:
        return len(self.paths)


# --------------------------------------------------------------------------------------------- inputs
def budgets_from_recipe(recipe: dict | None) -> Budgets:
    """recipe['parity'] minus the keys that are not budgets (e.g. `images`)."""
    values = dict((recipe or {}).get("parity") or {})
    known = {f.name for f in fields(Budgets)}
    return Budgets.from_dict({k: v for k, v in values.items() if k in known})


def parity_arithmetic(recipe: dict | None) -> str:
    """Which comparison decides the gate: "exact" (the default, also for checkpoints that name none) or "float32"."""
    return str(((recipe or {}).get("parity") or {}).get("arithmetic", "exact"))


def parity_image_count(recipe: dict | None, default: int = 8) -> int:
    count = ((recipe or {}).get("parity") or {}).get("images", default)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(None, f"recipe parity.images must be a positive integer, got {count!r}")
    return count


def _letterboxed(arrays: dict[str, np.ndarray], img_size: int) -> dict[str, np.ndarray]:
    empty = np.zeros((0, 6))  # augment.py boxes: [cls, x1, y1, x2, y2, full_area]
    arrays, _ = resize_long_side(arrays, empty, img_size)
    arrays, _ = letterbox(arrays, empty, img_size)
    return arrays


def _to_chw(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def images_from_folder(folder: str | os.PathLike, input_names, img_size: int, limit: int) -> ParityInputs:
    """The first `limit` samples of a folder (sorted by id), read like the dataset reads them."""

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(folder, "parity images folder not found")
    readers = {"rgb": read_rgb, "ir": read_ir}
    untagged = len(input_names) == 1
    prefixes = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = path.stem
        for tag in MODALITY_TAGS.values():
            if stem.endswith(tag):
                stem = stem[: -len(tag)]
                break
        prefix = folder / stem
        if prefix not in prefixes:
            prefixes.append(prefix)
    samples = []
    for prefix in prefixes:
        files = {name: find_image(prefix, MODALITY_TAGS[name], untagged) for name in input_names}
        if all(files.values()):
            samples.append(files)
        if len(samples) == limit:
            break
    if not samples:
        wanted = " + ".join(f"<id>{MODALITY_TAGS[n]}.png" for n in input_names)
        raise UserError(folder, f"no parity images found (expected {wanted})")
    batches = {name: [] for name in input_names}
    for files in samples:
        arrays = _letterboxed({name: readers[name](files[name]) for name in input_names}, img_size)
        for name in input_names:
            batches[name].append(_to_chw(arrays[name]))
    return ParityInputs(
        inputs={name: np.stack(values) for name, values in batches.items()},
        paths=[[str(files[name]) for name in input_names] for files in samples],
        sha256=[[sha256_file(files[name]) for name in input_names] for files in samples],
        source=str(folder))


def images_from_dataset(data_yaml: str | os.PathLike, input_names, img_size: int, limit: int) -> ParityInputs:
    """The first `limit` samples of the dataset's val split, letterboxed exactly as validation sees them."""
    from ghost_deploy.data.dataset import Dataset  # PyTorch: deferred so the parity stage imports without it

    spec = load_dataset_yaml(data_yaml)
    missing = [name for name in input_names if name not in spec.modalities]
    if missing:
        raise UserError(data_yaml, f"dataset has no {missing} images; the model reads {list(input_names)}")
    dataset = Dataset(spec, "val", img_size, augment=False)
    count = min(limit, len(dataset))
    batches = {name: [] for name in input_names}
    paths, hashes = [], []
    for index in range(count):
        item = dataset[index]
        for name in input_names:
            batches[name].append(item[name].numpy().astype(np.float32))
        files = dataset.samples[index].images
        paths.append([str(files[name]) for name in input_names])
        hashes.append([sha256_file(files[name]) for name in input_names])
    return ParityInputs(inputs={name: np.stack(values) for name, values in batches.items()}, paths=paths,
                        sha256=hashes, source=f"{data_yaml} [val]")


def parity_source(meta, checkpoint=None, parity_images=None, data=None) -> tuple[str, str | os.PathLike]:
    """Where the parity images come from, checked to exist (export asks before it builds the graph): ("manifest",
    path), ("folder", path) or ("dataset", yaml) from --parity-images, --data, the checkpoint's dataset, the recipe's,
    or the embedded demo set. A dataset the checkpoint records but that is not found is one line naming the checkpoint.
    """
    if parity_images is not None and Path(parity_images).suffix in (".yaml", ".yml"):
        if not Path(parity_images).is_file():
            raise UserError(parity_images, "calibration set manifest not found (--parity-images)")
        return "manifest", parity_images
    if parity_images is not None:
        if not Path(parity_images).is_dir():
            raise UserError(parity_images, "is a file, not a folder of images (nor a calibration manifest .yaml)"
                            if Path(parity_images).exists() else "parity images folder not found")
        return "folder", parity_images
    if data is not None:
        if not Path(data).is_file():
            raise UserError(data, "dataset YAML for the parity images not found (--data)")
        return "dataset", data
    source = meta.dataset(checkpoint, "--data YAML or --parity-images DIR") or (meta.recipe or {}).get("data")
    if source in (None, "embedded"):
        return "dataset", ensure_synthetic_dataset(seed=0)
    if not Path(source).is_file():
        raise UserError(source, "dataset YAML for the parity images not found; pass --data YAML or --parity-images DIR")
    return "dataset", source


def resolve_parity_inputs(meta, img_size: int, count: int, parity_images=None, data=None,
                          checkpoint=None) -> ParityInputs:
    """The parity inputs from `parity_source`: a folder, a calibration manifest, or the val split of a dataset."""
    input_names = list(meta.input_names)
    kind, source = parity_source(meta, checkpoint, parity_images, data)
    if kind == "manifest":
        return parity_inputs_from_manifest(source, input_names, img_size, count)
    if kind == "folder":
        return images_from_folder(source, input_names, img_size, count)
    return images_from_dataset(source, input_names, img_size, count)


def parity_inputs_from_manifest(manifest, input_names, img_size: int, limit: int | None = None):
    """The parity inputs of the export gate from a manifest (parity.ParityInputs), hashes verified."""
    calib_set = manifest if isinstance(manifest, CalibSet) else load_calib_set(manifest)
    input_names = list(input_names)
    CalibBatches(calib_set, img_size, 1, input_names)  # checks the modalities
    pairs = calib_set.pairs[:limit] if limit else calib_set.pairs
    rows = [load_pair_arrays(pair, input_names, img_size) for pair in pairs]
    return ParityInputs(
        inputs={name: np.stack([row[name] for row in rows]) for name in input_names},
        paths=[[str(pair.images[name]) for name in input_names] for pair in pairs],
        sha256=[[pair.sha256[name] for name in input_names] for pair in pairs],
        source=f"calibration set {calib_set.name} ({calib_set.path}, sha256 {calib_set.sha256[:12]})")
