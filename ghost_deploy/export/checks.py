"""Checks run on every export: the trained bits survive, and the simplifier left the quantization alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ghost_deploy.export.torch_graph import ConvSpec
from ghost_deploy.onnx_graph import DEQUANTIZE, QDQ_OPS, GraphIndex, node_attribute


def bits_preserved(model: onnx.ModelProto, convs: dict[str, ConvSpec]) -> list[dict]:
    """Per quantized conv: container type, codes in the b-bit range, codes equal to the trained quantizer's.

    The weight is read back from the ONNX: an integer initializer behind the conv's DequantizeLinear, or (CPU
    form, convs ORT runs in float) a float initializer that must equal float32(code) * scale exactly.
    """
    index = GraphIndex(model)
    nodes = {node.name: node for node in model.graph.node if node.op_type == "Conv"}
    rows = []
    for name, spec in convs.items():
        row = {"layer": name, "weight_bits": spec.weight_bits, "act_bits": None, "container": "FP32",
               "codes_in_range": None, "codes_equal_trained": None, "status": "float weights"}
        if spec.weight_bits is None:
            rows.append(row)
            continue
        node = nodes.get(name)
        if node is None:
            rows.append({**row, "status": "MISSING: no Conv node of this name"})
            continue
        codes, container = _codes_of(index, node, spec)
        row["container"] = container
        if codes is None:
            rows.append({**row, "status": "MISSING: weight is neither codes nor exact dequantized codes"})
            continue
        qmax = 2 ** (spec.weight_bits - 1) - 1
        in_range = bool(codes.size == 0 or (codes.min() >= -qmax and codes.max() <= qmax))
        equal = bool(codes.shape == spec.expected_codes.shape and np.array_equal(codes, spec.expected_codes))
        row.update(codes_in_range=in_range, codes_equal_trained=equal)
        row["status"] = "bits preserved" if in_range and equal else (
            f"FAILED: codes outside [-{qmax}, {qmax}]" if not in_range else "FAILED: codes differ from the trained codes")
        rows.append(row)
    return rows


def _codes_of(index: GraphIndex, node: onnx.NodeProto, spec: ConvSpec):
    weight = node.input[1]
    producer = index.producer.get(weight)
    if producer is not None and producer.op_type == DEQUANTIZE and index.is_constant(producer.input[0]):
        dtype = index.constant_dtype(producer.input[0])
        codes = index.constant(producer.input[0]).astype(np.int64)
        scale = index.constant(producer.input[1])
        container = {TensorProto.INT8: "INT8", TensorProto.INT4: "INT4"}.get(dtype, str(dtype))
        if scale is None or scale.shape != spec.weight_scale.shape:
            return None, container
        scale = scale.astype(np.float32)
        if np.array_equal(scale, spec.weight_scale):
            return codes, container
        # CPU form: codes x k with scale / k, k a power of two (exact in float32), see cpu_form.py
        multiplier = float(spec.weight_scale[0] / scale[0])
        k = int(round(multiplier))
        if k < 2 or k & (k - 1) or not np.array_equal(scale * np.float32(k), spec.weight_scale) or np.any(codes % k):
            return None, container
        return codes // k, f"{container} (codes x {k})"
    value = index.constant(weight)
    if value is None:
        return None, "?"
    expected = spec.codes.astype(np.float32) * spec.weight_scale.reshape(-1, 1, 1, 1)
    if value.dtype != np.float32 or not np.array_equal(value, expected):
        return None, "FP32"
    return spec.codes.astype(np.int64), "FP32 (= codes x scale)"


def quantization_signature(model: onnx.ModelProto) -> dict[str, tuple]:
    """Per Q/DQ node: op, integer type, scale and zero-point values, axis: what a simplifier must not change."""
    index = GraphIndex(model)
    signature = {}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        scale = index.constant(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero_point = index.constant(zp_name) if zp_name else None
        weight = index.constant(node.input[0]) if node.op_type == DEQUANTIZE else None
        signature[node.name] = (
            node.op_type,
            index.constant_dtype(zp_name) if zp_name else None,
            index.constant_dtype(node.input[0]) if node.op_type == DEQUANTIZE else None,
            None if scale is None else np.asarray(scale).tobytes(),
            None if zero_point is None else np.asarray(zero_point).tobytes(),
            None if weight is None else weight.tobytes(),
            node_attribute(node, "axis", 1),
        )
    return signature


def signature_changes(before: dict, after: dict) -> list[str]:
    problems = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            problems.append(f"{name} removed")
        elif name not in before:
            problems.append(f"{name} added")
        elif before[name] != after[name]:
            problems.append(f"{name} changed")
    return problems
