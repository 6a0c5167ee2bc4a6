"""When the float32 gate fails (or with --per-layer): which layer drifted first, and is it only rounding?

- Localisation: every conv's output (after BN, which the ONNX folds into the conv) in PyTorch and in the ONNX
  (extra graph outputs on a temporary copy); the first layer over budget, in execution order, is named with
  its bit widths. A layer is over budget when cosine < min_cosine or its relative L2 error
  ||a - b|| / ||a|| > sqrt(2 (1 - min_cosine)) (the same bound for vectors of equal length, and unlike the
  cosine it also sees a wrong scale).
- Noise floor: how far this model's outputs move under float32 rounding alone. Every layer's own
  PyTorch-vs-ORT difference (the localisation's "conv" error) is injected as random noise of that size into
  PyTorch, a few times, and each noisy run is put through the same gate against the clean reference. A quantized
  network amplifies a rounding flip at a code boundary layer after layer, so a model whose noisy PyTorch runs
  fail the budgets too is at its noise floor: the gate failed on rounding, not on a wrong layer. The verdict does
  not change (over budget is over budget); the report says which it is.
"""
from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from ghost_deploy.export.reference import TorchRunner
from ghost_deploy.parity.compare import Budgets
from ghost_deploy.parity.gate import run_parity
from ghost_deploy.parity.runners import OrtRunner


class Agreement:
    """Running cosine / relative L2 error / max abs error between a reference and a candidate tensor."""

    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    diff_sq: float = 0.0
    max_abs_error: float = 0.0
    finite: bool = True
    seen: bool = False

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        a, b = np.asarray(reference, np.float64).ravel(), np.asarray(candidate, np.float64).ravel()
        self.seen = True
        if not np.isfinite(b).all():
            self.finite = False
            return
        self.dot += float(a @ b)
        self.ref_sq += float(a @ a)
        self.cand_sq += float(b @ b)
        self.diff_sq += float((a - b) @ (a - b))
        self.max_abs_error = max(self.max_abs_error, float(np.abs(a - b).max()) if a.size else 0.0)

    def cosine(self) -> float:
        if self.ref_sq == 0 and self.cand_sq == 0:
            return 1.0
        if self.ref_sq == 0 or self.cand_sq == 0:
            return 0.0
        return self.dot / math.sqrt(self.ref_sq * self.cand_sq)

    def relative_error(self) -> float:
        if self.ref_sq == 0:
            return 0.0 if self.diff_sq == 0 else math.inf
        return math.sqrt(self.diff_sq / self.ref_sq)

    def over(self, min_cosine: float, max_relative_error: float) -> bool:
        return self.seen and (not self.finite or self.cosine() < min_cosine or self.relative_error() > max_relative_error)

    def to_dict(self) -> dict | None:
        if not self.seen:
            return None
        return {"cosine": self.cosine(), "relative_error": self.relative_error(), "max_abs_error": self.max_abs_error,
                "finite": self.finite}


@dataclass
class LayerReport:
    layers: list[dict]
    first_over_budget: dict | None
    relative_error_budget: float
    min_cosine: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "first_over_budget": self.first_over_budget,
                "relative_error_budget": self.relative_error_budget, "min_cosine": self.min_cosine,
                "notes": list(self.notes)}

    def format_table(self, limit: int | None = None) -> str:
        header = (f"{'layer (execution order)':<24} {'W':>2} {'A':>2} {'input rel':>10} {'conv rel':>10} "
                  f"{'cumul cos':>10} {'cumul rel':>10}  status")
        lines = ["per layer: 'input'/'conv' = this layer alone on ONNX Runtime's own input, 'cumul' = end to end",
                 header, "-" * len(header)]
        for row in self.layers if limit is None else self.layers[:limit]:
            local_input, conv, cumulative = row["input_quantizer"], row["conv"], row["cumulative"]
            lines.append(f"{row['name']:<24} {_bits(row['weight_bits']):>2} {_bits(row['act_bits']):>2} "
                         f"{_num(local_input, 'relative_error'):>10} {_num(conv, 'relative_error'):>10} "
                         f"{_num(cumulative, 'cosine', '.6f'):>10} {_num(cumulative, 'relative_error'):>10}  "
                         f"{row['status']}")
        first = self.first_over_budget
        lines.append(f"first layer over budget: {first['name']} (W{_bits(first['weight_bits'])} A{_bits(first['act_bits'])}, "
                     f"{first['status']})" if first else "every layer within budget")
        lines += self.notes
        return "\n".join(lines)


def _bits(bits) -> str:
    return "FP" if bits is None else str(bits)


def _num(stats: dict | None, key: str, spec: str = ".2e") -> str:
    return "-" if not stats else format(stats[key], spec)


def layer_output_module(model, name: str):
    """The module whose output equals the exported Conv node's output: the block's BN when the ONNX folds it."""

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    bn = getattr(parent, "bn", None)
    if attr == "conv" and isinstance(bn, nn.BatchNorm2d):
        return bn
    return model.get_submodule(name)


def _conv_alone(model, name: str, x):
    """What PyTorch computes for this conv (its weights as trained, then its BN) on an already quantized input."""

    module = model.get_submodule(name)
    weight = module.quantized_weight() if hasattr(module, "quantized_weight") else module.weight
    y = F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    output_module = layer_output_module(model, name)
    return output_module(y) if output_module is not module else y


def _onnx_layer_tensors(onnx_model, layer_names) -> dict[str, dict[str, str]]:
    """Per conv: its output, its data input and, when that input is dequantized, the tensor before the Q (and
    before the float range clip that is part of the quantizer)."""
    producers = {out: node for node in onnx_model.graph.node for out in node.output}
    found = {}
    for node in onnx_model.graph.node:
        if node.op_type != "Conv" or node.name not in layer_names:
            continue
        tensors = {"output": node.output[0], "input": node.input[0]}
        dq = producers.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "Clip":  # CPU form: integer code clip between Q and DQ
                q = producers.get(q.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source = q.input[0]
                clip = producers.get(source)
                if clip is not None and clip.op_type == "Clip" and clip.name.endswith(".input_clip"):
                    source = clip.input[0]
                tensors["before_quantizer"] = source
        found[node.name] = tensors
    return found


def _layer_row(name: str, layer: dict, bits: tuple, min_cosine: float, rel_budget: float) -> dict:
    local = [kind for kind in ("input_quantizer", "conv") if layer[kind].over(min_cosine, rel_budget)]
    cumulative_over = layer["cumulative"].over(min_cosine, rel_budget)
    status = ("OVER BUDGET: " + " and ".join("input quantizer" if k == "input_quantizer" else "conv" for k in local)
              if local else "drifted (upstream)" if cumulative_over else "ok")
    return {"name": name, "weight_bits": bits[0], "act_bits": bits[1],
            **{kind: layer[kind].to_dict() for kind in ("input_quantizer", "conv", "cumulative")},
            "over_budget": bool(local), "cumulative_over_budget": bool(cumulative_over), "status": status}


def localise(reference_model, onnx_model, inputs: dict[str, np.ndarray], layer_bits: dict[str, tuple],
             budgets: Budgets, exact: bool = True) -> LayerReport:
    """Per-layer comparison, image by image (memory stays one image's activations).

    For every conv, three agreements: its input quantizer applied by PyTorch to ONNX Runtime's own pre-Q tensor
    vs ORT's dequantized input; the conv (+BN) applied by PyTorch to ORT's dequantized input vs ORT's conv output;
    and the end-to-end (cumulative) outputs. The local two are free of upstream rounding flips, so the first
    layer whose local agreement is over budget is the layer whose own numbers differ (a wrong scale, wrong
    codes). `layer_bits`: {conv name: (weight_bits, act_bits)}; rows come in PyTorch execution order.
    """

    names = list(layer_bits)
    layer_tensors = _onnx_layer_tensors(onnx_model, set(names))
    notes = [f"{name}: no Conv node of that name in the ONNX" for name in names if name not in layer_tensors]
    model = copy.deepcopy(onnx_model)
    wanted = sorted({t for tensors in layer_tensors.values() for t in tensors.values()})
    existing = {o.name for o in model.graph.output}
    for tensor in wanted:
        if tensor not in existing and tensor not in {i.name for i in model.graph.input}:
            model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    order: list[str] = []
    captured: dict[str, np.ndarray] = {}

    def hook_for(name):
        def hook(module, args, output):
            if name not in order:
                order.append(name)
            captured[name] = output.detach().numpy().copy()
        return hook

    handles = [layer_output_module(reference_model, name).register_forward_hook(hook_for(name))
               for name in layer_tensors]
    stats = {name: {"input_quantizer": Agreement(), "conv": Agreement(), "cumulative": Agreement()}
             for name in layer_tensors}
    quantizers = {name: getattr(reference_model.get_submodule(name), "input_quantizer", None) for name in layer_tensors}
    input_names = list(inputs)
    count = len(next(iter(inputs.values())))
    graph_inputs = {i.name for i in model.graph.input}
    with tempfile.TemporaryDirectory(prefix="ghost-localise-") as folder:
        path = Path(folder) / "layers.onnx"
        onnx.save(model, str(path))
        try:
            with OrtRunner(path, exact=exact) as runner, torch.no_grad():
                for index in range(count):
                    feed = {name: inputs[name][index:index + 1] for name in input_names}
                    captured.clear()
                    reference_model(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names))
                    fetch = [t for t in wanted if t not in graph_inputs]
                    values = dict(zip(fetch, runner.session.run(fetch, feed)))
                    values.update({t: feed[t] for t in wanted if t in graph_inputs})
                    for name, tensors in layer_tensors.items():
                        layer = stats[name]
                        if name in captured:
                            layer["cumulative"].add(captured[name], values[tensors["output"]])
                        conv_input = torch.from_numpy(np.ascontiguousarray(values[tensors["input"]]))
                        layer["conv"].add(_conv_alone(reference_model, name, conv_input).numpy(),
                                          values[tensors["output"]])
                        quantizer = quantizers[name]
                        if quantizer is not None and "before_quantizer" in tensors:
                            before = torch.from_numpy(np.ascontiguousarray(values[tensors["before_quantizer"]]))
                            layer["input_quantizer"].add(quantizer(before).numpy(), values[tensors["input"]])
        finally:
            for handle in handles:
                handle.remove()
    rel_budget = math.sqrt(2.0 * max(0.0, 1.0 - budgets.min_cosine))
    rows = [_layer_row(name, stats[name], layer_bits[name], budgets.min_cosine, rel_budget)
            for name in order + [n for n in layer_tensors if n not in order]]
    first = next((row for row in rows if row["over_budget"]), None)
    if first is None:
        first = next((row for row in rows if row["cumulative_over_budget"]), None)
        if first is not None:
            notes.append("no layer differs on its own; the drift starts at the first layer listed (look at the "
                         "ops between it and the previous conv: Add, Concat, Resize, MaxPool)")
    return LayerReport(rows, first, rel_budget, budgets.min_cosine, notes)


# --------------------------------------------------------------------------------------------- noise floor
NOISE_FLOOR_TRIALS = 6


class NoisyTorchRunner(TorchRunner):
    """A TorchRunner adding Gaussian noise to some submodules' outputs: std = relative size * RMS of the output."""

    def __init__(self, module, input_names, output_names, noisy_modules: list[tuple[object, float]], seed: int):
        super().__init__(module, input_names, output_names)

        self.noisy_modules = [(m, relative) for m, relative in noisy_modules if relative > 0]
        self.generator = torch.Generator().manual_seed(seed)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        def add_noise(relative):
            def hook(module, args, output):
                rms = output.detach().pow(2).mean().sqrt()
                return output + relative * rms * torch.randn(output.shape, generator=self.generator).to(output)
            return hook

        handles = [m.register_forward_hook(add_noise(relative)) for m, relative in self.noisy_modules]
        try:
            return super().infer(feed)
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class NoiseFloor:
    """Noisy-PyTorch runs through the gate: how often this model passes its budgets on rounding noise alone."""

    relative_noise: dict[str, float]
    trials: list[dict]

    @property
    def passed_trials(self) -> int:
        return sum(trial["passed"] for trial in self.trials)

    @property
    def at_noise_floor(self) -> bool:
        """Some noisy PyTorch runs fail the same budgets: float32 rounding alone can fail this gate."""
        return self.passed_trials < len(self.trials)

    def to_dict(self) -> dict:
        return {"relative_noise": self.relative_noise, "trials": self.trials, "passed_trials": self.passed_trials,
                "at_noise_floor": self.at_noise_floor}

    def summary(self) -> str:
        noise = [v for v in self.relative_noise.values() if v > 0]
        worst_cosine = min(trial["min_cosine"] for trial in self.trials)
        worst_delta = max(trial["max_score_delta"] for trial in self.trials)
        verdict = ("at this model's float32 noise floor: rounding alone moves its outputs this much"
                   if self.at_noise_floor else "beyond rounding noise: look at the layers above")
        return (f"noise floor: PyTorch with each layer's own float difference injected (relative "
                f"{min(noise, default=0):.1e}..{max(noise, default=0):.1e}) passes these budgets in "
                f"{self.passed_trials} of {len(self.trials)} runs (worst cosine {worst_cosine:.6f}, score delta up to "
                f"{worst_delta:.4f}): {verdict}")


def noise_floor(reference_module, detector, parity_set, layer_report: LayerReport, budgets: Budgets,
                trials: int = NOISE_FLOOR_TRIALS) -> NoiseFloor:
    """Run the gate `trials` times on `reference_module` (what made the parity set's outputs) with the per-layer
    float differences of `layer_report` injected into `detector`'s layers (its submodules, by the report's names)."""

    # Only rounding-sized differences are noise: a layer over budget on its own (a wrong scale) is left out.
    relative_noise = {row["name"]: float(row["conv"]["relative_error"]) for row in layer_report.layers
                      if row.get("conv") and not row["over_budget"] and math.isfinite(row["conv"]["relative_error"])}
    noisy = [(layer_output_module(detector, name), relative) for name, relative in relative_noise.items()]
    results = []
    for seed in range(trials):
        runner = NoisyTorchRunner(reference_module, parity_set.input_names, parity_set.output_names, noisy, seed)
        report = run_parity(parity_set, runner, budgets).to_dict()
        cosines = [o["min_cosine_per_image"] for o in report["outputs"].values() if o.get("min_cosine_per_image") is not None]
        detections = report.get("detections") or {}
        results.append({"seed": seed, "passed": bool(report["passed"]), "min_cosine": min(cosines, default=1.0),
                        "max_score_delta": float(detections.get("max_score_delta") or 0.0),
                        "failures": list(report["failures"])})
    return NoiseFloor(relative_noise, results)
