"""`target='cpu'`: the same real values, written in the form ONNX Runtime's integer kernels want.

ONNX Runtime turns `DQ(x), DQ(w) -> Conv -> Q` into QLinearConv, and drops a ReLU in front of a Q whose
zero-point is the type's minimum (u8, zero-point 0). The TensorRT form quantizes conv *inputs* only, so no Q
follows a conv and ORT runs every conv in float, with a dequantize in front. This pass re-encodes:

1. Conv output pairs. When everything a conv's (ReLU'd) output reaches, through ops a per-tensor quantizer
   commutes with (Concat, MaxPool, nearest Resize), is quantized by one quantizer (one scale, one range),
   quantizing right after the conv gives the same codes: Q(maxpool(x)) == maxpool(Q(x)), Q(concat) == concat(Q).
   The pair goes there: u8 zero-point 0 after a ReLU (ORT then drops the ReLU), else u8 zero-point 128.
2. Code ranges. The trained quantizer is narrow ([-qmax, qmax]); a `Clip` on the integer codes (Brevitas'
   QCDQ form) keeps u8 codes inside it, so u8 code == s8 code (zero-point 0) or s8 code + 128.
3. Every other activation pair: s8 zero-point 0 -> u8 zero-point 128 (identical values; ORT does this itself).
4. Weights of convs ORT will still run in float are stored dequantized (float32(code) * scale, the exact
   value DequantizeLinear computes), so no DequantizeLinear runs on every inference.
5. Code clips that provably never act are dropped: a Clip node costs as much as a small QLinearConv in ORT, and
   behind a Concat, MaxPool or nearest Resize of tensors already clipped to the same range (same scale and
   zero-point) the codes cannot leave that range. `code_ranges` proves it by interval arithmetic.

The only numeric change is inside ORT: QLinearConv rounds the float bias to int32 at scale s_in * s_w and
requantizes with its own rounding, so a code can move by one step. The parity gate measures it against the
same budget as the TensorRT form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ghost_deploy.export.onnx_qdq import nonnegative_tensors
from ghost_deploy.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, node_attribute, readable_tensor_name, unique_name

# Ops a per-tensor symmetric quantizer commutes with exactly (they select or take maxima, and rounding and
# clamping are monotone): Q(op(x)) == op(Q(x)) for one shared scale. Nearest Resize is checked separately.
_COMMUTING = ("Concat", "MaxPool", "Identity")

# A conv reading fewer channels than this stays in float on small outputs. MLAS's float NCHWc path has a kernel
# for a stem conv on a 4-channel RGB+IR image: measured with ORT on the 2-core dev machine (ghost-p, 128 px
# input, 128x128 output), model.0 took 405 us as QLinearConv and 185 us as a float Conv, and the demo's CPU
# form ran 1.146x vs 1.032x ORT FP32 with an integer vs a float stem. On large outputs the integer conv wins:
# ghost-s-vedai at 512 px (512x512 output), the whole CPU form ran 0.425x ORT FP32 with an integer stem vs
# 0.439x with a float one (interleaved, 1 thread; docs/results.md 0.5.0). The crossover lies between those two
# measured sizes; it is put at 256x256 output positions.
MIN_INTEGER_CONV_CHANNELS = 8
INTEGER_STEM_MIN_POSITIONS = 256 * 256


@dataclass
class ActPair:
    quantize: onnx.NodeProto
    dequantize: onnx.NodeProto
    clip: onnx.NodeProto | None  # the float range clip in front of the Q (fewer bits, or maybe-negative input)
    scale: float
    qmax: int

    @property
    def source(self) -> str:
        return (self.clip or self.quantize).input[0]

    def key(self) -> tuple[float, int]:
        return (self.scale, self.qmax)


@dataclass
class CpuFormSummary:
    integer_convs: list[str] = field(default_factory=list)  # convs that got an output Q (QLinearConv in ORT)
    float_convs: list[str] = field(default_factory=list)  # quantized convs ORT runs in float (weights dequantized)
    reencoded_pairs: int = 0
    integer_concat_inputs: int = 0  # float tensors quantized before a Concat so the Concat runs on integers
    dropped_code_clips: list[str] = field(default_factory=list)  # clips whose input codes never leave their range
    float_stem_convs: list[str] = field(default_factory=list)  # too few input channels for the integer kernels

    def to_dict(self) -> dict:
        return {"integer_convs": list(self.integer_convs), "float_convs": list(self.float_convs),
                "reencoded_pairs": self.reencoded_pairs, "integer_concat_inputs": self.integer_concat_inputs,
                "dropped_code_clips": list(self.dropped_code_clips), "float_stem_convs": list(self.float_stem_convs)}


def _activation_pairs(index: GraphIndex) -> dict[str, ActPair]:
    """Activation Q -> DQ pairs keyed by the Q node's name."""
    pairs = {}
    for node in index.graph.node:
        if node.op_type != QUANTIZE or index.is_constant(node.input[0]):
            continue
        users = index.users(node.output[0])
        if len(users) != 1 or users[0].op_type != DEQUANTIZE:
            continue
        scale = float(index.constant(node.input[1]))
        clip = index.producer.get(node.input[0])
        qmax = 127
        if clip is not None and clip.op_type == "Clip" and len(index.users(clip.output[0])) == 1 \
                and len(clip.input) > 2 and index.is_constant(clip.input[2]):
            qmax = int(round(float(index.constant(clip.input[2])) / scale))
        else:
            clip = None
        pairs[node.name] = ActPair(node, users[0], clip, scale, qmax)
    return pairs


def _terminals(index: GraphIndex, tensor: str, by_source: dict[str, list[ActPair]]) -> list[ActPair] | None:
    """Pairs reached from `tensor` through commuting ops only, or None if anything else reads it."""
    found: list[ActPair] = []
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in index.graph_outputs:
            return None
        pairs_here = by_source.get(current, [])
        pair_heads = {(p.clip or p.quantize).output[0] for p in pairs_here}
        found += pairs_here
        for user in index.users(current):
            if user.output[0] in pair_heads:
                continue
            if user.op_type in _COMMUTING or (user.op_type == "Resize" and node_attribute(user, "mode", b"nearest")
                                              in (b"nearest", "nearest") and user.input[0] == current):
                stack.append(user.output[0])
            else:
                return None
    return found or None


def _conv_output(index: GraphIndex, conv: onnx.NodeProto) -> tuple[str, bool]:
    """The tensor a conv block hands on (after its ReLU, if the conv feeds only a ReLU) and whether it is >= 0."""
    users = index.users(conv.output[0])
    if len(users) == 1 and users[0].op_type == "Relu" and conv.output[0] not in index.graph_outputs:
        return users[0].output[0], True
    return conv.output[0], False


def _is_quantized_conv(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    data, weight = index.producer.get(node.input[0]), index.producer.get(node.input[1])
    return (data is not None and data.op_type == DEQUANTIZE and weight is not None and weight.op_type == DEQUANTIZE
            and index.is_constant(weight.input[0]))


def _quantize_concat_inputs(graph, index, by_source, nonneg, taken, new_inits, rewire, insertions, quantized_at,
                            summary) -> None:
    # Concats whose result is quantized by one quantizer: quantize every input too (the same commuting
    # argument), so ORT runs QLinearConcat instead of leaving the integer domain around a float Concat.
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        keys = {p.key() for p in (_terminals(index, concat.output[0], by_source) or [])}
        if len(keys) != 1:
            continue
        scale, qmax = next(iter(keys))
        for tensor in dict.fromkeys(concat.input):
            producer = index.producer.get(tensor)
            if tensor in quantized_at or (producer is not None and producer.op_type == DEQUANTIZE):
                continue
            if {p.key() for p in (_terminals(index, tensor, by_source) or [])} != keys or by_source.get(tensor):
                continue
            nodes, inits, out_name = _u8_pair(f"{readable_tensor_name(tensor)}.output", tensor, scale, qmax, tensor in nonneg, taken)
            new_inits += inits
            rewire.setdefault(tensor, out_name)
            insertions.append((tensor, nodes))
            quantized_at.add(tensor)
            summary.integer_concat_inputs += 1


def _apply_rewires(graph, index, insertions, rewire, removed) -> None:
    # readers move to the re-encoded tensors; a new pair's own Q keeps reading the raw tensor it quantizes
    own_output = {nodes[0].output[0]: nodes[-1].output[0] for _, nodes in insertions}
    for node in [*graph.node, *(n for _, nodes in insertions for n in nodes)]:
        if node.output[0] in removed:
            continue
        for i, name in enumerate(node.input):
            if name in rewire and rewire[name] != own_output.get(node.output[0]):
                node.input[i] = rewire[name]
    for tensor, nodes in insertions:
        producer = index.producer.get(tensor)
        position = 0 if producer is None else _position(graph, producer.output[0]) + 1
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)


def to_cpu_form(model: onnx.ModelProto) -> CpuFormSummary:
    """Rewrite the TensorRT-form QDQ graph in place into the ORT-CPU form; see the module docstring."""
    summary = CpuFormSummary()
    index = GraphIndex(model)
    nonneg = nonnegative_tensors(model)
    taken = {n.name for n in model.graph.node} | set(index.producer) | set(index.initializers) | index.graph_inputs
    graph = model.graph
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()  # output tensor names of the nodes to drop
    rewire: dict[str, str] = {}  # old dequantized tensor -> new one
    insertions: list[tuple[str, list[onnx.NodeProto]]] = []  # (tensor after whose producer, nodes)

    output_positions = _spatial_positions(model, {n.output[0] for n in graph.node if n.op_type == "Conv"})
    pairs = _activation_pairs(index)
    by_source: dict[str, list[ActPair]] = {}
    for pair in pairs.values():
        by_source.setdefault(pair.source, []).append(pair)
    handled: set[str] = set()
    quantized_at: set[str] = set()  # tensors that got a new pair
    keep_relu: set[str] = set()  # ReLU outputs of float convs: their pairs must not let ORT drop the ReLU

    def replace(pair: ActPair, out_name: str) -> None:
        rewire[pair.dequantize.output[0]] = out_name
        removed.update(n.output[0] for n in (pair.clip, pair.quantize, pair.dequantize) if n is not None)
        handled.add(pair.quantize.name)

    for conv in [n for n in graph.node if _is_quantized_conv(index, n)]:
        tensor, after_relu = _conv_output(index, conv)
        terminals = _terminals(index, tensor, by_source)
        if after_relu and index.constant(index.producer[conv.input[1]].input[0]).shape[1] < MIN_INTEGER_CONV_CHANNELS \
                and output_positions.get(conv.output[0], 0) < INTEGER_STEM_MIN_POSITIONS:
            # A u8 zero-point 128 after its ReLU keeps the ReLU, so no Q follows the conv and ORT cannot fuse it
            # into QLinearConv. Its weights keep their per-channel DequantizeLinear: ORT (1.20+) re-quantizes
            # float weights per tensor in front of a Q, which would change the model.
            keep_relu.add(tensor)
            summary.float_stem_convs.append(conv.name)
            continue
        if not terminals or len({p.key() for p in terminals}) != 1:
            summary.float_convs.append(conv.name)
            continue
        scale, qmax = terminals[0].key()
        nodes, inits, out_name = _u8_pair(f"{conv.name}.output", tensor, scale, qmax, after_relu or tensor in nonneg, taken)
        new_inits += inits
        direct = [p for p in terminals if p.source == tensor]
        heads = {(p.clip or p.quantize).output[0] for p in direct}
        for user in index.users(tensor):  # readers through commuting ops now read the quantized tensor
            if user.output[0] not in heads:
                rewire.setdefault(tensor, out_name)
        for pair in direct:
            replace(pair, out_name)
        insertions.append((tensor, nodes))
        summary.integer_convs.append(conv.name)
        summary.reencoded_pairs += len(direct)
        quantized_at.add(tensor)

    _quantize_concat_inputs(graph, index, by_source, nonneg, taken, new_inits, rewire, insertions, quantized_at, summary)

    for name, pair in pairs.items():
        if name in handled:
            continue
        base = pair.quantize.name[: -len("_q")] if pair.quantize.name.endswith("_q") else pair.quantize.name
        non_negative = pair.source in nonneg and pair.source not in keep_relu
        nodes, inits, out_name = _u8_pair(f"{base}_u8", pair.source, pair.scale, pair.qmax, non_negative, taken)
        new_inits += inits
        replace(pair, out_name)
        insertions.append((pair.source, nodes))
        summary.reencoded_pairs += 1

    _apply_rewires(graph, index, insertions, rewire, removed)
    _remove_nodes(graph, removed)
    graph.initializer.extend(new_inits)
    _expand_weight_codes(model, set(summary.integer_convs) | set(summary.float_stem_convs))
    _dequantize_float_conv_weights(model, set(summary.float_convs))
    summary.dropped_code_clips = _drop_proven_code_clips(model, {nodes[1].name for _, nodes in insertions})
    _drop_unused_initializers(model)
    del model.graph.value_info[:]  # types of re-encoded tensors changed (s8 -> u8); shape inference redoes them
    return summary


def _spatial_positions(model: onnx.ModelProto, tensors: set[str]) -> dict[str, int]:
    """H * W of each named 4-D tensor whose shape inference knows it (the batch may be symbolic)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    positions = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if info.name in tensors and len(dims) == 4 and dims[2].dim_value and dims[3].dim_value:
            positions[info.name] = dims[2].dim_value * dims[3].dim_value
    return positions


def _position(graph: onnx.GraphProto, output: str) -> int:
    for position, node in enumerate(graph.node):
        if output in node.output:
            return position
    raise KeyError(output)


def code_multiplier(qmax: int) -> int:
    """The largest power of two k with k * qmax <= 127: b-bit codes times k still fit INT8."""
    k = 1
    while 2 * k * qmax <= 127:
        k *= 2
    return k


def _expand_weight_codes(model: onnx.ModelProto, convs: set[str]) -> None:
    """Integer convs: codes * k with scale / k (k a power of two, so both are exact and DQ gives the same float).

    ONNX Runtime rounds a conv's float bias to int32 at scale s_in * s_w; a b-bit layer's s_w is coarse, so the
    bias would move by up to half of a coarse step. With s_w / k the step is k times finer: the same weights,
    a k-times smaller rounding of the bias. TensorRT keeps its bias in float, so the trt form stores the codes.
    """
    index = GraphIndex(model)
    replaced: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in convs:
            continue
        dq = index.producer[node.input[1]]
        codes = index.constant(dq.input[0]).astype(np.int32)
        k = code_multiplier(max(int(np.abs(codes).max()) if codes.size else 0, 1))
        if k == 1 or len(index.users(dq.input[0])) != 1:
            continue
        scale = index.constant(dq.input[1]).astype(np.float32)
        replaced[dq.input[0]] = numpy_helper.from_array((codes * k).astype(np.int8), dq.input[0])
        replaced[dq.input[1]] = numpy_helper.from_array((scale / np.float32(k)).astype(np.float32), dq.input[1])
        dq.doc_string += f" (codes x {k}, scale / {k}: a finer int32 bias step in ONNX Runtime)"
    for position, init in enumerate(model.graph.initializer):
        if init.name in replaced:
            model.graph.initializer[position].CopyFrom(replaced[init.name])


def _u8_pair(base: str, source: str, scale: float, qmax: int, non_negative: bool, taken: set[str]):
    """Q(u8) -> Clip(codes) -> DQ(u8) with the same real values as the trained s8 narrow-range quantizer."""
    zero_point = 0 if non_negative else 128
    low, high = (0, qmax) if non_negative else (128 - qmax, 128 + qmax)
    names = {k: unique_name(f"{base}_{k}", taken) for k in ("scale", "zero_point", "code_min", "code_max")}
    inits = [numpy_helper.from_array(np.array(scale, np.float32), names["scale"]),
             numpy_helper.from_array(np.array(zero_point, np.uint8), names["zero_point"]),
             numpy_helper.from_array(np.array(low, np.uint8), names["code_min"]),
             numpy_helper.from_array(np.array(high, np.uint8), names["code_max"])]
    quantized = unique_name(f"{base}_quantized", taken)
    clipped = unique_name(f"{base}_codes", taken)
    out_name = unique_name(f"{base}_dequantized", taken)
    doc = f"u8 zero-point {zero_point} re-encoding of a signed narrow-range quantizer (scale {scale:.6g}, qmax {qmax})"
    nodes = [helper.make_node(QUANTIZE, [source, names["scale"], names["zero_point"]], [quantized],
                              name=unique_name(f"{base}_q", taken), doc_string=doc),
             helper.make_node("Clip", [quantized, names["code_min"], names["code_max"]], [clipped],
                              name=unique_name(f"{base}_code_clip", taken),
                              doc_string=f"codes kept in the trained range [-{qmax}, {qmax}]"),
             helper.make_node(DEQUANTIZE, [clipped, names["scale"], names["zero_point"]], [out_name],
                              name=unique_name(f"{base}_dq", taken), doc_string=doc)]
    return nodes, inits, out_name


# Slack when turning a real interval back into codes: DequantizeLinear then QuantizeLinear of a code c gives
# c / s * s, which float32 may put a hair off c; any value within this of c still rounds to c.
_CODE_SLACK = 1e-3


def code_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """A proven [low, high] for every activation tensor: codes for integer tensors, real values for float ones.

    Only what is certain: graph inputs are unbounded, a QuantizeLinear saturates to its type, a Clip bounds,
    a DequantizeLinear maps codes to values, Relu clamps at zero, and Concat / MaxPool / nearest Resize /
    Identity cannot leave the range of their inputs. Anything else (convs, adds) is unbounded: interval
    bounds through a conv are far wider than any trained range, so they would prove nothing.
    """
    index = GraphIndex(model)
    unbounded = (-np.inf, np.inf)
    ranges: dict[str, tuple[float, float]] = {}

    def of(name: str) -> tuple[float, float]:
        return ranges.get(name, unbounded)

    for node in model.graph.node:
        op = node.op_type
        if op == QUANTIZE and not index.is_constant(node.input[0]):
            scale = float(index.constant(node.input[1]))
            zero_point = index.constant(node.input[2]) if len(node.input) > 2 else np.uint8(0)
            type_low, type_high = np.iinfo(zero_point.dtype).min, np.iinfo(zero_point.dtype).max
            zero_point = int(zero_point)
            low, high = of(node.input[0])
            # round-half-even(v) lies in [ceil(v - 0.5), floor(v + 0.5)]
            code_low = np.ceil(low / scale - 0.5 - _CODE_SLACK) + zero_point if np.isfinite(low) else type_low
            code_high = np.floor(high / scale + 0.5 + _CODE_SLACK) + zero_point if np.isfinite(high) else type_high
            ranges[node.output[0]] = (float(np.clip(code_low, type_low, type_high)),
                                      float(np.clip(code_high, type_low, type_high)))
        elif op == "Clip" and len(node.input) == 3 and all(index.is_constant(n) for n in node.input[1:]):
            low, high = of(node.input[0])
            ranges[node.output[0]] = (max(low, float(index.constant(node.input[1]))),
                                      min(high, float(index.constant(node.input[2]))))
        elif op == DEQUANTIZE and not index.is_constant(node.input[0]):
            scale = index.constant(node.input[1])
            if scale is None or scale.size != 1:
                continue
            zero_point = float(index.constant(node.input[2])) if len(node.input) > 2 else 0.0
            low, high = of(node.input[0])
            ranges[node.output[0]] = ((low - zero_point) * float(scale), (high - zero_point) * float(scale))
        elif op == "Relu":
            low, high = of(node.input[0])
            ranges[node.output[0]] = (max(low, 0.0), max(high, 0.0))
        elif op == "Concat":
            inputs = [of(name) for name in node.input]
            ranges[node.output[0]] = (min(r[0] for r in inputs), max(r[1] for r in inputs))
        elif op in ("MaxPool", "Identity") or (op == "Resize" and node_attribute(node, "mode", b"nearest")
                                               in (b"nearest", "nearest")):
            ranges[node.output[0]] = of(node.input[0])
    return ranges


def _drop_proven_code_clips(model: onnx.ModelProto, code_clips: set[str]) -> list[str]:
    """Remove the code clips this pass wrote (node names) where `code_ranges` proves the codes already lie inside."""
    index = GraphIndex(model)
    ranges = code_ranges(model)
    dropped, rewire = [], {}
    for node in model.graph.node:
        if node.name not in code_clips:
            continue
        low, high = ranges.get(node.input[0], (-np.inf, np.inf))
        if low >= float(index.constant(node.input[1])) and high <= float(index.constant(node.input[2])):
            rewire[node.output[0]] = node.input[0]
            dropped.append(node.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    _remove_nodes(model.graph, set(rewire))
    return dropped


def _dequantize_float_conv_weights(model: onnx.ModelProto, convs: set[str]) -> None:
    index = GraphIndex(model)
    replaced = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in convs:
            continue
        dq = index.producer[node.input[1]]
        codes = index.constant(dq.input[0]).astype(np.float32)
        scale = index.constant(dq.input[1]).astype(np.float32)
        weight = codes * scale.reshape(-1, *([1] * (codes.ndim - 1)))  # float32(code) * scale, as DQ computes it
        name = f"{node.name}.weight"
        model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
        node.input[1] = name
        if len(index.users(dq.output[0])) == 1:
            replaced.append(dq.output[0])
    _remove_nodes(model.graph, set(replaced))


def _remove_nodes(graph: onnx.GraphProto, outputs: set[str]) -> None:
    """Delete nodes by output name in place (rebuilding the list would copy the messages and orphan references)."""
    for position in range(len(graph.node) - 1, -1, -1):
        if graph.node[position].output[0] in outputs:
            del graph.node[position]


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
