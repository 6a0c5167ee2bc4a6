"""OpenVINO CPU engines (torch-free): the CPU-form ONNX compiled into a blob, and a runner over it.

OpenVINO is a real INT8 compiler: its low-precision transformations fuse Q/DQ pairs into u8/i8 kernels, so the
parity gate run through it checks what a compiler makes of the export, not what an interpreter does. Which export
form it computes right was measured here (docs/engines.md, "Which form for which compiler"): the CPU form
(uint8 activations), not the TensorRT form (signed int8 activations after a Concat come out as two codes).

One graph edit is made before compiling, proven by the parity gate like everything else: a uint8 pair with
zero point 128 right after a ReLU (the CPU form keeps one on the float stem's output so ONNX Runtime cannot
re-quantize the stem's weights) is re-encoded with zero point 0. The values are identical (the input is
non-negative, so its codes were 128..128+qmax and become 0..qmax), and OpenVINO's AVX2 u8 x s8 kernels, which sum
pairs of products in int16, then cannot saturate (255 x 124 x 2 > 32767 did; 127 x 127 x 2 does not).

Facts relied on (measured with OpenVINO 2026.4.1 on this project's machine):
- a compiled blob does not carry its compile properties: `import_model` starts from the plugin defaults, so the
  properties (precision, streams, threads) are passed again at import (`OpenVinoRunner`);
- the CPU blob's header holds the OpenVINO release and the ISA ('meta=1.0;ov=2026.4.1;isa=Intel AVX2'), and
  import refuses a blob whose release or ISA differs from this machine's, so `verify_runtime` checks both;
- `export_model()` returns io.BytesIO (bytes in older releases); `import_model` takes bytes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ghost_deploy.errors import UserError
from ghost_deploy.io import atomic_path, sha256_file
from ghost_deploy.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, unique_name
from ghost_deploy.parity.runners import Runner

DEVICE = "CPU"
MODEL_SUFFIXES = (".onnx", ".xml")  # anything else is read as a compiled blob
RUNTIME_KEYS = {"layer_type": "layerType", "runtime_precision": "runtimePrecision",
                "original_layers": "originalLayersNames"}
NOT_COMPUTE = {"Input", "Output", "Const"}
INT8_PRECISIONS = {"u8", "i8"}
# read back from the compiled model for the receipt: what took effect, not what was asked
REPORTED_PROPERTIES = ("INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT", "PERFORMANCE_HINT", "NUM_STREAMS",
                       "INFERENCE_NUM_THREADS", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "EXECUTION_DEVICES")


class OpenVinoUnavailable(RuntimeError):
    """The openvino Python package is not installed (pip install openvino)."""


def _import_ov():
    try:
        import openvino  # optional: only the openvino-cpu target and the ov-* bench backends need it
    except ImportError as exc:
        raise OpenVinoUnavailable(f"the openvino package is not installed ({exc}); pip install openvino") from None
    return openvino


def openvino_version() -> str | None:
    try:
        return _import_ov().get_version()
    except OpenVinoUnavailable:
        return None


def compile_properties(threads: int | None = None, inference_precision: str | None = "f32") -> dict:
    """The CPU properties of every compile and import.

    f32: CPUs with native bf16 (AMX, avx512_bf16) otherwise run float layers in bf16 by default. One stream and
    the latency hint: one request on one stream, as deployed. Dynamic quantization off: the plugin may otherwise
    quantize float MatMul activations on the fly, a numeric change nobody asked for.
    """
    properties = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    if inference_precision:
        properties["INFERENCE_PRECISION_HINT"] = inference_precision
    if inference_precision == "f32":
        properties["EXECUTION_MODE_HINT"] = "ACCURACY"
    if threads:
        properties["INFERENCE_NUM_THREADS"] = str(int(threads))
    return properties


def _property_text(value) -> str:
    if hasattr(value, "get_type_name"):  # ov.Type -> 'f32'
        return value.get_type_name()
    return value.name if hasattr(value, "name") and not isinstance(value, str) else str(value)


def _static_shapes(model, batch: int, path) -> dict[str, list[int]]:
    """{input: static shape}: a dynamic batch becomes `batch`; any other dynamic dimension is refused."""
    shapes = {}
    for port in model.inputs:
        dims = port.get_partial_shape()
        shape = []
        for axis, dim in enumerate(dims):
            if dim.is_static:
                shape.append(dim.get_length())
            elif axis == 0:
                shape.append(int(batch))
            else:
                raise UserError(path, f"input '{port.get_any_name()}' has a dynamic dimension {axis}; export with a "
                                      "fixed image size")
        shapes[port.get_any_name()] = shape
    return shapes


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU behind the runner interface.

    `path`: an ONNX (compiled here, a dynamic batch fixed to `batch`) or a blob from `compile_engine` (imported
    with the same properties, which a blob does not keep).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, inference_precision: str | None = "f32",
                 batch: int = 1, model: onnx.ModelProto | None = None):
        ov = _import_ov()
        self.path = Path(path)
        if model is None and not self.path.is_file():
            raise UserError(self.path, "file not found")
        self.properties = compile_properties(threads, inference_precision)
        self.core = ov.Core()
        try:
            if model is not None or self.path.suffix.lower() in MODEL_SUFFIXES:
                source = self.path if model is None else model.SerializeToString()
                read = self.core.read_model(str(source)) if model is None else self.core.read_model(source, b"")
                self.input_shapes = _static_shapes(read, batch, self.path)
                read.reshape(self.input_shapes)
                self.compiled = self.core.compile_model(read, DEVICE, self.properties)
            else:
                self.compiled = self.core.import_model(self.path.read_bytes(), DEVICE, self.properties)
                self.input_shapes = {p.get_any_name(): list(p.get_shape()) for p in self.compiled.inputs}
        except RuntimeError as exc:  # OpenVINO raises RuntimeError subclasses with multi-line text
            lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "Exception from" not in line]
            raise UserError(self.path, f"OpenVINO cannot load it ({' '.join(lines[:2])})") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise UserError(self.path, f"inputs {missing} not provided (got {sorted(feed)})")
        batch = {len(feed[name]) for name in self.input_names}
        compiled_batch = {shape[0] for shape in self.input_shapes.values()}
        if len(batch) == 1 and batch != compiled_batch and compiled_batch == {1}:
            return _stack([self.infer({n: feed[n][i:i + 1] for n in self.input_names}) for i in range(batch.pop())])
        inputs = {}
        for port, name in zip(self.compiled.inputs, self.input_names):
            array = np.ascontiguousarray(feed[name], dtype=port.get_element_type().to_dtype())
            if list(array.shape) != self.input_shapes[name]:
                raise UserError(self.path, f"input '{name}' has shape {list(array.shape)}; the engine is compiled for "
                                           f"{self.input_shapes[name]}")
            inputs[name] = array
        self.request.infer(inputs)
        # copied: the request reuses its output buffers on the next call
        return {name: self.request.get_tensor(port).data.copy()
                for port, name in zip(self.compiled.outputs, self.output_names)}

    def properties_in_effect(self) -> dict[str, str]:
        supported = self.compiled.get_property("SUPPORTED_PROPERTIES")
        return {key: _property_text(self.compiled.get_property(key)) for key in REPORTED_PROPERTIES if key in supported}

    def runtime_layers(self) -> list[dict]:
        """Every node of the executed graph: its type, the precision it ran in, the ONNX nodes it absorbed."""
        layers = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layers.append({"name": op.get_friendly_name(),
                           **{key: info[rt].astype(str) if rt in info else None for key, rt in RUNTIME_KEYS.items()}})
        return layers

    def close(self) -> None:
        self.request = self.compiled = self.core = None


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def precision_counts(layers: list[dict]) -> dict:
    """How many compute layers, and how many convolutions, ran in int8 and in f32."""
    compute = [layer for layer in layers if layer["layer_type"] not in NOT_COMPUTE]
    convs = [layer for layer in compute if layer["layer_type"] in ("Convolution", "GroupConvolution")]
    return {"compute_layers": len(compute),
            "int8_layers": sum(layer["runtime_precision"] in INT8_PRECISIONS for layer in compute),
            "conv_int8": sum(layer["runtime_precision"] in INT8_PRECISIONS for layer in convs),
            "conv_float": [layer["name"] for layer in convs if layer["runtime_precision"] not in INT8_PRECISIONS]}


def openvino_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The module doc's one edit: uint8 zero-point-128 pairs right after a ReLU re-encoded with zero point 0."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    index = GraphIndex(model)
    taken = set(index.producer) | set(index.initializers) | {n.name for n in model.graph.node}
    zero = unique_name("openvino_u8_zero_point", taken)
    rewritten = []
    for node in [n for n in model.graph.node if n.op_type == QUANTIZE and len(n.input) > 2]:
        zero_point = index.constant(node.input[2])
        producer = index.producer.get(node.input[0])
        if zero_point is None or zero_point.dtype != np.uint8 or int(zero_point) != 128 \
                or producer is None or producer.op_type != "Relu":
            continue
        readers = index.users(node.output[0])
        if not readers or any(r.op_type != DEQUANTIZE for r in readers):
            continue  # a code Clip between Q and DQ would need its bounds shifted too: left as written
        for reader in [node, *readers]:
            reader.input[2] = zero
        rewritten.append(node.name)
    if rewritten:
        model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zero))
    return model, rewritten


def open_onnx(onnx_path, threads: int | None = None, *, inference_precision: str | None = "f32",
              batch: int = 1) -> tuple[OpenVinoRunner, list[str]]:
    """A runner over `onnx_path` compiled in its OpenVINO form (`openvino_form`), and the pairs the edit re-encoded."""
    form, rewritten = openvino_form(onnx.load(str(onnx_path)))
    return OpenVinoRunner(onnx_path, threads, inference_precision=inference_precision, batch=batch, model=form), rewritten


def compile_engine(onnx_path, engine_path, *, threads: int | None = None, inference_precision: str = "f32",
                   batch: int = 1) -> dict:
    """Compile `onnx_path` (in its OpenVINO form) for this CPU, write the blob atomically, return the build facts."""
    ov = _import_ov()
    started = time.perf_counter()
    runner, rewritten = open_onnx(onnx_path, threads, inference_precision=inference_precision, batch=batch)
    build_seconds = time.perf_counter() - started
    exported = runner.compiled.export_model()
    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported))
    layers = runner.runtime_layers()
    facts = {"runtime": "openvino", "openvino_version": ov.get_version(), "device": DEVICE,
             "device_name": runner.core.get_property(DEVICE, "FULL_DEVICE_NAME"),
             "runtime_requirements": _runtime_requirements(runner.compiled),
             "compile_properties": runner.properties_in_effect(), "inference_precision": inference_precision,
             "threads": threads, "input_shapes": runner.input_shapes, "layers": layers,
             "precision_counts": precision_counts(layers), "graph_edits": {"zero_point_0_after_relu": rewritten},
             "build_seconds": round(build_seconds, 3), "engine_path": str(engine_path),
             "engine_sha256": sha256_file(engine_path)}
    runner.close()
    return facts


def load_engine(engine_path, threads: int | None = None, *, inference_precision: str | None = "f32") -> OpenVinoRunner:
    """A blob from `compile_engine`, imported with the properties it was built with."""
    return OpenVinoRunner(engine_path, threads, inference_precision=inference_precision)


def _runtime_requirements(compiled) -> str | None:
    try:  # the string the CPU plugin writes into the blob header and checks at import (2026.x)
        return str(compiled.get_property("RUNTIME_REQUIREMENTS"))
    except Exception:  # older releases: no such property
        return None


def environment() -> dict:
    """This machine as OpenVINO sees it; None values when openvino is absent."""
    try:
        ov = _import_ov()
    except OpenVinoUnavailable:
        return {"openvino_version": None, "device_name": None, "runtime_requirements": None}
    import openvino.opset13 as ops  # optional, with openvino

    core = ov.Core()
    parameter = ops.parameter([1], np.float32)
    probe = core.compile_model(ov.Model([ops.relu(parameter)], [parameter]), DEVICE)  # the header this CPU writes
    return {"openvino_version": ov.get_version(), "device_name": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
            "optimization_capabilities": list(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")),
            "runtime_requirements": _runtime_requirements(probe)}


def _release(version: str | None) -> str | None:
    return version.split("-")[0] if version else None  # '2026.4.1-22982-e213...' -> '2026.4.1'


def verify_runtime(build: dict, env: dict | None = None) -> list[str]:
    """Problems that would stop the blob from importing here ([] = fine): the release and the ISA in its header."""
    env = environment() if env is None else env
    built, have = build.get("openvino_version"), env.get("openvino_version")
    if have is None:
        return [f"OpenVINO is not installed here; the engine needs OpenVINO {_release(built)}"]
    if _release(built) != _release(have):
        return [f"engine built with OpenVINO {_release(built)}, this machine has {_release(have)}; compiled blobs "
                "import only into the same release: rebuild from the ONNX here"]
    built_isa, have_isa = build.get("runtime_requirements"), env.get("runtime_requirements")
    if built_isa and have_isa and built_isa != have_isa:
        return [f"engine blob requires '{built_isa}', this CPU provides '{have_isa}' (another instruction set): "
                "rebuild from the ONNX here"]
    return []
