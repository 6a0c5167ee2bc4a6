"""Small helpers over an ONNX graph: who produces and who reads a tensor, constants, fresh names, and the
file's metadata. Torch-free.

Kept free of any rewriting policy so the QDQ writer, the CPU re-encoder, the linter, exact-arithmetic parity,
the engine stage and bench share one view.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ghost_deploy.contract import OnnxMetadata, ghost_entries
from ghost_deploy.errors import UserError

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
QDQ_OPS = (QUANTIZE, DEQUANTIZE)


class GraphIndex:
    """Producer / consumer maps and constants of one graph, rebuilt on demand after edits."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.graph_inputs = {value.name for value in self.graph.input}
        self.graph_outputs = {value.name for value in self.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None (a runtime tensor)."""
        if not name:
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def constant_dtype(self, name: str) -> int | None:
        """The ONNX element type of a constant (INT4 survives here, numpy may widen it)."""
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return attribute.t.data_type
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant_dtype(name) is not None

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])


def node_attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def unique_name(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        name = f"{base}_{index}"
        index += 1
    taken.add(name)
    return name


def graph_sha256(model: onnx.ModelProto) -> str:
    """Hash of what the graph computes: its nodes, initializers, opsets and the names and element types of its
    inputs and outputs.

    Shape annotations (value_info, input/output dims) are left out: tools that only add shape information
    (ONNX shape inference, ModelOpt's quantizer rewriting its input in place) must not make an intact export
    look edited. Metadata holds this hash, so it is left out too, and so are producer fields (re-saving with
    another onnx version is not an edit).
    """
    graph = model.graph
    digest = hashlib.sha256()
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for tensor in list(graph.initializer) + list(graph.sparse_initializer):
        digest.update(tensor.SerializeToString(deterministic=True))
    for role, values in (("in", graph.input), ("out", graph.output)):
        for value in values:
            digest.update(f"{role}:{value.name}:{value.type.tensor_type.elem_type};".encode())
    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        digest.update(f"{opset[0]}:{opset[1]};".encode())
    return digest.hexdigest()


def readable_tensor_name(name: str) -> str:
    """'/detector/model.2/m/m.0/Add_output_0' -> 'model.2.m.m.0.Add' (torch.onnx's scoped names, flattened)."""
    name = name.lstrip("/").replace("/", ".")
    name = name[len("detector."):] if name.startswith("detector.") else name
    return name[: -len("_output_0")] if name.endswith("_output_0") else name


def name_tensors_after_nodes(model: onnx.ModelProto) -> None:
    """Each intermediate tensor takes its producer's (readable) node name.

    torch.onnx names tensors by scope ('/detector/model.2/m/m.0/cv2/act/Relu_output_0'), written once per
    producer and once per reader; the node names already say the same, shorter, and match the bit plan.
    Graph inputs, outputs and initializers keep their names.
    """
    graph = model.graph
    kept = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    taken = set(kept)
    renamed: dict[str, str] = {}
    for node in graph.node:
        for position, tensor in enumerate(node.output):
            if not tensor or tensor in kept:
                continue
            base = readable_tensor_name(node.name or tensor)
            renamed[tensor] = node.output[position] = unique_name(
                base if len(node.output) == 1 else f"{base}:{position}", taken)
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            if tensor in renamed:
                node.input[position] = renamed[tensor]
    for info in graph.value_info:
        if info.name in renamed:
            info.name = renamed[info.name]


def load_onnx(onnx_path) -> onnx.ModelProto:
    """An ONNX file without its external weight data; a one-line UserError when it is not readable ONNX."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError variants
        raise UserError(onnx_path, f"cannot read ONNX ({type(exc).__name__}: {exc})") from None
    missing = missing_external_data(model, Path(onnx_path).parent)
    if missing:  # said here, before a hash or a pairing check reports it as an edited graph
        raise UserError(onnx_path, f"its external weight data file {missing[0]} is missing (it must sit beside the "
                                   "ONNX, as exported)")
    return model


def missing_external_data(model: onnx.ModelProto, folder: Path) -> list[str]:
    """Files the model's initializers keep their data in (external data) that do not exist in `folder`."""
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if entries.get("location"):
                locations.add(entries["location"])
    return sorted(location for location in locations if not (folder / location).is_file())


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def read_metadata_props(onnx_path) -> dict[str, str]:
    """An ONNX file's metadata_props as a dict, without loading external weight data."""
    return metadata_props(load_onnx(onnx_path))


def onnx_metadata(onnx_path) -> OnnxMetadata | None:
    """The decoded `ghost.*` metadata of an ONNX file, or None for an ONNX that is not one of our exports."""
    props = read_metadata_props(onnx_path)
    return OnnxMetadata.from_strings(props, source=onnx_path) if OnnxMetadata.is_ours(props) else None


def _legacy_graph_sha256(model: onnx.ModelProto) -> str:
    """The graph hash of exports before 0.3.0: the whole serialized graph (shape annotations included)."""
    digest = hashlib.sha256()
    digest.update(model.graph.SerializeToString(deterministic=True))
    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        digest.update(f"{opset[0]}:{opset[1]};".encode())
    return digest.hexdigest()


def content_sha256(model: onnx.ModelProto, metadata: dict[str, str], graph_hash=graph_sha256) -> str:
    """What `ghost.graph_sha256` holds: the graph's hash and every other ghost.* entry."""
    digest = hashlib.sha256(graph_hash(model).encode())
    for key, value in sorted(ghost_entries(metadata).items()):
        if key != OnnxMetadata.HASH_KEY:
            digest.update(f"{key}={value}\n".encode())
    return digest.hexdigest()


def check_binding(path, model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """UserError unless the graph and the ghost.* entries are what the export wrote."""
    stored = metadata.get(OnnxMetadata.HASH_KEY)
    if not stored:
        raise UserError(path, f"metadata lacks {OnnxMetadata.HASH_KEY}: not a complete ghost-deploy export")
    if stored not in (content_sha256(model, metadata), content_sha256(model, metadata, _legacy_graph_sha256)):
        raise UserError(path, "graph or ghost.* metadata changed after export (hash mismatch); re-export it from the checkpoint")
