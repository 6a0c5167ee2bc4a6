"""Dataset YAML: what a dataset holds and where its splits are.

Keys: `path` (root, relative to the yaml), `train`, `val` (required), `test` (optional): each a folder of
images or a .txt list of ids / path prefixes, resolved against the root first and then against the yaml's
own folder (so a repo-held list can sit beside the yaml); `nc`, `names`, `modalities` (subset of rgb, ir);
optional `hr` (the same pairs at 2x resolution, relative to the root) and `ir_only_classes` (class names
that can only be told apart in IR).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_yaml

MODALITIES = ("rgb", "ir")
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("path", "train", "val", "nc", "names", "modalities")


@dataclass(frozen=True)
class DatasetSpec:
    yaml_path: Path
    root: Path
    train: Path
    val: Path
    test: Path | None
    nc: int
    names: tuple[str, ...]
    modalities: tuple[str, ...]
    hr_root: Path | None = None
    ir_only_classes: tuple[str, ...] = field(default_factory=tuple)

    def split_source(self, split: str) -> Path:
        """The folder or list file of `split`; UserError when the yaml has no such split."""
        if split not in SPLITS:
            raise UserError(self.yaml_path, f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        source = getattr(self, split)
        if source is None:
            raise UserError(self.yaml_path, f"no {split!r} split in this dataset yaml")
        return source

    @property
    def ir_only_class_ids(self) -> tuple[int, ...]:
        return tuple(self.names.index(name) for name in self.ir_only_classes)


def load_dataset_yaml(path: str | os.PathLike, check_paths: bool = True) -> DatasetSpec:
    """Read and validate a dataset yaml. `check_paths=False` skips the existence checks (for templates)."""
    yaml_path = Path(path)
    data = read_user_yaml(yaml_path, "dataset yaml")
    if not isinstance(data, dict):
        raise UserError(yaml_path, "a dataset yaml must be a mapping of keys (path, train, val, nc, names, modalities)")
    for key in REQUIRED_KEYS:
        if data.get(key) is None:
            raise UserError(yaml_path, f"missing key {key!r}")

    nc = data["nc"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise UserError(yaml_path, f"key 'nc': expected a positive integer, got {nc!r}")
    names = _names(yaml_path, data["names"])
    if len(names) != nc:
        raise UserError(yaml_path, f"key 'names': {len(names)} names but nc is {nc}")
    modalities = _modalities(yaml_path, data["modalities"])
    ir_only = _ir_only_classes(yaml_path, data.get("ir_only_classes"), names)

    base = yaml_path.absolute().parent
    root = _path_value(yaml_path, "path", data["path"], [base])
    if check_paths and not root.is_dir():
        raise UserError(yaml_path, f"key 'path': dataset root {root} is not a folder")
    sources = {}
    for split in SPLITS:
        value = data.get(split)
        if value is None:
            sources[split] = None
            continue
        sources[split] = _path_value(yaml_path, split, value, [root, base], must_exist=check_paths)
    hr_root = None
    if data.get("hr") is not None:
        hr_root = _path_value(yaml_path, "hr", data["hr"], [root])
        if check_paths and not hr_root.is_dir():
            raise UserError(yaml_path, f"key 'hr': {hr_root} is not a folder")
    return DatasetSpec(
        yaml_path=yaml_path, root=root, train=sources["train"], val=sources["val"], test=sources["test"],
        nc=nc, names=names, modalities=modalities, hr_root=hr_root, ir_only_classes=ir_only,
    )


def _names(yaml_path: Path, value) -> tuple[str, ...]:
    if isinstance(value, dict):  # Ultralytics style {0: car, 1: truck}
        keys = list(value)
        if sorted(keys) != list(range(len(keys))):
            raise UserError(yaml_path, "key 'names': a mapping must be keyed 0..nc-1")
        value = [value[index] for index in range(len(keys))]
    if not isinstance(value, list):
        raise UserError(yaml_path, f"key 'names': expected a list of class names, got {type(value).__name__}")
    names = []
    for index, name in enumerate(value):
        if not isinstance(name, (str, int, float)) or isinstance(name, bool) or str(name).strip() == "":
            raise UserError(yaml_path, f"key 'names': entry {index} ({name!r}) is not a class name")
        names.append(str(name))
    if len(set(names)) != len(names):
        raise UserError(yaml_path, "key 'names': class names must be unique")
    return tuple(names)


def _modalities(yaml_path: Path, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(yaml_path, f"key 'modalities': expected a non-empty list such as [rgb, ir], got {value!r}")
    modalities = []
    for item in value:
        name = str(item).lower()
        if name not in MODALITIES:
            raise UserError(yaml_path, f"key 'modalities': unknown modality {item!r} (expected rgb, ir)")
        if name in modalities:
            raise UserError(yaml_path, f"key 'modalities': {name!r} listed twice")
        modalities.append(name)
    return tuple(modality for modality in MODALITIES if modality in modalities)  # canonical order rgb, ir


def _ir_only_classes(yaml_path: Path, value, names: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise UserError(yaml_path, "key 'ir_only_classes': expected a list of class names or ids")
    out = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(names):
            out.append(names[item])
        elif isinstance(item, str) and item in names:
            out.append(item)
        else:
            raise UserError(yaml_path, f"key 'ir_only_classes': {item!r} is not one of the class names")
    return tuple(out)


def _path_value(yaml_path: Path, key: str, value, bases: list[Path], must_exist: bool = False) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value).strip() == "":
        raise UserError(yaml_path, f"key {key!r}: expected a path, got {value!r}")
    raw = Path(os.path.expanduser(str(value)))
    if raw.is_absolute():
        candidates = [raw]
    else:
        candidates = [Path(os.path.normpath(base / raw)) for base in bases]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if must_exist:
        tried = " or ".join(dict.fromkeys(str(candidate) for candidate in candidates))  # the root may be the base
        raise UserError(yaml_path, f"key {key!r}: {tried} does not exist")
    return candidates[0]
