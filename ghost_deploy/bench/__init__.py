"""`bench`: latency, size and accuracy of every form of the model (PyTorch, ONNX Runtime, TensorRT) in one run.

Modules: `backends` (one class per runtime), `timing` (warm-up, interleaved timing, statistics),
`memory` (host peak RSS), `prepost` (frames -> inputs, heads -> detections), `accuracy` (mAP per backend),
`sizes` / `bitplan` (file sizes, analytic size and BOPs), `conventions` (size and BOPs as the GHOST
reference counts them, corrected, deployable; docs/size-bops.md), `jetson` (power mode, clocks, tegrastats),
`report` (table, JSON, Markdown, plots), `compare` (regression gate), `run` (`run_bench`), `cli`.
See docs/bench.md.
"""
from ghost_deploy.bench.backends import (
    Backend,
    BackendUnavailable,
    OpenVinoBackend,
    OrtBackend,
    TorchBackend,
    TrtBackend,
    backends_from_artifacts,
)
from ghost_deploy.bench.regression import compare_results, format_comparison, load_result
from ghost_deploy.bench.run import FORMAT, artifacts_from_run, normalise_artifacts, run_bench
from ghost_deploy.bench.timing import WarmupPolicy

__all__ = [
    "Backend", "BackendUnavailable", "OpenVinoBackend", "OrtBackend", "TorchBackend", "TrtBackend", "backends_from_artifacts",
    "compare_results", "format_comparison", "load_result", "FORMAT", "artifacts_from_run", "normalise_artifacts",
    "run_bench", "WarmupPolicy",
]
