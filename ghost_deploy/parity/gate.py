"""The parity gate: a runner on the parity set's inputs, compared with the set's reference outputs.

`run_parity` is the one comparison every stage uses (export against ONNX Runtime, engine builds against
TensorRT or OpenVINO, a bundle on the Jetson), so a parity number means the same thing everywhere: raw head
tensors (cosine per image, max abs error in units of the head's accumulator step) and detections after NMS
(`compare.compare_outputs`). Torch-free.
"""
from __future__ import annotations

import numpy as np

from ghost_deploy.errors import UserError
from ghost_deploy.parity.compare import Budgets, ParityReport, compare_outputs
from ghost_deploy.parity.parityset import ParitySet
from ghost_deploy.parity.runners import OrtRunner


def run_in_chunks(runner, inputs: dict[str, np.ndarray], batch_size: int = 4) -> dict[str, np.ndarray]:
    count = len(next(iter(inputs.values())))
    chunks: dict[str, list] = {}
    for start in range(0, count, batch_size):
        out = runner.infer({name: value[start:start + batch_size] for name, value in inputs.items()})
        for name, value in out.items():
            chunks.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in chunks.items()}


def run_gate(parity_set, onnx_path, budgets: Budgets, exact: bool = True) -> ParityReport:
    """ONNX Runtime on the parity set's inputs, compared with its reference outputs (engines' run_parity)."""
    with OrtRunner(onnx_path, exact=exact) as runner:
        return run_parity(parity_set, runner, budgets)


def run_parity(parity_set: ParitySet, runner, budgets: Budgets | None = None, batch_size: int = 1) -> ParityReport:
    """Run `runner` on the parity inputs (in chunks of `batch_size` images) and compare with the reference.

    Budgets come from the parity set's meta unless given; detections are compared when the meta describes
    the heads (strides, anchors, nc). Candidates are decoded at half the score threshold so a detection
    that dips just under it is still matched (and judged by its score change) rather than called missing.
    """
    budgets = budgets or Budgets.from_dict(parity_set.meta.budgets)
    missing = [n for n in parity_set.input_names if n not in runner.input_names]
    if missing:
        raise UserError(parity_set.path, f"parity inputs {missing} are not inputs of the model ({runner.input_names})")
    count = len(next(iter(parity_set.inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in parity_set.output_names}
    for start in range(0, count, batch_size):
        feed = {n: parity_set.inputs[n][start:start + batch_size] for n in parity_set.input_names}
        produced = runner.infer(feed)
        for name in parity_set.output_names:
            if name in produced:
                chunks[name].append(np.asarray(produced[name]))
    candidate = {name: np.concatenate(parts, axis=0) for name, parts in chunks.items() if parts}
    return compare_with_reference(parity_set, candidate, budgets)


def compare_with_reference(parity_set: ParitySet, candidate: dict[str, np.ndarray], budgets: Budgets,
                           reference: dict[str, np.ndarray] | None = None) -> ParityReport:
    """`candidate` outputs against the parity set's reference (or `reference`), with its scales and decoding."""
    detection_fn = parity_set.detection_fn(conf_thres=budgets.score_threshold / 2)
    return compare_outputs(parity_set.outputs if reference is None else reference, candidate, budgets,
                           output_scales=parity_set.meta.output_scales, detection_fn=detection_fn)


