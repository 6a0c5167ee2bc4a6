"""TensorRT engine build and run: the only module that imports `tensorrt` (always inside functions).

Two TensorRT worlds (docs/engines.md):
- 10.x (JetPack 6): a Q/DQ ONNX is built weakly typed with INT8+FP16 flags (NVIDIA's YOLO QAT recipe:
  un-quantized layers may use FP16) or, with `strongly_typed=True`, exactly as the ONNX types say.
- 11.x (JetPack >= 7.2.2): every network is strongly typed; precision flags and calibrators are gone.
Written from NVIDIA's Python API docs; needs a CUDA GPU (the builder times kernels on the device).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ghost_deploy.errors import UserError
from ghost_deploy.io import atomic_path, sha256_file, write_bytes_atomic
from ghost_deploy.parity.runners import Runner


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU for it) is absent: the caller writes a deployment bundle instead."""


def _import_trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt Python package is not installed ({exc})") from None
    return tensorrt


def trt_version() -> str | None:
    try:
        return _import_trt().__version__
    except TensorRTUnavailable:
        return None


def trt_major() -> int | None:
    version = trt_version()
    return int(version.split(".")[0]) if version else None


@dataclass
class BuildResult:
    engine_path: str
    engine_sha256: str
    tensorrt_version: str
    trt_world: int
    flags: list[str]
    dla_core: int | None
    layers: list[dict]
    placement: dict[str, list[str]]  # {"DLA": [...], "GPU": [...]} engine layers as built (DLA builds only)
    input_shapes: dict[str, dict]
    build_seconds: float
    timing_cache: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_PRECISION_PATTERNS = (("INT8", r"\bint8\b"), ("FP16", r"\b(fp16|half)\b"), ("BF16", r"\bbf16\b"),
                       ("FP8", r"\bfp8\b"), ("INT4", r"\bint4\b"), ("INT32", r"\bint32\b"),
                       ("FP32", r"\b(fp32|float)\b"), ("BOOL", r"\bbool\b"))


def _tensor_precision(tensor) -> str | None:
    if not isinstance(tensor, dict):
        return None
    text = " ".join(str(tensor.get(k, "")) for k in ("DataType", "Format/Datatype", "Format")).lower()
    return next((name for name, pattern in _PRECISION_PATTERNS if re.search(pattern, text)), None)


def parse_layer_information(info: dict | str) -> list[dict]:
    """Engine-inspector JSON (10.x 'Format/Datatype' or 11.x 'DataType') -> [{name, type, precision, ...}].

    `precision` is the first input's type (what the kernel computes in); `output_precision` the first output's.
    """
    if isinstance(info, str):
        info = json.loads(info)
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # profiling verbosity below DETAILED gives names only
            layers.append({"name": layer, "type": None, "precision": None, "output_precision": None})
            continue
        inputs, outputs = layer.get("Inputs") or [], layer.get("Outputs") or []
        layers.append({"name": layer.get("Name", ""), "type": layer.get("LayerType"),
                       "precision": _tensor_precision(inputs[0]) if inputs else None,
                       "output_precision": _tensor_precision(outputs[0]) if outputs else None,
                       "tactic": layer.get("TacticName"), "metadata": layer.get("Metadata")})
    return layers


def _profile_shapes(network, batch, imgsz: int) -> dict[str, dict]:
    """min/opt/max per input: dynamic batch from `batch`, other dynamic dims from the target image size."""
    min_b, opt_b, max_b = (batch, batch, batch) if isinstance(batch, int) else tuple(batch)
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        fixed = [imgsz if (d < 0 and axis >= 2) else d for axis, d in enumerate(dims)]
        if any(d < 0 for d in fixed[1:]):
            raise UserError(None, f"input '{tensor.name}' has dynamic dims {dims} that cannot be fixed")
        pick = lambda b: tuple([b if dims[0] < 0 else dims[0], *fixed[1:]])  # noqa: E731
        shapes[tensor.name] = {"min": pick(min_b), "opt": pick(opt_b), "max": pick(max_b),
                               "dynamic": any(d < 0 for d in dims)}
    return shapes


def _parse_network(trt, builder, logger, onnx_path, world: int, strongly_typed: bool, flags_used: list):
    network_flags = 0
    if world >= 11:
        flags_used.append("strongly-typed (always on in 11.x)")
    elif strongly_typed:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        flags_used.append("STRONGLY_TYPED")
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(onnx_path, "TensorRT's ONNX parser rejected the model: " + " | ".join(errors[:3]))
    return network, parser  # the parser owns weights the network refers to: keep it alive with the network


def _inspect_layers(trt, engine, shapes: dict) -> list[dict]:
    """Per-layer information as built. With dynamic shapes the inspector reports no formats unless it is given an
    execution context whose input shapes are set (NvInferRuntime.h, IEngineInspector::setExecutionContext)."""
    context = engine.create_execution_context()
    for name, shape in shapes.items():
        if shape["dynamic"]:
            context.set_input_shape(name, shape["opt"])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return parse_layer_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def dla_unavailable(profile, trt_version: str) -> str | None:
    """Why this TensorRT has no DLA for `profile`; None when it has (builder.num_DLA_cores still decides).
    NVIDIA, "Working with DLA" (TensorRT 11.4.1): 10.7 was the last 10.x with DLA; 11.0-11.3 had none; from 11.4.1
    only Jetson AGX Orin on JetPack >= 7.2.2 (Thor has no DLA; Orin on JetPack 6 stays on 10.x)."""
    major, minor, patch = (tuple(int(p) for p in re.findall(r"\d+", trt_version)[:3]) + (0, 0, 0))[:3]
    if major == 10 and minor > 7:
        return f"TensorRT {trt_version} has no DLA (10.7 was the last 10.x release with DLA)"
    if major >= 11 and ((minor, patch) < (4, 1) or not profile.dla_max_tensorrt.get("11")):
        return f"TensorRT {trt_version} has DLA only from 11.4.1 and only on Jetson AGX Orin"
    return None


def _configure_dla(trt, builder, config, network, profile, dla_core: int, strong: bool, onnx_path, flags_used) -> None:
    reason = dla_unavailable(profile, trt.__version__)
    if reason:
        raise UserError("--dla-core", reason)
    if dla_core >= builder.num_DLA_cores:
        raise UserError("--dla-core", f"DLA core {dla_core} requested but this device has {builder.num_DLA_cores}")
    if strong:  # strongly typed: the ONNX's tensor types decide, and DLA runs FP16/INT8 only
        outputs = (network.get_layer(i).get_output(j) for i in range(network.num_layers)
                   for j in range(network.get_layer(i).num_outputs))
        if not any(t.dtype == trt.DataType.HALF for t in outputs):
            raise UserError(onnx_path, "DLA under strong typing runs FP16/INT8 tensors and this ONNX is FP32 between "
                            "its Q/DQ pairs: convert it (`python3 -m modelopt.onnx.autocast --target_dla "
                            "--low_precision_type fp16`), re-export parity, or build weakly typed on TensorRT 10.x")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # fallback is silent: the placement is read from the build log
    flags_used += [f"DLA_core={dla_core}", "GPU_FALLBACK"]


def _capturing_logger(trt, verbose: bool):
    """A TensorRT logger that keeps every line (the builder reports DLA/GPU placement only in its log)."""
    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, message):
            self.lines.append(message)
            if severity <= (trt.ILogger.INFO if verbose else trt.ILogger.WARNING):
                print(f"[TensorRT] {message}")

    return CapturingLogger()


def parse_device_placement(lines) -> dict[str, list[str]]:
    """{'DLA': [...], 'GPU': [...]}: the engine layers under the builder's '[DlaLayer]' / '[GpuLayer]' log lines."""
    placement: dict[str, list[str]] = {"DLA": [], "GPU": []}
    for line in lines:
        match = re.match(r"\s*\[(Dla|Gpu)Layer\]\s*(.+)", line)
        if match:
            placement[match.group(1).upper()].append(match.group(2).strip())
    return placement


def build_engine(onnx_path, engine_path, target_profile, *, trt_world: int | None = None,
                 dla_core: int | None = None, timing_cache=None, opt_level: int = 3, batch=None,
                 strongly_typed: bool = False, progress: bool = True) -> BuildResult:
    """Parse the ONNX, build for `target_profile`, write the engine atomically, inspect every layer."""
    trt = _import_trt()
    world = trt_world or int(trt.__version__.split(".")[0])
    if world != int(trt.__version__.split(".")[0]):
        raise UserError(None, f"asked for TensorRT {world}.x but TensorRT {trt.__version__} is installed")
    if world not in target_profile.tensorrt_majors:
        raise UserError(target_profile.source_path, f"target {target_profile.name} does not ship TensorRT {world}.x "
                        f"(ships {target_profile.tensorrt_majors})")
    logger = _capturing_logger(trt, progress)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "factory function returned nullptr": no usable CUDA device
        raise TensorRTUnavailable("TensorRT found no usable CUDA GPU") from None
    flags_used: list[str] = []
    network, parser = _parse_network(trt, builder, logger, onnx_path, world, strongly_typed, flags_used)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target_profile.workspace_mb) << 20)
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if world == 10 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ decide INT8 layers; no calibrator is used
        config.set_flag(trt.BuilderFlag.FP16)
        flags_used += ["INT8", "FP16"]
    # TF32 is on by default (NvInfer.h BuilderFlag::kTF32): float layers would round their inputs to 10 mantissa
    # bits, an error the parity budget does not allow for, so parity builds run float layers in FP32.
    config.clear_flag(trt.BuilderFlag.TF32)
    flags_used.append("TF32 off")

    shapes = _profile_shapes(network, batch if batch is not None else target_profile.default_batch,
                             target_profile.default_imgsz)
    if any(s["dynamic"] for s in shapes.values()):
        if dla_core is not None and any(s["min"] != s["max"] for s in shapes.values()):
            raise UserError(None, "DLA engines need static shapes: pass one batch size, not (min, opt, max)")
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)

    if dla_core is not None:
        _configure_dla(trt, builder, config, network, target_profile, dla_core, world >= 11 or strongly_typed,
                       onnx_path, flags_used)

    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(onnx_path, "TensorRT could not build an engine from this model (see the TensorRT log above)")
    build_seconds = time.perf_counter() - started
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(serialized)
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    if dla_core is not None:
        runtime.DLA_core = dla_core
    layers = _inspect_layers(trt, runtime.deserialize_cuda_engine(serialized), shapes)
    # where the builder put each layer, as it reports it (can_run_on_DLA is asked before fusion, not the placement)
    placement = parse_device_placement(logger.lines) if dla_core is not None else {}
    warnings = [f"DLA core {dla_core}: no layer runs on DLA (all fell back to the GPU)"] \
        if dla_core is not None and not placement.get("DLA") else []
    return BuildResult(engine_path=str(engine_path), engine_sha256=sha256_file(engine_path),
                       tensorrt_version=trt.__version__, trt_world=world, flags=flags_used, dla_core=dla_core,
                       layers=layers, placement=placement, warnings=warnings,
                       input_shapes={k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in s.items()}
                                     for k, s in shapes.items()},
                       build_seconds=round(build_seconds, 3), timing_cache=str(cache_path) if cache_path else None)


class _CudaBuffers:
    """Device memory and one stream through cuda-python (preferred) or pycuda."""

    def __init__(self):
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            self.cudart, self.pycuda = cudart, None
            self.stream = self._check(cudart.cudaStreamCreate())
        except ImportError:
            try:
                import pycuda.autoinit  # noqa: F401  (creates the context)
                import pycuda.driver as pycuda
            except ImportError:
                raise TensorRTUnavailable("running an engine needs cuda-python or pycuda (pip install cuda-python)") from None
            self.cudart, self.pycuda = None, pycuda
            self.stream = pycuda.Stream()
        self.allocations: dict[str, tuple[object, int]] = {}

    def _check(self, result):
        err, *rest = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def device_pointer(self, name: str, nbytes: int) -> int:
        held = self.allocations.get(name)
        if held is None or held[1] < nbytes:
            if held is not None:
                self._free(held[0])
            memory = self.pycuda.mem_alloc(max(nbytes, 1)) if self.pycuda else self._check(self.cudart.cudaMalloc(max(nbytes, 1)))
            self.allocations[name] = held = (memory, nbytes)
        return int(held[0])

    def to_device(self, name: str, array: np.ndarray) -> None:
        pointer = self.device_pointer(name, array.nbytes)
        if self.pycuda:
            self.pycuda.memcpy_htod(pointer, array)
        else:
            self._check(self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, name: str, array: np.ndarray) -> None:
        pointer = int(self.allocations[name][0])
        if self.pycuda:
            self.pycuda.memcpy_dtoh(array, pointer)
        else:
            self._check(self.cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def stream_handle(self) -> int:
        return self.stream.handle if self.pycuda else int(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize() if self.pycuda else self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def _free(self, memory) -> None:
        memory.free() if self.pycuda else self.cudart.cudaFree(memory)

    def close(self) -> None:
        for memory, _ in self.allocations.values():
            self._free(memory)
        self.allocations.clear()
        if self.cudart is not None:
            self.cudart.cudaStreamDestroy(self.stream)


class EngineRunner(Runner):
    """Runs a serialized engine behind the runner interface (parity.runners)."""

    def __init__(self, engine_path: str | os.PathLike, dla_core: int | None = None):
        trt = _import_trt()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(self.path, "engine file not found")
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if dla_core is not None:
            # A DLA engine runs on the core the runtime names (IRuntime::setDLACore), not the one it was built for
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(self.path, "TensorRT cannot load this engine: it was built with another TensorRT "
                            "version or GPU (check the receipt beside it with `verify_runtime`)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.input_names = [n for n in names if is_input(n)]
        self.output_names = [n for n in names if not is_input(n)]
        self.buffers = _CudaBuffers()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt = self._trt
        for name in self.input_names:
            if name not in feed:
                raise UserError(self.path, f"input '{name}' not provided (got {sorted(feed)})")
            array = np.ascontiguousarray(feed[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            self.buffers.to_device(name, array)
            self.context.set_tensor_address(name, self.buffers.device_pointer(name, array.nbytes))
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self.buffers.device_pointer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(self.buffers.stream_handle()):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        self.buffers.synchronize()  # pycuda copies below are synchronous on another stream
        for name, array in outputs.items():
            self.buffers.to_host(name, array)
        self.buffers.synchronize()
        return outputs

    def close(self) -> None:
        if getattr(self, "buffers", None) is not None:
            self.buffers.close()
            self.buffers = None
        self.context = self.engine = self.runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
