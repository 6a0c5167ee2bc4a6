"""The parity set saved beside every ONNX: fixed inputs, the reference outputs, and what they mean.

One `.npz` (no pickles) with keys `input/<name>`, `output/<name>` and `meta` (UTF-8 JSON stored as a
uint8 array). Every later stage (ORT check, TensorRT engine, deployment bundle on a Jetson) runs the
same inputs and compares against the same reference, so a parity number always means the same thing.

The meta is a `contract.ParityMeta`: input and output names (model order), the images, the head geometry
(strides, anchors in input pixels, nc, names), the budgets (compare.Budgets), output scales, the reference's
arithmetic. Torch-free: numpy only.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ghost_deploy.contract import ParityMeta
from ghost_deploy.errors import UserError
from ghost_deploy.eval.boxes import xywh2xyxy
from ghost_deploy.eval.postprocess import decode_heads_np, non_max_suppression_np
from ghost_deploy.io import atomic_path, sha256_file
from ghost_deploy.parity.compare import ImageDetections

INPUT_PREFIX = "input/"
OUTPUT_PREFIX = "output/"
META_KEY = "meta"


@dataclass
class ParitySet:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    meta: ParityMeta
    sha256: str
    path: str | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def detection_fn(self, conf_thres: float = 0.001, iou_thres: float = 0.45,
                     max_det: int = 300) -> Callable[[dict], list[np.ndarray]] | None:
        """outputs dict -> per-image (n,6) detections, decoded with this set's strides/anchors/nc.

        None when the meta does not describe detection heads (then only tensors are compared).
        """
        return detection_fn_from_meta(self.meta, self.output_names, conf_thres, iou_thres, max_det)


def detection_fn_from_meta(meta: ParityMeta, output_names: list[str], conf_thres: float = 0.001,
                           iou_thres: float = 0.45, max_det: int = 300):
    """Build the decode+NMS function for raw head outputs; None if the meta lacks head geometry."""
    if not meta.describes_heads:
        return None
    strides, anchors, nc = meta.strides, meta.anchors_pixels, meta.nc
    head_names = list(meta.head_output_names or output_names)
    if len(head_names) != len(strides):
        raise UserError(None, f"parity set meta: {len(strides)} strides but {len(head_names)} head outputs {head_names}")

    def detect(outputs: dict[str, np.ndarray]) -> list[ImageDetections]:
        heads = [np.asarray(outputs[name], dtype=np.float32) for name in head_names]
        pred = decode_heads_np(heads, strides, anchors, int(nc))
        found = non_max_suppression_np(pred, conf_thres, iou_thres, max_det, with_anchors=True)
        return [ImageDetections(np.asarray(boxes, dtype=np.float64).reshape(-1, 6), rows,
                                np.concatenate((xywh2xyxy(image[:, :4]), image[:, 4:]), axis=1))
                for (boxes, rows), image in zip(found, pred)]

    return detect


def _check_arrays(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not arrays:
        raise UserError(None, f"parity set needs at least one {kind} array")
    checked = {}
    for name, value in arrays.items():
        if not name or "/" in name:
            raise UserError(None, f"parity set {kind} name {name!r} must be non-empty and contain no '/'")
        array = np.asarray(value)
        if array.dtype == object:
            raise UserError(None, f"parity set {kind} {name!r} is an object array; only numeric arrays are stored")
        checked[name] = array
    return checked


def save_parity_set(path: str | os.PathLike, inputs: dict[str, np.ndarray],
                    reference_outputs: dict[str, np.ndarray], meta: ParityMeta | dict) -> str:
    """Write the parity set atomically; returns the sha256 of the written file."""
    inputs = _check_arrays("input", inputs)
    reference_outputs = _check_arrays("output", reference_outputs)
    meta = meta.to_dict() if isinstance(meta, ParityMeta) else dict(meta)
    meta.setdefault("input_names", list(inputs))
    meta.setdefault("output_names", list(reference_outputs))
    ParityMeta.from_dict(meta, source=path)  # what a reader will decode
    if sorted(meta["input_names"]) != sorted(inputs):
        raise UserError(path, f"meta input_names {meta['input_names']} do not match the inputs {list(inputs)}")
    if sorted(meta["output_names"]) != sorted(reference_outputs):
        raise UserError(path, f"meta output_names {meta['output_names']} do not match the outputs {list(reference_outputs)}")
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    except TypeError as exc:
        raise UserError(path, f"parity set meta is not JSON-serialisable: {exc}") from None
    arrays = {INPUT_PREFIX + k: v for k, v in inputs.items()}
    arrays.update({OUTPUT_PREFIX + k: v for k, v in reference_outputs.items()})
    arrays[META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object stops numpy from appending ".npz"
            np.savez_compressed(handle, **arrays)
    return sha256_file(path)


def load_parity_set(path: str | os.PathLike) -> ParitySet:
    """Read and validate a parity set; UserError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "parity set not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # NumPy reads a file that is no .npz as a pickle and then advises allow_pickle: never the way here
        reason = "not a NumPy .npz archive" if "pickle" in str(exc) else str(exc)
        raise UserError(path, f"not a readable parity set .npz ({reason})") from None
    if META_KEY not in arrays:
        raise UserError(path, "parity set has no 'meta' entry")
    raw_meta = arrays.pop(META_KEY)
    try:
        text = raw_meta.tobytes().decode("utf-8") if raw_meta.dtype == np.uint8 else str(raw_meta[()])
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(path, f"parity set meta is not valid JSON ({exc})") from None
    meta = ParityMeta.from_dict(meta, source=path)
    inputs = {k[len(INPUT_PREFIX):]: v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)}
    outputs = {k[len(OUTPUT_PREFIX):]: v for k, v in arrays.items() if k.startswith(OUTPUT_PREFIX)}
    if not inputs:
        raise UserError(path, "parity set has no 'input/<name>' arrays")
    if not outputs:
        raise UserError(path, "parity set has no 'output/<name>' arrays")
    input_names = list(meta.input_names or inputs)
    output_names = list(meta.output_names or outputs)
    missing = [n for n in input_names if n not in inputs] + [n for n in output_names if n not in outputs]
    if missing:
        raise UserError(path, f"parity set meta names arrays that are missing: {missing}")
    return ParitySet(inputs={n: inputs[n] for n in input_names}, outputs={n: outputs[n] for n in output_names},
                     meta=meta, sha256=sha256_file(path), path=str(path),
                     input_names=input_names, output_names=output_names)
