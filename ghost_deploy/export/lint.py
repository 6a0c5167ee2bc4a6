"""TensorRT explicit-quantization lint for a Q/DQ ONNX (rules of TensorRT 10.x and 11.x).

Each rule comes from NVIDIA's documentation or the onnx-tensorrt parser (see docs/export.md):
- `qdq-type`: Q/DQ of activations must be signed INT8 (UINT8 only as network I/O; no INT8 asymmetry).
- `zero-point`: every zero-point must be 0 (TensorRT is symmetric; the parser rejects others).
- `scale`: scales are float32, finite and > 0.
- `weight-axis`: per-channel weight DQ uses axis 0 (K of KCRS) with one scale per output channel.
- `weight-constant`: a per-channel DQ must be rooted at a constant (TensorRT: weights only).
- `per-tensor-activation`: activations are quantized per tensor (scalar scale).
- `pair`: a Q on an activation is followed by a DQ with the same scale and zero-point.
- `conv-inputs`: quantize both inputs of a weighted op, or TensorRT cannot run it in INT8.
- `epilogue`: no Q/DQ between a Conv and its BN / activation / residual Add (stops Conv+BN+ReLU+Add fusion).
- `concat-scales` (warning): quantized Concat inputs share one scale (else TensorRT requantizes every input).
- `pad-conv`: nothing between Pad and Conv (TensorRT fuses the Pad into the conv only when adjacent).
- `int4-conv`: TensorRT INT4 is weight-only block quantization for MatMul/GEMM; an INT4 conv weight does
  not build as INT4 (a warning: such a file is for storage, engines use the INT8 export).
- `residual-add`, `batchnorm`: fusion hints (warnings).
Violations are `error`s (the engine would not build, or would silently run other numerics); hints that only
cost speed are `warning`s. Every finding names the node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto

from ghost_deploy.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, node_attribute

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
EPILOGUE_OPS = ("BatchNormalization", "Relu", "Clip", "Sigmoid", "Mul", "Add", "LeakyRelu", "HardSigmoid")
SIGNED_8 = (TensorProto.INT8,)
WEIGHT_TYPES = (TensorProto.INT8, TensorProto.INT4)
MIN_OPSET = 13  # per-channel `axis` on Q/DQ
INT4_OPSET = 21


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "error" | "warning"
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity} [{self.rule}] {self.node}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


def lint_qdq(model: onnx.ModelProto) -> list[Finding]:
    """All rule violations of `model`, errors first, each naming the node."""
    index = GraphIndex(model)
    findings: list[Finding] = []
    findings += _check_opset(model)
    for node in index.graph.node:
        if node.op_type in (QUANTIZE, DEQUANTIZE):
            findings += _check_qdq_node(index, node)
        elif node.op_type in WEIGHTED_OPS:
            findings += _check_weighted(index, node)
        elif node.op_type == "Concat":
            findings += _check_concat(index, node)
        elif node.op_type == "Pad":
            findings += _check_pad(index, node)
        elif node.op_type == "Add":
            findings += _check_residual_add(index, node)
        elif node.op_type == "BatchNormalization":
            findings.append(Finding("batchnorm", "warning", _name(node),
                                    "BatchNormalization left in the graph: fold it into the conv before export"))
    return sorted(findings, key=lambda f: (f.severity != "error", f.rule, f.node))


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _check_opset(model: onnx.ModelProto) -> list[Finding]:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        return [Finding("opset", "error", "<model>", f"opset {version} < {MIN_OPSET}: per-channel Q/DQ needs opset >= 13")]
    return []


def _qdq_params(index: GraphIndex, node: onnx.NodeProto):
    scale = index.constant(node.input[1]) if len(node.input) > 1 else None
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zero_point = index.constant(zp_name) if zp_name else None
    zp_type = index.constant_dtype(zp_name) if zp_name else None
    return scale, zero_point, zp_type


def _quantized_type(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """The integer type a Q produces or a DQ consumes."""
    _, _, zp_type = _qdq_params(index, node)
    if zp_type is not None:
        return zp_type
    if node.op_type == DEQUANTIZE and index.is_constant(node.input[0]):
        return index.constant_dtype(node.input[0])
    if node.op_type == QUANTIZE:
        output_dtype = node_attribute(node, "output_dtype", 0)
        return output_dtype or TensorProto.UINT8  # ONNX default for Q without a zero-point
    return None


def _check_qdq_node(index: GraphIndex, node: onnx.NodeProto) -> list[Finding]:
    out: list[Finding] = []
    name = _name(node)
    scale, zero_point, _ = _qdq_params(index, node)
    on_weight = node.op_type == DEQUANTIZE and index.is_constant(node.input[0])
    qtype = _quantized_type(index, node)
    allowed = WEIGHT_TYPES if on_weight else SIGNED_8
    if qtype is not None and qtype not in allowed:
        kind = "weights" if on_weight else "activations"
        out.append(Finding("qdq-type", "error", name, f"{onnx.helper.tensor_dtype_to_string(qtype)} {kind}: "
                                                      f"TensorRT needs signed INT8{' (or INT4)' if on_weight else ''}"))
    if scale is None:
        out.append(Finding("scale", "error", name, "scale is not a constant"))
    else:
        scale_type = index.constant_dtype(node.input[1])
        if scale_type != TensorProto.FLOAT:
            out.append(Finding("scale", "error", name, f"scale is {onnx.helper.tensor_dtype_to_string(scale_type)}, "
                                                      "keep scales float32 (other types change the DQ output type)"))
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            out.append(Finding("scale", "error", name, "scale must be finite and > 0"))
    if zero_point is not None and np.any(zero_point.astype(np.int64) != 0):
        values = sorted(set(np.unique(zero_point.astype(np.int64)).tolist()))[:4]
        out.append(Finding("zero-point", "error", name, f"zero-point {values} is not 0: TensorRT quantization is "
                                                        "symmetric (asymmetric Q/DQ does not parse)"))
    if node.input[2:3] and node.input[2] and zero_point is None:
        out.append(Finding("zero-point", "error", name, "zero-point must be a build-time constant"))
    block_size = node_attribute(node, "block_size", 0)
    if scale is not None and np.ndim(scale) > 0 and scale.size > 1:
        axis = node_attribute(node, "axis", 1)
        if not index.is_constant(node.input[0]):
            out.append(Finding("per-tensor-activation", "error", name,
                               f"per-channel scale ({scale.size} values) on an activation: TensorRT quantizes "
                               "activations per tensor and only constants (weights) per channel"))
        elif not block_size:
            out += _check_weight_axis(index, node, axis, scale)
    if node.op_type == QUANTIZE and not index.is_constant(node.input[0]):
        out += _check_pair(index, node, scale, zero_point)
    if node.op_type == DEQUANTIZE and not on_weight:
        source = index.producer.get(node.input[0])
        if source is None or source.op_type != QUANTIZE:
            out.append(Finding("pair", "error", name, "activation DequantizeLinear is not fed by a QuantizeLinear"))
    return out


def _check_weight_axis(index, node, axis, scale) -> list[Finding]:
    out = []
    for user in index.users(node.output[0]):
        if user.op_type in ("Conv", "ConvTranspose") and len(user.input) > 1 and user.input[1] == node.output[0]:
            weight = index.constant(node.input[0])
            rank = weight.ndim if weight is not None else 4
            if axis not in (0, -rank):
                out.append(Finding("weight-axis", "error", _name(node),
                                   f"per-channel axis {axis} on the weight of {_name(user)}: TensorRT needs axis 0 "
                                   "(K of KCRS for Conv, the input channels for ConvTranspose)"))
            elif weight is not None and weight.shape[0] != scale.size:
                out.append(Finding("weight-axis", "error", _name(node),
                                   f"{scale.size} scales for {weight.shape[0]} channels on axis 0"))
    return out


def _check_pair(index, node, scale, zero_point) -> list[Finding]:
    users = index.users(node.output[0])
    if not users:
        return [Finding("pair", "error", _name(node), "QuantizeLinear output is unused")]
    out = []
    for user in users:
        if user.op_type != DEQUANTIZE:
            # Brevitas-style code clamps (Q -> Clip -> DQ) are not TensorRT Q/DQ
            out.append(Finding("pair", "error", _name(node), f"QuantizeLinear feeds {user.op_type} {_name(user)}; "
                                                             "TensorRT expects Q -> DQ"))
            continue
        user_scale, user_zp, _ = _qdq_params(index, user)
        if scale is not None and user_scale is not None and not np.array_equal(scale, user_scale):
            out.append(Finding("pair", "warning", _name(user), f"DQ scale {user_scale} differs from its Q "
                                                               f"{_name(node)} ({scale}): a requantization"))
    return out


def _through_dq(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    node = index.producer.get(tensor)
    return node if node is not None and node.op_type == DEQUANTIZE else None


def _check_weighted(index: GraphIndex, node: onnx.NodeProto) -> list[Finding]:
    out: list[Finding] = []
    name = _name(node)
    if len(node.input) < 2:
        return out
    data_dq, weight_dq = _through_dq(index, node.input[0]), _through_dq(index, node.input[1])
    if weight_dq is not None and not index.is_constant(weight_dq.input[0]):
        out.append(Finding("weight-constant", "error", _name(weight_dq),
                           f"weight DQ of {name} is not rooted at a constant (initializer)"))
    if weight_dq is not None and data_dq is None:
        out.append(Finding("conv-inputs", "error", name, "weight is quantized but the data input is float: "
                                                         "TensorRT runs a weighted op in INT8 only when both inputs are Q/DQ"))
    elif data_dq is not None and weight_dq is None and index.is_constant(node.input[1]):
        out.append(Finding("conv-inputs", "warning", name, "data input is quantized but the weight is float: "
                                                           "the layer runs in float"))
    if weight_dq is not None and node.op_type in ("Conv", "ConvTranspose"):
        if index.constant_dtype(weight_dq.input[0]) == TensorProto.INT4:
            out.append(Finding("int4-conv", "warning", name,
                               "INT4 conv weight: TensorRT INT4 is weight-only block quantization for MatMul/GEMM; "
                               "build engines from the INT8-container export of the same plan"))
    out += _check_epilogue(index, node)
    return out


def _check_epilogue(index: GraphIndex, conv: onnx.NodeProto) -> list[Finding]:
    """A Q/DQ pair right after a Conv whose result then goes through BN/activation/Add splits the fusion."""
    out = []
    for q in index.users(conv.output[0]):
        if q.op_type != QUANTIZE:
            continue
        for dq in index.users(q.output[0]):
            if dq.op_type != DEQUANTIZE:
                continue
            for user in index.users(dq.output[0]):
                if user.op_type in EPILOGUE_OPS:
                    out.append(Finding("epilogue", "error", _name(q),
                                       f"Q/DQ between {_name(conv)} and its {user.op_type} {_name(user)}: TensorRT "
                                       "cannot fuse Conv+BN+activation+Add across it (quantize after the epilogue)"))
    return out


def _check_concat(index: GraphIndex, node: onnx.NodeProto) -> list[Finding]:
    dqs = [_through_dq(index, tensor) for tensor in node.input]
    quantized = [dq for dq in dqs if dq is not None]
    if not quantized:
        return []
    name = _name(node)
    if len(quantized) != len(dqs):
        floats = [t for t, dq in zip(node.input, dqs) if dq is None]
        return [Finding("concat-scales", "warning", name, f"mixes quantized and float inputs (float: {floats}); "
                                                          "TensorRT keeps the concat in float")]
    params = []
    for dq in quantized:
        scale, zero_point, _ = _qdq_params(index, dq)
        params.append((None if scale is None else np.asarray(scale).ravel().tolist(),
                       None if zero_point is None else np.asarray(zero_point).ravel().tolist()))
    if len({repr(p) for p in params}) > 1:
        detail = ", ".join(f"{_name(dq)}={p[0]}" for dq, p in zip(quantized, params))
        # A cost, not an error: TensorRT requantizes each input to one scale before the concat (NVIDIA's
        # yolo_deepstream QAT guide measured 180 vs 207 qps for separate vs shared scales)
        return [Finding("concat-scales", "warning", name, f"quantized inputs have different scales ({detail}): "
                                                          "TensorRT requantizes every input to one scale (slower, not "
                                                          "wrong); share one scale across a concat")]
    return []


def _check_pad(index: GraphIndex, node: onnx.NodeProto) -> list[Finding]:
    out = []
    for user in index.users(node.output[0]):
        if user.op_type in ("Conv", "ConvTranspose"):
            continue
        chain, current = [user], user
        # follow a short single-consumer chain to see whether it ends in a conv
        while current.output and len(index.users(current.output[0])) == 1 and len(chain) < 4:
            current = index.users(current.output[0])[0]
            if current.op_type in ("Conv", "ConvTranspose"):
                between = " -> ".join(f"{n.op_type} {_name(n)}" for n in chain)
                out.append(Finding("pad-conv", "error", _name(node),
                                   f"{between} sits between Pad and {_name(current)}: put Q/DQ before the Pad so "
                                   "TensorRT can fuse the padding into the conv"))
                break
            chain.append(current)
    return out


def _check_residual_add(index: GraphIndex, node: onnx.NodeProto) -> list[Finding]:
    """Conv (+activation) + float residual: TensorRT fuses the Add in INT8 only if the residual is Q/DQ."""
    from_conv, others = [], []
    for tensor in node.input:
        producer = index.producer.get(tensor)
        if producer is not None and producer.op_type in ("Relu", "Clip", "Sigmoid", "LeakyRelu"):
            producer = index.producer.get(producer.input[0])
        if producer is not None and producer.op_type == "Conv":
            from_conv.append(tensor)
        else:
            others.append(tensor)
    if from_conv and others and all(_through_dq(index, t) is None and not index.is_constant(t) for t in others):
        return [Finding("residual-add", "warning", _name(node),
                        "residual input is float: TensorRT cannot fuse this Add into the conv in INT8 "
                        "(quantize the skip branch)")]
    return []
