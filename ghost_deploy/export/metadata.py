"""What an exported ONNX says about itself, and how we recognise one of ours.

metadata_props (all strings; JSON where structured):
  ghost.format            "ghost-deploy/onnx/v1"
  ghost.model, ghost.nc, ghost.names, ghost.input_mode, ghost.input_names, ghost.img_size
  ghost.strides, ghost.anchors (per head, w,h pairs in input pixels), ghost.head_output_names, ghost.output_names
  ghost.bit_plan          the BitPlan JSON ("null" for an FP32 export)
  ghost.precision         "qdq" | "fp32";  ghost.target "trt" | "cpu"
  ghost.int4_weights      true: the weights of every layer at <= 4 bits in the bit plan are INT4 initializers
  ghost.checkpoint_sha256 of the checkpoint it came from;  ghost.exporter (package version)
  ghost.graph_sha256      sha256 of the graph, the opsets and every other ghost.* entry: an edited graph or
                          edited metadata no longer matches, so `load_our_onnx` refuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from ..errors import UserError
from .graph import graph_sha256

FORMAT = "ghost-deploy/onnx/v1"
PREFIX = "ghost."
HASH_KEY = "ghost.graph_sha256"
JSON_KEYS = ("names", "input_names", "strides", "anchors", "head_output_names", "output_names", "bit_plan",
             "int4_weights", "nc", "img_size")


def content_sha256(model: onnx.ModelProto, metadata: dict[str, str]) -> str:
    digest = hashlib.sha256(graph_sha256(model).encode())
    for key in sorted(metadata):
        if key.startswith(PREFIX) and key != HASH_KEY:
            digest.update(f"{key}={metadata[key]}\n".encode())
    return digest.hexdigest()


def set_metadata(model: onnx.ModelProto, values: dict) -> dict[str, str]:
    """Replace all metadata_props with `values` (keys without the prefix) plus the format and the hash."""
    metadata = {f"{PREFIX}format": FORMAT}
    for key, value in values.items():
        metadata[PREFIX + key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    metadata[HASH_KEY] = content_sha256(model, metadata)
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    return metadata


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def decoded(metadata: dict[str, str]) -> dict:
    """ghost.* entries without the prefix, JSON ones parsed."""
    out = {}
    for key, value in metadata.items():
        if not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX):]
        out[short] = json.loads(value) if short in JSON_KEYS else value
    return out


def load_our_onnx(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict]:
    """Load an ONNX written by `export_onnx`; UserError if it is not ours or was changed since."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise UserError(path, f"not a readable ONNX model ({type(exc).__name__})") from None
    metadata = read_metadata(model)
    if metadata.get(f"{PREFIX}format") != FORMAT:
        found = metadata.get(f"{PREFIX}format")
        raise UserError(path, "not a ghost-deploy export (no ghost.format metadata)" if found is None
                        else f"unknown ghost-deploy ONNX format {found!r}, expected {FORMAT}")
    stored = metadata.get(HASH_KEY)
    if not stored:
        raise UserError(path, f"metadata lacks {HASH_KEY}: not a complete ghost-deploy export")
    if content_sha256(model, metadata) != stored:
        raise UserError(path, "graph or ghost.* metadata changed after export (hash mismatch); re-export it from the checkpoint")
    try:
        values = decoded(metadata)
    except json.JSONDecodeError as exc:
        raise UserError(path, f"ghost.* metadata is not valid JSON ({exc})") from None
    return model, values
