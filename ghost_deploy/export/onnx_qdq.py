"""The QDQ writer: turns the float graph with activation markers into TensorRT-style explicit quantization.

- Each quantized conv weight becomes an integer initializer holding the trained codes (INT8, or INT4 for
  <= 4-bit layers when asked) -> DequantizeLinear(per-channel scale, zero-point 0, axis 0).
- Each activation marker becomes QuantizeLinear -> DequantizeLinear (INT8, zero-point 0, the trained scale):
  one pair per activation quantizer, shared by every reader of the tensor. The trained quantizer uses the
  narrow range [-qmax, qmax]; INT8 Q clamps to [-128, 127], which is the same on non-negative tensors for
  8 bits. Where the ranges could differ (fewer bits, or a tensor that may be negative) a float Clip to
  [-qmax*s, qmax*s] precedes the Q, so the graph still computes exactly what PyTorch computes.
- Node names are the bit plan's layer names: the conv `model.3.conv`, its weight `model.3.conv.weight_dq`,
  its input `model.3.conv.input_q` / `.input_dq` (named after the first reader of a shared quantizer).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ghost_deploy.errors import UserError
from ghost_deploy.export.torch_graph import MARKER_DOMAIN, MARKER_OP, WRAPPER_PREFIX, ActSpec, ConvSpec
from ghost_deploy.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, node_attribute, unique_name

INT4_MAX_BITS = 4
INT4_OPSET = 21
# Ops whose output is >= 0 whenever their data inputs are (sigmoid always is).
_NONNEG_PASSTHROUGH = ("Concat", "MaxPool", "Resize", "Upsample", "Identity", "Reshape", "Flatten", "Transpose",
                       "Add", "Mul", "AveragePool", "GlobalAveragePool", "Slice", "Split", "Squeeze", "Unsqueeze")


def pack_int4(values: np.ndarray) -> bytes:
    """Two signed 4-bit values per byte, the first in the low nibble (ONNX and TensorRT layout)."""
    flat = values.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    low = flat[0::2].astype(np.uint8) & 0x0F
    high = (flat[1::2].astype(np.uint8) & 0x0F) << 4
    return (low | high).astype(np.uint8).tobytes()


def int_initializer(name: str, values: np.ndarray, int4: bool) -> onnx.TensorProto:
    if int4:
        if values.size and (values.min() < -8 or values.max() > 7):
            raise ValueError(f"{name}: values outside the INT4 range")
        return helper.make_tensor(name, TensorProto.INT4, list(values.shape), pack_int4(values), raw=True)
    return numpy_helper.from_array(values.astype(np.int8), name)


def nonnegative_tensors(model: onnx.ModelProto, inputs_nonnegative: bool = True) -> set[str]:
    """Tensors that are >= 0 by construction (ReLU outputs and what only combines them).

    Graph inputs count as non-negative when `inputs_nonnegative` (the image contract: float32 in [0, 1]).
    """
    index = GraphIndex(model)
    known: set[str] = set(index.graph_inputs) if inputs_nonnegative else set()
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        op = node.op_type
        data = [t for t in node.input[:1]] if op in ("Resize", "Upsample", "Reshape", "Slice", "Split", "Squeeze",
                                                      "Unsqueeze") else [t for t in node.input if t]
        if op in ("Relu", "Sigmoid", "Softplus", "Abs"):
            positive = True
        elif op == "Clip":
            low = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            positive = (low is not None and float(low) >= 0) or node.input[0] in known
        elif op in _NONNEG_PASSTHROUGH:
            positive = all(t in known or _nonneg_constant(index, t) for t in data)
        elif op in (QUANTIZE, DEQUANTIZE):
            positive = node.input[0] in known
        elif op == MARKER_OP and node.domain == MARKER_DOMAIN:
            positive = node.input[0] in known
        else:
            positive = False
        if positive:
            known.update(t for t in node.output if t)
    return known


def _nonneg_constant(index: GraphIndex, name: str) -> bool:
    value = index.constant(name)
    return value is not None and value.size > 0 and bool(np.all(value >= 0))


def write_qdq(model: onnx.ModelProto, convs: dict[str, ConvSpec], acts: dict[str, ActSpec]) -> onnx.ModelProto:
    """Rewrite `model` (the float graph from torch_graph) in place into the QDQ graph (INT8 weights); returns it."""
    index = GraphIndex(model)
    graph = model.graph
    taken = {n.name for n in graph.node} | set(index.producer) | set(index.initializers) | index.graph_inputs
    conv_nodes = name_conv_nodes(model, convs)
    nonneg = nonnegative_tensors(model)
    new_inits: list[onnx.TensorProto] = []
    drop_inits: set[str] = set()

    for name, node in conv_nodes.items():
        spec = convs[name]
        if spec.weight_bits is None:
            continue
        weight_name = node.input[1]
        codes_name = unique_name(f"{name}.weight_quantized", taken)
        scale_name = unique_name(f"{name}.weight_scale", taken)
        zp_name = unique_name(f"{name}.weight_zero_point", taken)
        out_name = unique_name(f"{name}.weight_dequantized", taken)
        new_inits += [numpy_helper.from_array(spec.codes.astype(np.int8), codes_name),
                      numpy_helper.from_array(spec.weight_scale.astype(np.float32), scale_name),
                      numpy_helper.from_array(np.zeros(spec.codes.shape[0], np.int8), zp_name)]
        dq = helper.make_node(DEQUANTIZE, [codes_name, scale_name, zp_name], [out_name],
                              name=unique_name(f"{name}.weight_dq", taken), axis=0,
                              doc_string=f"{spec.weight_bits}-bit weight codes of {name}, per output channel")
        _insert_before(graph, node, dq)
        node.input[1] = out_name
        drop_inits.add(weight_name)

    markers = [n for n in graph.node if n.domain == MARKER_DOMAIN and n.op_type == MARKER_OP]
    # One pair per quantizer and tensor: readers in different blocks (a neck output read by the next conv and a
    # Detect conv) each ran the shared quantizer on the same tensor, which is one Q/DQ in the graph.
    pairs: dict[tuple[str, str], str] = {}
    renames: dict[str, str] = {}
    # A scale group's quantizer runs on several tensors (a neck Concat and its inputs): each pair is named and
    # documented after the convs that read that tensor.
    readers_of: dict[tuple[str, str], list[str]] = {}
    conv_readers = {tensor: [n.name for n in graph.node if tensor in n.input and n.op_type == "Conv"]
                    for tensor in (m.output[0] for m in markers)}
    for marker in markers:
        key = node_attribute(marker, "key")
        key = key.decode() if isinstance(key, bytes) else key
        readers_of.setdefault((key, marker.input[0]), []).extend(conv_readers[marker.output[0]])
    for marker in markers:
        key = node_attribute(marker, "key")
        key = key.decode() if isinstance(key, bytes) else key
        if key not in acts:
            raise UserError(None, f"marker for unknown activation quantizer {key!r}")
        act = acts[key]
        source, target = marker.input[0], marker.output[0]
        position = list(graph.node).index(marker)
        graph.node.remove(marker)
        if (key, source) in pairs:
            renames[target] = pairs[key, source]
            continue
        pairs[key, source] = target
        readers = [name for name in act.readers if name in readers_of[key, source]] or act.readers
        base = readers[0] if readers else key
        needs_clip = act.bits < 8 or source not in nonneg
        nodes, inits = act_qdq_nodes(base, source, target, act, needs_clip, taken, readers)
        new_inits += inits
        for offset, new_node in enumerate(nodes):
            graph.node.insert(position + offset, new_node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]

    kept = [init for init in graph.initializer if init.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    _drop_marker_opset(model)
    return model


def act_qdq_nodes(base: str, source: str, target: str, act: ActSpec, needs_clip: bool, taken: set[str],
                  readers: list[str] | None = None):
    """[Clip] -> Q -> DQ for one activation quantizer, reading `source` and producing `target` for `readers`."""
    scale_name = unique_name(f"{base}.input_scale", taken)
    zp_name = unique_name(f"{base}.input_zero_point", taken)
    inits = [numpy_helper.from_array(np.array(act.scale, np.float32), scale_name),
             numpy_helper.from_array(np.array(0, np.int8), zp_name)]
    doc = (f"activation quantizer {act.key}: {act.bits}-bit signed, scale {act.scale:.6g}, "
           f"read by {', '.join(readers or act.readers)}")
    nodes = []
    q_input = source
    if needs_clip:
        low_name = unique_name(f"{base}.input_clip_min", taken)
        high_name = unique_name(f"{base}.input_clip_max", taken)
        bound = np.float32(act.qmax) * np.float32(act.scale)
        inits += [numpy_helper.from_array(np.array(-bound, np.float32), low_name),
                  numpy_helper.from_array(np.array(bound, np.float32), high_name)]
        q_input = unique_name(f"{base}.input_clipped", taken)
        nodes.append(helper.make_node("Clip", [source, low_name, high_name], [q_input],
                                      name=unique_name(f"{base}.input_clip", taken),
                                      doc_string=f"the {act.bits}-bit range [-{act.qmax}, {act.qmax}] of {act.key}"))
    quantized = unique_name(f"{base}.input_quantized", taken)
    nodes.append(helper.make_node(QUANTIZE, [q_input, scale_name, zp_name], [quantized],
                                  name=unique_name(f"{base}.input_q", taken), doc_string=doc))
    nodes.append(helper.make_node(DEQUANTIZE, [quantized, scale_name, zp_name], [target],  # its Q says it all
                                  name=unique_name(f"{base}.input_dq", taken)))
    return nodes, inits


def name_conv_nodes(model: onnx.ModelProto, convs) -> dict[str, onnx.NodeProto]:
    """Find each module's ONNX Conv by its weight initializer (the state_dict key) and name the node after it."""
    index = GraphIndex(model)
    found: dict[str, onnx.NodeProto] = {}
    for node in index.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight.startswith(WRAPPER_PREFIX):
            weight = weight[len(WRAPPER_PREFIX):]
        module = weight[: -len(".weight")] if weight.endswith(".weight") else None
        if module in convs:
            if module in found:
                raise UserError(None, f"two ONNX Conv nodes use the weight of {module}")
            found[module] = node
    missing = [name for name in convs if name not in found]
    if missing:
        raise UserError(None, f"exported graph has no Conv for {missing[:3]} (initializer names were not kept)")
    for name, node in found.items():
        node.name = name
    return found


def _insert_before(graph: onnx.GraphProto, anchor: onnx.NodeProto, new: onnx.NodeProto) -> None:
    position = list(graph.node).index(anchor)
    graph.node.insert(position, new)


def _drop_marker_opset(model: onnx.ModelProto) -> None:
    if any(n.domain == MARKER_DOMAIN for n in model.graph.node):
        raise UserError(None, "activation markers left in the graph")
    kept = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def readable_node_names(model: onnx.ModelProto) -> None:
    """TorchScript scope names ('/model.2/cv1/act/Relu') as dotted paths ('model.2.cv1.act.Relu')."""
    taken = {n.name for n in model.graph.node}
    for node in model.graph.node:
        if node.name.startswith("/"):
            new = node.name.lstrip("/").replace("/", ".")
            if new.startswith(WRAPPER_PREFIX):
                new = new[len(WRAPPER_PREFIX):]
            if new not in taken:
                taken.discard(node.name)
                taken.add(new)
                node.name = new


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weight_dq": 0, "activation_q": 0}
    index = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type == QUANTIZE:
            counts["QuantizeLinear"] += 1
            counts["activation_q"] += 1
        elif node.op_type == DEQUANTIZE:
            counts["DequantizeLinear"] += 1
            if index.is_constant(node.input[0]):
                counts["weight_dq"] += 1
    return counts


def store_int4_weights(model: onnx.ModelProto, convs: dict[str, ConvSpec]) -> list[str]:
    """Weights of layers with <= 4 bits as INT4 initializers (opset >= 21); returns those layers.

    A smaller file only: TensorRT's INT4 is weight-only block quantization for MatMul/GEMM, so engines are built
    from the INT8-container export of the same plan.
    """
    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if version < INT4_OPSET:
        raise UserError(None, f"INT4 initializers need opset >= {INT4_OPSET}, the graph is opset {version}")
    index = GraphIndex(model)
    replaced: dict[str, onnx.TensorProto] = {}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in convs:
            continue
        spec = convs[node.name]
        if spec.weight_bits is None or spec.weight_bits > INT4_MAX_BITS:
            continue
        dq = index.producer.get(node.input[1])
        if dq is None or dq.op_type != DEQUANTIZE:
            raise UserError(None, f"{node.name}: weight is not dequantized from codes")
        codes = index.constant(dq.input[0])
        replaced[dq.input[0]] = int_initializer(dq.input[0], codes, int4=True)
        replaced[dq.input[2]] = int_initializer(dq.input[2], np.zeros(codes.shape[0], np.int8), int4=True)
        layers.append(node.name)
    for i, init in enumerate(model.graph.initializer):
        if init.name in replaced:
            model.graph.initializer[i].CopyFrom(replaced[init.name])
    return layers


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Move the default-domain opset up (INT4 needs 21) with onnx's version converter."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises plain RuntimeError / ConvertError
        raise UserError(None, f"cannot convert the graph from opset {current} to {opset} ({exc})") from None


__all__ = ["write_qdq", "store_int4_weights", "nonnegative_tensors", "qdq_counts", "readable_node_names", "upgrade_opset", "pack_int4",
           "int_initializer", "act_qdq_nodes", "name_conv_nodes"]
