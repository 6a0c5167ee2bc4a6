"""One runner interface for every way of running a model: `input_names`, `output_names`, `infer(feed) -> dict`,
`close()`, and a context manager.

Parity gates, engine builds and bench all take a `Runner`, so the same comparison runs on a laptop (ONNX
Runtime, OpenVINO) and on the Jetson (TensorRT), and a new runtime is one subclass. `OrtRunner` is here;
`export.reference.TorchRunner` runs a PyTorch module, `engines.trt.EngineRunner` a TensorRT engine and
`engines.openvino.OpenVinoRunner` an OpenVINO compiled model. Torch-free.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ghost_deploy.errors import UserError


class Runner:
    """Base class: subclasses set `input_names` and `output_names` (model order) and implement `infer`."""

    input_names: list[str]
    output_names: list[str]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for one batch of inputs by name."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime's resources; the runner is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OrtRunner(Runner):
    """ONNX Runtime behind the runner interface.

    `exact=True` (default) sets `session.disable_quant_qdq`: ORT then computes what the graph says (Q, DQ, a
    float conv with a float bias), which is also what TensorRT computes. With the rewrites on, ORT quantizes a
    conv's float bias to int32 at scale s_in * s_w and may run integer kernels: its own approximation, right for
    measuring the CPU form, wrong as the oracle for the TensorRT form. `optimize=False` turns off ORT's graph
    optimizations altogether (they fold a Conv's following Mul and Add into its weights).
    """

    def __init__(self, onnx_path: str | os.PathLike, providers=("CPUExecutionProvider",), threads: int | None = None,
                 exact: bool = True, optimize: bool = True, spin_wait: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(None, "onnxruntime is not installed (pip install onnxruntime)") from None
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise UserError(self.path, "ONNX file not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # no busy-waiting worker threads by default: on a shared machine (or in an interleaved bench round) they
        # keep burning the cores after each run; a process that runs only this model may prefer spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        if exact:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if not optimize:  # every node as written: no Conv+Mul / Conv+Add folding into the weights
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(self.path, f"ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise UserError(self.path, f"inputs {missing} not provided (got {sorted(feed)})")
        values = self.session.run(self.output_names, {n: np.ascontiguousarray(feed[n]) for n in self.input_names})
        return dict(zip(self.output_names, values))

    def close(self) -> None:
        self.session = None

    @property
    def input_shapes(self) -> dict[str, list]:
        return {i.name: list(i.shape) for i in self.session.get_inputs()}

    @property
    def custom_metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)
