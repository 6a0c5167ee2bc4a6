"""Backends for `bench`: one small class per way of running the model, all with the same interface.

A backend takes file paths (a checkpoint, an ONNX, an engine), never another stage's internals, and
turns a feed `{input name: float32 NCHW array}` into the raw head maps `[(B, na*(nc+5), H, W), ...]`.
Adding a backend is its `Runner` (the interface parity and engine builds use too) and a subclass here that
sets `kind` and implements `_open`.
The optional runtimes (tensorrt, CUDA bindings) load in `load()`, so a missing one makes that backend
`BackendUnavailable` (skipped, with the reason in the report) instead of breaking the run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ghost_deploy.bench.prepost import head_outputs
from ghost_deploy.bench.sizes import onnx_precision
from ghost_deploy.checkpoint import model_from_checkpoint, read_meta
from ghost_deploy.contract import metadata_key
from ghost_deploy.engines.openvino import OpenVinoRunner, OpenVinoUnavailable, open_onnx, openvino_version
from ghost_deploy.engines.receipt import load_receipt
from ghost_deploy.engines.trt import EngineRunner, TensorRTUnavailable
from ghost_deploy.errors import UserError
from ghost_deploy.export.reference import TorchRunner
from ghost_deploy.onnx_graph import onnx_metadata
from ghost_deploy.parity.runners import OrtRunner, Runner


class BackendUnavailable(RuntimeError):
    """This backend cannot run on this machine (library or GPU absent); the reason goes in the report."""


class Backend:
    """One way of running the model in bench: a `Runner` (parity.runners) plus what bench reports about it.

    Subclasses set `kind` and implement `_open() -> Runner`; a new runtime is its runner and a subclass of a
    few lines. `infer` returns the runner's head outputs in head order.
    """

    kind = "base"

    def __init__(self, name: str, precision: str, artifact_paths: dict[str, str]):
        self.name = name
        self.precision = precision
        self.artifact_paths = {role: str(path) for role, path in artifact_paths.items()}
        self.input_names: tuple[str, ...] = ()
        self.head_names: list[str] = []
        self.runner: Runner | None = None

    @property
    def loaded(self) -> bool:
        return self.runner is not None

    # -- interface ---------------------------------------------------------------------------------
    def load(self) -> None:
        if self.runner is None:
            self.runner = self._open()
            self.input_names = tuple(self.runner.input_names)
            self.head_names = head_outputs(self.runner.output_names, self._declared_heads())

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Raw head maps for one batch, in head order."""
        if self.runner is None:
            raise RuntimeError(f"backend {self.name} used before load()")
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise UserError(next(iter(self.artifact_paths.values()), None),
                            f"inputs {missing} not provided (got {sorted(feed)})")
        outputs = self.runner.infer({name: feed[name] for name in self.input_names})
        return [outputs[name] for name in self.head_names]

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def device_memory(self) -> int | None:
        """Peak device (GPU) memory in bytes since load, or None on a CPU backend."""
        return None

    def static_batch(self) -> int | None:
        """The only batch size this backend accepts, or None when any batch runs."""
        return None

    def static_image_size(self) -> int | None:
        """The input side this backend was built for, or None when the spatial size is dynamic."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "precision": self.precision, "artifacts": self.artifact_paths}

    # -- hooks -------------------------------------------------------------------------------------
    def _open(self) -> Runner:
        raise NotImplementedError

    def _declared_heads(self) -> list[str] | None:
        """The head outputs the artifact declares (an export's ghost.head_output_names), if it does."""
        return None

    def __enter__(self):
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(path, f"{what} not found")
    if not path.is_file():
        raise UserError(path, f"expected a {what} file, found a folder")
    return path


def _static_dims(shapes: dict[str, list]) -> tuple[int | None, int | None]:
    """(batch, side) when every input fixes them, else None for that one."""
    batches = {shape[0] for shape in shapes.values() if shape and isinstance(shape[0], int)}
    sides = {shape[-1] for shape in shapes.values() if len(shape) == 4 and isinstance(shape[-1], int)}
    return (batches.pop() if len(batches) == 1 else None), (sides.pop() if len(sides) == 1 else None)


class TorchBackend(Backend):
    """A checkpoint run in PyTorch: FP32 for a teacher, GHOST fake-quant for a checkpoint with a bit plan.

    `fake_quant=None` follows the checkpoint; `True` on a checkpoint without a bit plan (or `False` on one
    with a plan, whose FP32 form is its teacher) is refused.
    """

    kind = "torch"

    def __init__(self, checkpoint: str | os.PathLike, fake_quant: bool | None = None, device: str = "auto",
                 threads: int | None = None, name: str | None = None):
        path = _require_file(Path(checkpoint), "checkpoint")
        self.meta = read_meta(path)
        has_plan = self.meta.quantized
        if fake_quant is None:
            fake_quant = has_plan
        if fake_quant and not has_plan:
            raise UserError(path, "fake-quant requested but this checkpoint has no bit plan (it is an FP32 model)")
        if not fake_quant and has_plan:
            raise UserError(path, "checkpoint is quantized (has a bit plan); its FP32 form is the teacher checkpoint")
        self.fake_quant = fake_quant
        default_name = "torch-ghost" if fake_quant else "torch-fp32"
        super().__init__(name or default_name, "fake-quant" if fake_quant else "fp32", {"checkpoint": path})
        self.path = path
        self.device = device
        self.threads = threads
        self.input_names = tuple(self.meta.input_names)
        self.model = None

    def _open(self) -> Runner:
        if self.device == "auto":  # the same default as train: CUDA when there is one
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {self.device} requested but CUDA is not available")
        if self.threads:
            torch.set_num_threads(self.threads)
        model, _ = model_from_checkpoint(self.path, with_sr=False)
        self.model = model.to(self.device).eval()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        heads = [f"head{index}" for index in range(len(self.meta.strides))]
        return TorchRunner(self.model, self.model.input_names, heads, device=self.device)

    def close(self) -> None:
        super().close()
        self.model = None

    def device_memory(self) -> int | None:
        if self.device.startswith("cuda") and self.model is not None:
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


class OrtBackend(Backend):
    """An ONNX (FP32 or QDQ) run with ONNX Runtime on the CPU, as a user gets it: graph optimizations and ORT's
    Q/DQ rewrites on (integer kernels where ORT has them). Worker threads do not spin-wait after a run by
    default: spinning threads kept burning the cores after each inference and slowed the next backend of an
    interleaved round by 2x in our runs."""

    kind = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, label: str | None = None, threads: int | None = None,
                 providers=("CPUExecutionProvider",), spin_wait: bool = False):
        path = _require_file(Path(onnx_path), "ONNX file")
        super().__init__(label or f"ort-{path.stem}", onnx_precision(path), {"onnx": path})
        self.path, self.threads, self.providers, self.spin_wait = path, threads, tuple(providers), spin_wait

    def _open(self) -> Runner:
        try:
            return OrtRunner(self.path, providers=self.providers, threads=self.threads, exact=False,
                             spin_wait=self.spin_wait)
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc})") from None

    def _declared_heads(self) -> list[str] | None:
        declared = self.runner.custom_metadata.get(metadata_key("head_output_names"))
        return json.loads(declared) if declared else None

    def static_batch(self) -> int | None:
        return _static_dims(self.runner.input_shapes)[0] if self.runner else None

    def static_image_size(self) -> int | None:
        return _static_dims(self.runner.input_shapes)[1] if self.runner else None


class TrtBackend(Backend):
    """A serialized TensorRT engine through the torch-free `engines.trt.EngineRunner` (TensorRT + CUDA)."""

    kind = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, label: str | None = None):
        path = _require_file(Path(engine_path), "engine")
        super().__init__(label or f"trt-{path.stem}", "engine", {"engine": path})
        self.path = path

    def _open(self) -> Runner:
        try:
            return EngineRunner(self.path)
        except TensorRTUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
        except ImportError as exc:  # pycuda / cuda-python absent
            raise BackendUnavailable(f"CUDA bindings missing ({exc})") from None

    def device_memory(self) -> int | None:
        # The engine's activation memory; weights live in the engine allocation TensorRT made at load.
        engine = getattr(self.runner, "engine", None)
        for attribute in ("device_memory_size_v2", "device_memory_size"):
            value = getattr(engine, attribute, None)
            if isinstance(value, int):
                return value
        return None

    def static_batch(self) -> int | None:
        engine = getattr(self.runner, "engine", None)
        if engine is None or not self.input_names:
            return None
        try:
            low, _, high = engine.get_tensor_profile_shape(self.input_names[0], 0)
        except Exception:  # static engines have no optimisation profile
            shape = tuple(engine.get_tensor_shape(self.input_names[0]))
            return shape[0] if shape and shape[0] > 0 else None
        return low[0] if low[0] == high[0] else None


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU: a CPU-form or FP32 ONNX compiled at load, or an engine blob from
    `build-engine --target openvino-cpu` (imported with its receipt's precision)."""

    kind = "openvino"

    def __init__(self, path: str | os.PathLike, label: str | None = None, threads: int | None = None,
                 inference_precision: str = "f32"):
        path = _require_file(Path(path), "ONNX or engine")
        is_engine = path.suffix.lower() not in (".onnx", ".xml")
        precision = "engine" if is_engine else onnx_precision(path)
        super().__init__(label or f"ov-{path.stem}", precision, {"engine" if is_engine else "onnx": path})
        self.path, self.threads, self.inference_precision = path, threads, inference_precision

    def _open(self) -> Runner:
        try:
            if self.path.suffix.lower() in (".onnx", ".xml"):
                return open_onnx(self.path, self.threads, inference_precision=self.inference_precision)[0]
            return OpenVinoRunner(self.path, self.threads, inference_precision=self.inference_precision)
        except OpenVinoUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None

    def static_batch(self) -> int | None:
        return _static_dims(self.runner.input_shapes)[0] if self.runner else None


def _engine_runtime(path: Path) -> str:
    """'openvino' or 'tensorrt', from the receipt beside the engine (TensorRT when there is none)."""
    receipt = path.with_suffix(".receipt.json")
    if not receipt.is_file():
        return "tensorrt"
    try:
        return load_receipt(receipt).runtime  # the one receipt decoder (contract.Receipt)
    except UserError:  # an unreadable receipt: as before, the engine is taken for TensorRT's
        return "tensorrt"


def _openvino_computes(path: str) -> bool:
    """OpenVINO is run on the forms it is proven on (docs/engines.md): the CPU form and FP32 exports."""
    meta = onnx_metadata(path)
    return meta is not None and (meta.precision == "fp32" or (meta.target == "cpu" and not meta.int4_weights))


def backends_from_artifacts(artifacts: dict, threads: int | None = None, device: str = "auto") -> list[Backend]:
    """Backends for an artifacts dict: `checkpoints` (teacher first, then GHOST), `onnx`, `engines` (lists of paths).

    Every checkpoint runs as PyTorch (FP32 or fake-quant, as it holds), every ONNX with ONNX Runtime on the CPU
    and, where OpenVINO is installed and proven on that form, with OpenVINO too (`ov-*`); every engine with the
    runtime its receipt names (TensorRT or OpenVINO). Names stay unique (a suffix is added on collisions).
    """
    backends: list[Backend] = []
    for path in artifacts.get("checkpoints", []):
        backends.append(TorchBackend(path, fake_quant=None, device=device, threads=threads))
    for path in artifacts.get("onnx", []):
        backends.append(OrtBackend(path, threads=threads))
    if openvino_version() is not None:
        backends += [OpenVinoBackend(path, threads=threads) for path in artifacts.get("onnx", []) if _openvino_computes(path)]
    for path in artifacts.get("engines", []):
        if _engine_runtime(Path(path)) == "openvino":
            backends.append(OpenVinoBackend(path, label=f"ov-engine-{Path(path).stem}", threads=threads))
        else:
            backends.append(TrtBackend(path))
    seen: dict[str, int] = {}
    for backend in backends:
        count = seen.get(backend.name, 0)
        seen[backend.name] = count + 1
        if count:
            backend.name = f"{backend.name}-{count + 1}"
    return backends
