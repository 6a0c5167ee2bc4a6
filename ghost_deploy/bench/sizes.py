"""How big each form of the model is: files on disk, and the bit plan's analytic size and BOPs.

File sizes are what ships (an ONNX with external data counts its data file too). The analytic size and
BOPs come from the quant module's own accounting of the bit plan (docs/quantization.md states the formula);
they differ from file sizes because an INT8 ONNX or engine stores every weight of <= 8 bits in a byte.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ghost_deploy.contract import OnnxMetadata
from ghost_deploy.errors import UserError
from ghost_deploy.io import sha256_file

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _load_onnx_graph(path: Path):
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError variants
        raise UserError(path, f"cannot read ONNX ({str(exc).splitlines()[0]})") from None


def onnx_precision(path: str | os.PathLike) -> str:
    """`fp32`, `fp16`, `int8-qdq` or `int4w-qdq`, with `-cpu` for ONNX Runtime's integer form (export
    `--target cpu`): from our export metadata when present, else read from the graph itself."""
    model = _load_onnx_graph(Path(path))
    if model is None:
        return "unknown"
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    graph = model.graph
    int4_types = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4") if hasattr(onnx.TensorProto, name)}
    if OnnxMetadata.is_ours(metadata):
        return OnnxMetadata.from_strings(metadata, source=path).int4_label
    if any(init.data_type in int4_types for init in graph.initializer):
        return "int4w-qdq"
    if any(node.op_type in _QDQ_OPS or node.op_type.startswith("QLinear") for node in graph.node):
        return "int8-qdq"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


def external_data_files(path: Path) -> list[Path]:
    """Files an ONNX keeps its weights in beside itself (external data), if any."""
    model = _load_onnx_graph(path)
    if model is None:
        return []
    names = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(path.parent / name for name in names)


def file_entry(role: str, path: str | os.PathLike, hash_files: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(path, f"{role} file not found")
    files = [path] + (external_data_files(path) if path.suffix == ".onnx" else [])
    total = sum(item.stat().st_size for item in files if item.is_file())
    entry = {"role": role, "path": str(path), "bytes": total, "mb": round(total / 1e6, 4),
             "sha256": sha256_file(path) if hash_files else None}
    if path.suffix == ".onnx":
        entry["precision"] = onnx_precision(path)
    return entry


def artifact_sizes(artifacts: dict) -> list[dict]:
    """One entry per file in `artifacts` (checkpoints, onnx, engines): role, path, bytes, sha256."""
    entries = []
    for role, key in (("checkpoint", "checkpoints"), ("onnx", "onnx"), ("engine", "engines")):
        for path in artifacts.get(key, []):
            entries.append(file_entry(role, path))
    return entries
