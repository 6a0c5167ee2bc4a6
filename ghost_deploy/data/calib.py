"""Calibration and parity sets: manifests of RGB+IR pairs chosen from a split, verified by SHA-256.

`make_calib_set` picks n pairs from one split, stratified by class (each image counts under the rarest class
it holds) and by the brightness of each modality (bins at the split's quantiles), after first making sure
every class present in the split appears in at least one chosen image. It writes `<out_dir>/<name>.yaml`:
the pair paths (relative to the dataset root), their SHA-256, how they were chosen and per-class counts.
The choice depends only on the split's files and the seed, and the manifest holds no timestamp, so a
second run writes the same bytes.

`load_calib_set` refuses a manifest whose files changed (one line naming the file). `calib_batches` yields
the letterboxed tensors of every sensor the model reads, both sensors of a pair always in the same batch
row. `range_coverage` says how much of each activation tensor's range on the whole split the set covers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ghost_deploy import __version__
from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml
from ghost_deploy.data.augment import downsample2x, letterbox, resize_long_side
from ghost_deploy.data.images import read_ir, read_rgb
from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_yaml, sha256_file, write_text_atomic

FORMAT = "ghost-deploy/calib-set/v1"
EMBEDDED = "embedded"  # the data key of a set drawn from the embedded demo set (root found on any machine)
BACKGROUND = "background"  # stratum of images without objects
DEFAULT_BRIGHTNESS_BINS = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class CalibPair:
    key: str  # sample id, e.g. 00000042
    images: dict[str, Path]  # modality -> image file
    sha256: dict[str, str]  # modality -> SHA-256 of that file
    label: Path | None
    from_hr: bool  # the files are the 2x pair; the detector input is their 2x2 mean


@dataclass
class CalibSet:
    name: str
    path: Path  # the manifest
    sha256: str  # of the manifest file: what checkpoints and reports record
    data: str  # dataset yaml (or "embedded")
    split: str
    modalities: tuple[str, ...]
    names: tuple[str, ...]
    pairs: list[CalibPair]
    selection: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def record(self) -> dict:
        """What a checkpoint or report says about the set it was calibrated or checked on."""
        return {"name": self.name, "manifest": str(self.path), "sha256": self.sha256, "pairs": len(self.pairs),
                "data": self.data, "split": self.split, "modalities": list(self.modalities)}

    def spec(self):
        """The DatasetSpec of the dataset the set was drawn from."""

        return load_dataset_yaml(_resolve_data(self.data))


# ------------------------------------------------------------------------------------------- making
def make_calib_set(data_yaml, n: int = 256, split: str = "train", name: str | None = None, seed: int = 0,
                   out_dir="calib", brightness_bins: int = DEFAULT_BRIGHTNESS_BINS, force: bool = False) -> Path:
    """Choose `n` pairs of `split` (stratified by class and per-modality brightness) and write the manifest.

    `data_yaml` is a dataset YAML or "embedded". Returns the manifest path `<out_dir>/<name>.yaml`.
    An existing manifest with other content is kept unless `force` (artifacts may name it by hash).
    """

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError("--n", f"must be a positive integer, got {n!r}")
    if isinstance(brightness_bins, bool) or not isinstance(brightness_bins, int) or brightness_bins < 1:
        raise UserError("--brightness-bins", f"must be a positive integer, got {brightness_bins!r}")
    data_key = EMBEDDED if str(data_yaml) == EMBEDDED else str(Path(data_yaml).absolute())
    spec = load_dataset_yaml(_resolve_data(str(data_yaml)))  # messages name the dataset as the user typed it
    from ghost_deploy.data.dataset import Dataset  # PyTorch's Dataset: deferred so reading a manifest stays torch-free

    dataset = Dataset(spec, split, 64, augment=False)  # img_size is unused: only the index is read
    samples = sorted(dataset.samples, key=lambda sample: (sample.key, str(sample.label_path)))
    name = name or f"{_dataset_name(data_key, spec)}-{split}-{n}"
    if not _NAME.match(name):
        raise UserError("--name", f"{name!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)")
    out = Path(out_dir) / f"{name}.yaml"
    if (out.exists() or out.is_symlink()) and not _is_manifest(out):  # e.g. the dataset's own data.yaml
        raise UserError(out, "exists and is not a calibration set manifest: it is never replaced (not even with "
                             "--force); choose another --name or --out-dir")

    class_images = _class_images(samples, spec.nc)
    strata_class = [_rarest_class(sample.labels, class_images) for sample in samples]
    brightness = {modality: np.array([_mean_brightness(sample.images[modality]) for sample in samples])
                  for modality in spec.modalities}
    edges = {modality: _quantile_edges(values, brightness_bins) for modality, values in brightness.items()}
    bins = {modality: np.searchsorted(edges[modality], brightness[modality], side="right")
            for modality in spec.modalities}
    cells = [(strata_class[i], *(int(bins[m][i]) for m in spec.modalities)) for i in range(len(samples))]
    chosen = _choose(samples, cells, min(n, len(samples)), seed)

    manifest = _manifest(spec, data_key, dataset, samples, chosen, cells, brightness, edges, n, seed, name, split,
                         brightness_bins, class_images)
    text = _dump(manifest)
    if out.exists() and not force:
        if _same_set(out, manifest):
            return out  # the very same set (perhaps written by another version): keep the file and its hash
        raise UserError(out, "a different calibration set has this name; choose another --name or pass --force")
    write_text_atomic(out, text)
    out.chmod(0o666 & ~_umask())  # a manifest is meant to be shared and committed, unlike a temp file's 0600
    return out


def _is_manifest(path: Path) -> bool:
    """Whether `path` is a calibration set manifest (`format: ghost-deploy/calib-set/...`), the only file
    `make_calib_set` replaces."""
    try:
        existing = read_user_yaml(path, "calibration set manifest")  # bounded: whatever file a user left there
    except UserError:
        return False
    return isinstance(existing, dict) and existing.get("format") == FORMAT


def _same_set(path: Path, manifest: dict) -> bool:
    try:
        existing = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(existing, dict):
        return False
    ignore = ("made_by",)
    return {k: v for k, v in existing.items() if k not in ignore} == {k: v for k, v in manifest.items() if k not in ignore}


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _choose(samples, cells, n: int, seed: int) -> list[int]:
    """Indices of the chosen samples: first one image per class present (rarest classes first), then the
    rest spread over the cells in proportion to their size (largest remainders), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    taken = set()
    present = {}
    for index, sample in enumerate(samples):
        for cls in {int(c) for c in sample.labels[:, 0]}:
            present.setdefault(cls, []).append(index)
    for cls in sorted(present, key=lambda c: (len(present[c]), c)):
        if len(chosen) >= n:
            break
        if any(i in taken for i in present[cls]):
            continue
        pick = int(present[cls][rng.integers(len(present[cls]))])
        chosen.append(pick)
        taken.add(pick)

    members: dict[tuple, list[int]] = {}
    for index, cell in enumerate(cells):
        members.setdefault(cell, []).append(index)
    order = sorted(members, key=_cell_sort_key)
    picked_in = {cell: sum(1 for i in members[cell] if i in taken) for cell in order}
    remaining = n - len(chosen)
    if remaining > 0:
        total = len(samples)
        want = {cell: max(0.0, n * len(members[cell]) / total - picked_in[cell]) for cell in order}
        room = {cell: len(members[cell]) - picked_in[cell] for cell in order}
        extra = _largest_remainder(want, room, remaining)
        for cell in order:
            free = [i for i in members[cell] if i not in taken]
            for position in rng.permutation(len(free))[: extra[cell]]:
                chosen.append(free[int(position)])
                taken.add(free[int(position)])
    return sorted(chosen, key=lambda i: samples[i].key)


def _largest_remainder(want: dict, room: dict, units: int) -> dict:
    """Split `units` over keys in proportion to `want`, never above `room`; leftovers go where room is."""
    out = {key: 0 for key in want}
    total_want = sum(want.values())
    if total_want > 0:
        shares = {key: units * value / total_want for key, value in want.items()}
        for key in want:
            out[key] = min(int(np.floor(shares[key])), room[key])
        left = units - sum(out.values())
        by_remainder = sorted(want, key=lambda k: (-(shares[k] - np.floor(shares[k])), _cell_sort_key(k)))
        for key in by_remainder:
            if left <= 0:
                break
            if out[key] < room[key]:
                out[key] += 1
                left -= 1
    left = units - sum(out.values())
    while left > 0:  # caps hit: fill the cells with the most room left (the first such cell on ties)
        key = max(want, key=lambda k: room[k] - out[k])
        if room[key] - out[key] <= 0:
            break
        out[key] += 1
        left -= 1
    return out


def _cell_sort_key(cell: tuple) -> tuple:
    return (cell[0] == BACKGROUND, str(cell[0]).zfill(8), *cell[1:])


def _class_images(samples, nc: int) -> np.ndarray:
    """Per class: number of images of the split that hold it."""
    counts = np.zeros(nc, dtype=np.int64)
    for sample in samples:
        for cls in {int(c) for c in sample.labels[:, 0]}:
            counts[cls] += 1
    return counts


def _rarest_class(labels: np.ndarray, class_images: np.ndarray):
    classes = sorted({int(c) for c in labels[:, 0]})
    if not classes:
        return BACKGROUND
    return min(classes, key=lambda c: (class_images[c], c))


def _mean_brightness(path: Path) -> float:
    """Mean grey level (0..255) of an image file as stored."""
    try:
        with Image.open(path) as image:
            image = image.convert("L") if image.mode not in ("I", "I;16", "I;16B", "I;16L") else image
            array = np.asarray(image, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise UserError(path, f"cannot read image ({exc})") from None
    if array.max(initial=0) > 255:  # 16-bit thermal
        array = array / 257.0
    return float(array.mean())


def _quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Inner bin edges at the split's quantiles (fewer when values repeat)."""
    if bins <= 1 or len(values) == 0:
        return []
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({round(float(edge), 4) for edge in edges})


def _dataset_name(data_key: str, spec) -> str:
    if data_key == EMBEDDED:
        return EMBEDDED
    stem = spec.yaml_path.stem
    return spec.yaml_path.parent.name if stem in ("data", "dataset") else stem


def _manifest(spec, data_key, dataset, samples, chosen, cells, brightness, edges, requested, seed, name, split,
              brightness_bins, class_images) -> dict:
    root = spec.root.absolute()
    modalities = list(spec.modalities)
    chosen_set = set(chosen)
    pairs = []
    for index in chosen:
        sample = samples[index]
        entry = {"id": sample.key}
        for modality in modalities:
            entry[modality] = _relative(sample.images[modality], root)
            entry[f"{modality}_sha256"] = sha256_file(sample.images[modality])
        entry["label"] = _relative(sample.label_path, root) if sample.label_path.is_file() else None
        entry["label_sha256"] = sha256_file(sample.label_path) if sample.label_path.is_file() else None
        if sample.from_hr:
            entry["from_hr"] = True
        entry["stratum"] = _cell_text(cells[index], modalities, spec.names)
        entry["brightness"] = {m: round(float(brightness[m][index]), 2) for m in modalities}
        pairs.append(entry)

    classes = {}
    for cls, class_name in enumerate(spec.names):
        in_set = [samples[i].labels for i in chosen]
        classes[class_name] = {
            "images": int(sum(1 for labels in in_set if (labels[:, 0] == cls).any())),
            "instances": int(sum(int((labels[:, 0] == cls).sum()) for labels in in_set)),
            "split_images": int(class_images[cls]),
            "split_instances": int(sum(int((s.labels[:, 0] == cls).sum()) for s in samples)),
        }
    strata = {}
    for index, cell in enumerate(cells):
        key = _cell_text(cell, modalities, spec.names)
        row = strata.setdefault(key, {"set": 0, "split": 0})
        row["split"] += 1
        row["set"] += index in chosen_set
    selection = {
        "method": "stratified: one image per class present (rarest first), then proportional over cells of "
                  "(rarest class in the image) x (brightness bin of each modality), largest remainders",
        "seed": seed, "requested": requested, "selected": len(chosen), "split_size": len(samples),
        "skipped_bad_samples": len(dataset.skipped),
        "brightness": {"statistic": "mean grey level 0..255 of each file", "bins": brightness_bins,
                       "inner_edges": {m: edges[m] for m in modalities}},
        "strata": dict(sorted(strata.items())),
    }
    return {
        "format": FORMAT, "name": name, "made_by": f"ghost-deploy {__version__}",
        "data": data_key, "root": EMBEDDED if data_key == EMBEDDED else str(root), "split": split,
        "modalities": modalities, "names": list(spec.names),
        "note": "Two-sensor models are calibrated with both files of each pair, always together.",
        "selection": selection, "classes": classes, "pairs": pairs,
    }


def _cell_text(cell: tuple, modalities: list[str], names) -> str:
    cls = cell[0]
    parts = [BACKGROUND if cls == BACKGROUND else names[cls]]
    parts += [f"{m}{b}" for m, b in zip(modalities, cell[1:])]
    return "/".join(parts)


def _relative(path: Path, root: Path) -> str:
    path = Path(path).absolute()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)  # a list file may name pairs outside the root


def _dump(manifest: dict) -> str:
    header = ("# Calibration / parity set made by `ghost-deploy calib make`. Files are checked against their\n"
              "# SHA-256 when the set is loaded; an edited file is refused. Format: docs/calibration.md\n")
    return header + yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=120, default_flow_style=None)


def _resolve_data(data_key: str) -> Path:
    if data_key == EMBEDDED:

        return Path(ensure_synthetic_dataset(seed=0))
    return Path(data_key)


# ------------------------------------------------------------------------------------------- loading
def load_calib_set(manifest, root=None, verify: bool = True) -> CalibSet:
    """Read a manifest and check every file against its SHA-256 (UserError naming the first changed file).

    `root` overrides the dataset root written in the manifest (the same images moved to another machine).
    """
    path = Path(manifest)
    data = read_user_yaml(path, "calibration set manifest")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise UserError(path, f"not a calibration set manifest (format {found!r}, expected {FORMAT!r})")
    for key in ("name", "data", "root", "split", "modalities", "pairs"):
        if key not in data:
            raise UserError(path, f"manifest lacks {key!r}")
    modalities = tuple(data["modalities"])
    if not modalities or any(m not in ("rgb", "ir") for m in modalities):
        raise UserError(path, f"modalities must be a list of rgb, ir; got {data['modalities']!r}")
    base = _root_for(data, path, root)
    pairs = []
    if not isinstance(data["pairs"], list) or not data["pairs"]:
        raise UserError(path, "manifest lists no pairs")
    for number, entry in enumerate(data["pairs"], start=1):
        pairs.append(_parse_pair(entry, number, modalities, base, path, verify))
    return CalibSet(name=str(data["name"]), path=path, sha256=sha256_file(path), data=str(data["data"]),
                    split=str(data["split"]), modalities=modalities, names=tuple(data.get("names") or ()),
                    pairs=pairs, selection=data.get("selection") or {}, classes=data.get("classes") or {})


def _root_for(data: dict, manifest: Path, override) -> Path:
    if override is not None:
        return Path(override)
    if data["root"] == EMBEDDED:
        return _resolve_data(EMBEDDED).parent
    return Path(str(data["root"]))


def _parse_pair(entry, number: int, modalities, root: Path, manifest: Path, verify: bool) -> CalibPair:
    if not isinstance(entry, dict) or "id" not in entry:
        raise UserError(manifest, f"pair {number}: expected a mapping with id, " + ", ".join(modalities))
    images, hashes, label = {}, {}, None
    files = [(m, entry.get(m), entry.get(f"{m}_sha256")) for m in modalities]
    if entry.get("label") is not None:
        files.append(("label", entry["label"], entry.get("label_sha256")))
    for kind, relative, expected in files:
        if not relative or not expected:
            raise UserError(manifest, f"pair {number} ({entry['id']}): missing {kind} path or {kind}_sha256")
        file = Path(relative) if Path(relative).is_absolute() else root / relative
        if verify:
            if not file.is_file():
                raise UserError(file, f"listed in calibration set {manifest} but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise UserError(file, f"changed since calibration set {manifest} was made "
                                      f"(sha256 {actual[:12]}..., manifest says {str(expected)[:12]}...)")
        if kind == "label":
            label = file
        else:
            images[kind], hashes[kind] = file, str(expected)
    return CalibPair(key=str(entry["id"]), images=images, sha256=hashes, label=label,
                     from_hr=bool(entry.get("from_hr", False)))


# ------------------------------------------------------------------------------------------- tensors
def load_pair_arrays(pair: CalibPair, input_names, img_size: int) -> dict[str, np.ndarray]:
    """{name: (C, H, W) float32 in [0, 1]}: the pair letterboxed exactly as validation reads it."""
    readers = {"rgb": read_rgb, "ir": read_ir}
    arrays = {name: readers[name](pair.images[name]) for name in input_names}
    shapes = {array.shape[:2] for array in arrays.values()}
    if len(shapes) != 1:
        raise UserError(pair.images[input_names[-1]], "size differs from its partner image in the pair")
    if pair.from_hr:
        arrays = {name: downsample2x(array) for name, array in arrays.items()}
    empty = np.zeros((0, 6))
    arrays, _ = resize_long_side(arrays, empty, img_size)
    arrays, _ = letterbox(arrays, empty, img_size)
    out = {}
    for name, array in arrays.items():
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        out[name] = np.ascontiguousarray(np.divide(array, 255.0, dtype=np.float32))
    return out


class CalibBatches:
    """Re-iterable batches of a calibration set: tuples of tensors in `input_names` order.

    Every sensor of a pair is read for the same row of the same batch, so a two-input model always sees a
    matched RGB+IR pair (calibrating the branches on different images would skew the fused layers' ranges).
    """

    def __init__(self, calib_set: CalibSet, img_size: int, batch_size: int, input_names):
        self.calib_set = calib_set
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)
        self.input_names = tuple(input_names)
        missing = [name for name in self.input_names if name not in calib_set.modalities]
        if missing:
            raise UserError(calib_set.path, f"set has no {'/'.join(missing)} images; the model reads "
                                            f"{' + '.join(self.input_names)}")
        if self.batch_size < 1:
            raise UserError("--batch-size", f"must be positive, got {batch_size}")

    def __len__(self) -> int:
        return -(-len(self.calib_set.pairs) // self.batch_size)

    def __iter__(self):
        import torch

        pairs = self.calib_set.pairs
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            rows = [load_pair_arrays(pair, self.input_names, self.img_size) for pair in chunk]
            yield tuple(torch.from_numpy(np.stack([row[name] for row in rows])) for name in self.input_names)


def calib_batches(calib_set: CalibSet, img_size: int, batch_size: int = 8, input_names=("rgb", "ir")) -> CalibBatches:
    """Letterboxed tensors of the set, every sensor of each pair together (see CalibBatches)."""
    return CalibBatches(calib_set, img_size, batch_size, input_names)


