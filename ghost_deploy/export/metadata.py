"""What an exported ONNX says about itself (`contract.OnnxMetadata`), and how we recognise one of ours.

`ghost.graph_sha256` binds the `ghost.*` entries to what the graph computes (`onnx_graph.graph_sha256`:
nodes, initializers, opsets, input/output names and types): an edited graph or edited metadata no longer
matches, so `load_our_onnx` refuses it, while shape annotations added by other tools do not count.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ghost_deploy.contract import OnnxMetadata
from ghost_deploy.errors import UserError
from ghost_deploy.onnx_graph import check_binding, content_sha256


def set_metadata(model: onnx.ModelProto, values: OnnxMetadata) -> dict[str, str]:
    """Replace all metadata_props with `values` plus the binding hash; returns what was written."""
    metadata = values.to_strings()
    metadata[OnnxMetadata.HASH_KEY] = content_sha256(model, metadata)
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    return metadata


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def load_our_onnx(path: str | os.PathLike) -> tuple[onnx.ModelProto, OnnxMetadata]:
    """Load an ONNX written by `export_onnx`; UserError if it is not ours or was changed since."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise UserError(path, f"not a readable ONNX model ({type(exc).__name__})") from None
    metadata = read_metadata(model)
    values = OnnxMetadata.from_strings(metadata, source=path)
    check_binding(path, model, metadata)
    return model, values
