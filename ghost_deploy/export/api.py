"""`export_onnx`: checkpoint -> QDQ (or FP32) ONNX, checked, linted and parity-gated against PyTorch.

Artifacts beside `out_path` (stem = its name without `.onnx`):
  <stem>.onnx          the model (only when every check passed)
  <stem>.FAILED.onnx   instead, when a check failed (bits, lint or parity), so nobody deploys it by accident
  <stem>.parity.npz    inputs + PyTorch reference outputs, hashed (parityset.py), for engine builds elsewhere
  <stem>.export.json   the report (always)
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ghost_deploy import __version__
from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.contract import CheckpointHeader, OnnxMetadata, ParityMeta
from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.export import onnx_qdq, torch_graph
from ghost_deploy.export.checks import bits_preserved, quantization_signature, signature_changes
from ghost_deploy.export.cpu_form import to_cpu_form
from ghost_deploy.export.lint import Finding, errors, lint_qdq
from ghost_deploy.export.localise import localise, noise_floor
from ghost_deploy.export.metadata import load_our_onnx, read_metadata, set_metadata
from ghost_deploy.export.reference import TorchRunner, check_exact_parity
from ghost_deploy.io import (
    destination_errors,
    make_parent_folder,
    pid_temp_path,
    remove_stale_temps,
    sha256_file,
    write_json_atomic,
)
from ghost_deploy.model.detector import INPUT_CHANNELS
from ghost_deploy.onnx_graph import name_tensors_after_nodes
from ghost_deploy.parity.gate import compare_with_reference, run_gate, run_in_chunks
from ghost_deploy.parity.inputs import (
    budgets_from_recipe,
    parity_arithmetic as recipe_arithmetic,
    parity_image_count,
    parity_source,
    resolve_parity_inputs,
)
from ghost_deploy.parity.parityset import ParitySet, save_parity_set
from ghost_deploy.quant import fold_bn
from ghost_deploy.quant.trace import conv_names

REPORT_FORMAT = "ghost-deploy/export-report/v1"
TARGETS = ("trt", "cpu")
TORCH_EXPORT_OPSET = 17  # the TorchScript exporter's well-trodden opset; higher opsets are converted after
MIN_OPSET = 13
MAX_OPSET = 21
TENSORRT_INT4_NOTE = ("TensorRT INT4 is weight-only (block quantization for MatMul/GEMM); there is no INT4 "
                      "convolution, so engines carry sub-8-bit conv weights in INT8 containers. The bit widths buy "
                      "fidelity to the trained model and artifact size, not engine speed.")
DECODED_OUTPUT = "boxes"
ORT_KERNELS_NOTE = ("not gated: the gate runs the graph as written (bit-identical to the trt form); ONNX Runtime's "
                    "integer kernels round each conv's float bias to int32 at s_in*s_w/k and requantize in their own "
                    "way, so codes can move by one step and drift through the network")


@dataclass
class ExportResult:
    onnx_path: Path  # the final ONNX, or the .FAILED.onnx when `passed` is False
    report_path: Path
    parity_set_path: Path | None
    passed: bool
    layers: list[dict]  # per quantized conv: container, codes in range, equal to trained, "bits preserved"
    lint: list[Finding]
    parity: object | None  # compare.ParityReport
    per_layer: object | None  # parity.LayerReport
    report: dict = field(default_factory=dict)
    noise_floor: object | None = None  # parity.NoiseFloor, with the localisation
    exact: object | None = None  # exact_parity.ExactResult
    own_rounding: object | None = None  # compare.ParityReport: PyTorch's float32 run against its exact arithmetic

    @property
    def bits_preserved(self) -> dict[str, bool]:
        return {row["layer"]: row["status"] == "bits preserved" for row in self.layers if row["weight_bits"]}


def sidecar_paths(out_path: Path) -> dict[str, Path]:
    stem = out_path.name[: -len(".onnx")] if out_path.name.endswith(".onnx") else out_path.name
    return {"failed": out_path.with_name(f"{stem}.FAILED.onnx"), "parity": out_path.with_name(f"{stem}.parity.npz"),
            "report": out_path.with_name(f"{stem}.export.json")}


def check_options(target, opset, fp32, int4_weights) -> int:
    if target not in TARGETS:
        raise UserError("--target", f"must be one of {', '.join(TARGETS)}, got {target!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError("--opset", f"must be an integer in {MIN_OPSET}..{MAX_OPSET} (per-channel Q/DQ needs 13), got {opset!r}")
    if fp32 and int4_weights:
        raise UserError("--int4-weights", "an FP32 export has no integer weights")
    if int4_weights and target == "cpu":
        raise UserError("--int4-weights", "target cpu writes weights the way ONNX Runtime's kernels want them; "
                                          "INT4 is a storage option for the trt target")
    return max(opset, onnx_qdq.INT4_OPSET) if int4_weights else opset


@dataclass
class ExportOptions:
    """What `export_onnx` was asked for (the report records it)."""

    fp32: bool = False
    int4_weights: bool = False
    simplify: bool = True
    opset: int = 17
    target: str = "trt"
    decode: bool = False
    parity: bool = True
    parity_images: str | None = None
    per_layer: bool = False
    data: str | None = None
    parity_arithmetic: str | None = None
    parity_config: dict | None = None
    parity_count: int | None = None

    def to_report(self, final_opset: int) -> dict:
        return {"fp32": self.fp32, "int4_weights": self.int4_weights, "simplify": self.simplify, "opset": final_opset,
                "target": self.target, "decode": self.decode, "parity": self.parity, "per_layer": self.per_layer,
                "parity_arithmetic": self.parity_arithmetic, "parity_count": self.parity_count,
                "parity_images": None if self.parity_images is None else str(self.parity_images),
                "data": None if self.data is None else str(self.data)}


@dataclass
class BuiltExport:
    """The graph as built from the checkpoint, before any check."""

    graph: onnx.ModelProto
    trt_form: onnx.ModelProto  # what the exact-arithmetic check rewrites (the CPU form re-encodes it)
    convs: dict
    acts: dict
    reference: object  # the PyTorch model the parity reference runs
    header: CheckpointHeader
    checkpoint_path: Path
    input_names: list[str]
    output_names: list[str]
    heads: list[str]
    img_size: int
    final_opset: int
    checkpoint_sha: str | None
    int4_layers: list
    cpu_summary: object
    qdq_counts: dict
    simplify_note: str
    timings: dict


@dataclass
class GraphChecks:
    layers: list[dict]
    bits_ok: bool
    findings: list
    lint_note: str
    output_scales: dict

    @property
    def lint_errors(self) -> list:
        return errors(self.findings)


@dataclass
class GateOutcome:
    """What the parity step found; every field None/default when parity was skipped."""

    report: object = None
    layer_report: object = None
    parity_set: object = None
    kernels_report: object = None
    floor: object = None
    exact: object = None
    own_rounding: object = None
    arithmetic: str = "float32"
    passed: bool = True
    note: str = "skipped (parity=False)"


def export_onnx(checkpoint_path, out_path, *, fp32: bool = False, int4_weights: bool = False, simplify: bool = True,
                opset: int = 17, target: str = "trt", decode: bool = False, parity: bool = True,
                parity_images=None, per_layer: bool = False, data=None, progress: bool = True,
                parity_arithmetic: str | None = None, parity_config: dict | None = None,
                parity_count: int | None = None) -> ExportResult:
    """Export a checkpoint to ONNX with explicit quantization and gate it on parity with PyTorch.

    `parity_arithmetic` ("float32" or "exact", default: the recipe's) picks the comparison that decides the gate;
    both run (parity/exact.py). `parity_config` replaces the checkpoint's recipe `parity` section (budgets, images,
    arithmetic), e.g. with the one of the recipe a pipeline runs. `parity_count` (--parity-count) overrides how many
    images the parity set holds (recipe parity.images, default 8).

    Raises UserError for bad input and ParityError when the bits, the TensorRT lint or the parity gate fail
    (the report is written and the ONNX kept only as <stem>.FAILED.onnx).
    """
    options = ExportOptions(fp32, int4_weights, simplify, opset, target, decode, parity, parity_images, per_layer,
                            data, parity_arithmetic, parity_config, parity_count)
    if parity_count is not None and (isinstance(parity_count, bool) or not isinstance(parity_count, int)
                                     or parity_count < 1):
        raise UserError("--parity-count", f"must be a positive integer, got {parity_count!r}")
    started = time.perf_counter()
    log = print if progress else (lambda *a, **k: None)
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    paths = sidecar_paths(out_path)
    if any(path.resolve() == checkpoint_path.resolve() for path in (out_path, *paths.values())):
        raise UserError("--out", f"{out_path} would overwrite the checkpoint being exported ({checkpoint_path}); "
                                 "choose another --out")
    built = build_export(checkpoint_path, options, log)
    checks = check_graph(built, options)
    # Every consumer (ORT, TensorRT, onnx) infers the shapes again; stored, they were 6% of the file.
    del built.graph.graph.value_info[:]
    name_tensors_after_nodes(built.graph)
    metadata = set_metadata(built.graph, _onnx_metadata(built, options))  # last change: the hash covers it
    make_parent_folder(out_path)
    remove_stale_temps(out_path.parent)  # the .checking.onnx of an export killed before its rename
    checking = pid_temp_path(out_path, "checking.onnx")
    try:
        with destination_errors(out_path, every_oserror=True):
            onnx.save(built.graph, str(checking))
        gate = run_export_gate(built, checks, options, checking) if parity else GateOutcome()
        passed = checks.bits_ok and not checks.lint_errors and gate.passed
        final = out_path if passed else paths["failed"]
        with destination_errors(final, every_oserror=True):
            os.replace(checking, final)
    finally:
        with contextlib.suppress(OSError):
            checking.unlink()
    for old in ([out_path, paths["parity"]] if not passed else [paths["failed"]]):
        _remove_if_ours(old)
    onnx_sha = sha256_file(final)
    parity_path, parity_sha = _save_parity_set(gate, paths["parity"], onnx_sha,
                                                 metadata[OnnxMetadata.HASH_KEY]) if passed else (None, None)
    built.timings["total_s"] = round(time.perf_counter() - started, 3)
    report = export_report(built, checks, gate, options, checkpoint_path, final, onnx_sha, parity_path, parity_sha,
                           metadata, passed)
    write_json_atomic(paths["report"], report)
    result = ExportResult(final, paths["report"], parity_path, passed, checks.layers, checks.findings, gate.report,
                          gate.layer_report, report, gate.floor, gate.exact, gate.own_rounding)
    if progress:
        log(format_report(result))
    if not passed:
        raise ParityError(_failure_message(result), report)
    return result


def build_export(checkpoint_path: Path, options: ExportOptions, log) -> BuiltExport:
    """Checkpoint -> QDQ (or FP32) graph: torch export, opset upgrade, simplify, INT4 weights, CPU form."""
    started = time.perf_counter()
    final_opset = check_options(options.target, options.opset, options.fp32, options.int4_weights)
    if options.parity_arithmetic not in (None, "float32", "exact"):
        raise UserError("--parity-arithmetic", f"must be float32 or exact, got {options.parity_arithmetic!r}")
    checkpoint_sha = sha256_file(checkpoint_path) if checkpoint_path.is_file() else None
    model, header = model_from_checkpoint(checkpoint_path, with_sr=False)
    if not options.fp32 and not header.quantized:
        raise UserError(checkpoint_path, "checkpoint has no bit plan (an FP32 model): export it with --fp32 (fp32=True from Python)")
    if options.parity:  # a missing parity source is refused now, not after the graph is built
        parity_source(header, checkpoint_path, options.parity_images, options.data)
    img_size = int(header.img_size)
    input_names = list(header.input_names or model.input_names)
    heads = torch_graph.head_names(header.strides)
    output_names = heads + ([DECODED_OUTPUT] if options.decode else [])
    log(f"export: {checkpoint_path} ({'FP32' if options.fp32 else 'QDQ'}, target {options.target}, opset {final_opset})")
    graph, convs, acts, reference = _build_graph(model, header, options.fp32, options.decode, img_size, input_names,
                                                 output_names)
    timings = {"torch_export_s": round(time.perf_counter() - started, 3)}
    if final_opset > TORCH_EXPORT_OPSET:
        graph = onnx_qdq.upgrade_opset(graph, final_opset)
    counts = {"before_simplify": onnx_qdq.qdq_counts(graph)}
    simplify_note = _simplify(graph, options.simplify) if options.simplify else "skipped (simplify=False)"
    if isinstance(simplify_note, tuple):
        graph, simplify_note = simplify_note
    counts["after_simplify"] = onnx_qdq.qdq_counts(graph)
    int4_layers = onnx_qdq.store_int4_weights(graph, convs) if options.int4_weights else []
    cpu_summary, trt_form = None, graph
    if options.target == "cpu" and not options.fp32:
        trt_form = copy.deepcopy(graph)
        cpu_summary = to_cpu_form(graph)
    return BuiltExport(_check_graph(graph), trt_form, convs, acts, reference, header, checkpoint_path, input_names,
                       output_names, heads, img_size, final_opset, checkpoint_sha, int4_layers, cpu_summary, counts,
                       simplify_note, timings)


def check_graph(built: BuiltExport, options: ExportOptions) -> GraphChecks:
    """Checks on the graph itself: bits preserved per layer, TensorRT lint, head output scales."""
    layers = _layer_rows(built.graph, built.convs, built.acts) if not options.fp32 else []
    bits_ok = all(row["status"] in ("bits preserved", "float weights") for row in layers)
    if options.target == "trt":
        findings, lint_note = lint_qdq(built.graph), "TensorRT 10.x/11.x explicit-quantization rules"
    else:
        findings, lint_note = [], "skipped: target cpu is ONNX Runtime's form (u8 codes, code clips), not for TensorRT"
    output_scales = {} if options.fp32 else _head_scales(built.graph, built.heads, built.convs, built.acts)
    return GraphChecks(layers, bits_ok, findings, lint_note, output_scales)


def _onnx_metadata(built: BuiltExport, options: ExportOptions) -> OnnxMetadata:
    header = built.header
    return OnnxMetadata(
        model=str(header.model), nc=int(header.nc), names=list(header.names), input_mode=str(header.input_mode),
        input_names=built.input_names, img_size=built.img_size, strides=list(header.strides),
        anchors=header.anchors_pixels, head_output_names=built.heads, output_names=built.output_names,
        bit_plan=None if options.fp32 else header.bit_plan, precision="fp32" if options.fp32 else "qdq",
        target=options.target, int4_weights=bool(built.int4_layers), checkpoint_sha256=built.checkpoint_sha or "",
        exporter=f"ghost-deploy {__version__}")


def run_export_gate(built: BuiltExport, checks: GraphChecks, options: ExportOptions, checking: Path) -> GateOutcome:
    """The parity step: the reference parity set, ORT on the file as written, exact arithmetic, and on a failure
    (or --per-layer) the per-layer localisation and the float32 noise floor."""
    gate_started = time.perf_counter()
    header, fp32 = built.header, options.fp32
    # the checkpoint's recipe, unless the caller brings its own parity section (the pipeline: its run's recipe)
    parity_recipe = header.recipe if options.parity_config is None else {"parity": options.parity_config}
    budgets = budgets_from_recipe(parity_recipe)
    count = options.parity_count or parity_image_count(parity_recipe)
    parity_inputs = resolve_parity_inputs(header, built.img_size, count, options.parity_images, options.data,
                                          checkpoint=built.checkpoint_path)
    lap = _Laps(built.timings)
    parity_set = _reference_parity_set(built, options.decode, parity_inputs, budgets, checks.output_scales)
    lap("parity_reference_s")
    gate = GateOutcome(parity_set=parity_set, note=f"{parity_inputs.count} images from {parity_inputs.source}")
    # the gate checks what the file computes (ORT's Q/DQ rewrites off); see parity.runners.OrtRunner
    gate.report = run_gate(parity_set, checking, budgets, exact=True)
    if options.target == "cpu":  # and, for information, what ORT's integer kernels make of it
        gate.kernels_report = run_gate(parity_set, checking, budgets, exact=False)
    lap("parity_float32_s")
    # exact arithmetic is about quantized convs: an FP32 export is compared as written
    gate.arithmetic = "float32" if fp32 else options.parity_arithmetic or recipe_arithmetic(parity_recipe)
    gate.passed = gate.report.passed
    if not fp32:
        gate.exact = check_exact_parity(built.reference, header, built.trt_form, parity_set, budgets, built.img_size,
                                        options.decode, cpu_form=checking if options.target == "cpu" else None)
        if gate.arithmetic == "exact":
            gate.passed = gate.exact.passed
        lap("parity_exact_s")
    if gate.passed and not gate.report.passed and gate.exact is not None:
        # Exact arithmetic passed, so the float32 difference is rounding; how much rounding alone moves this model
        # is measured for free: PyTorch's own float32 run against its exact-arithmetic run, same images and budgets.
        gate.own_rounding = compare_with_reference(parity_set, parity_set.outputs, budgets,
                                                   reference=gate.exact.reference_outputs)
    if options.per_layer or not gate.passed:
        layer_bits = {name: (spec.weight_bits, built.acts[spec.act_key].bits if spec.act_key else None)
                      for name, spec in built.convs.items()} if not fp32 else \
                     {name: (None, None) for name in conv_names(built.reference)}
        gate.layer_report = localise(built.reference, built.graph, parity_inputs.inputs, layer_bits, budgets, exact=True)
        lap("localise_s")
        wrapper = torch_graph.make_wrapper(built.reference, header, built.img_size, options.decode)
        gate.floor = noise_floor(wrapper, built.reference, parity_set, gate.layer_report, budgets)
        lap("noise_floor_s")
    built.timings["parity_s"] = round(time.perf_counter() - gate_started, 3)
    return gate


def _save_parity_set(gate: GateOutcome, path: Path, onnx_sha: str, graph_sha: str):
    if gate.parity_set is None:
        return None, None
    parity_set = gate.parity_set
    if gate.arithmetic == "exact" and gate.exact is not None:  # engines are then held to the exact reference too
        parity_set.outputs = gate.exact.reference_outputs
        parity_set.meta.reference = ("PyTorch, the checkpoint's model with BN folded, each conv accumulating "
                                     "its integer codes exactly (exact arithmetic, as TensorRT's INT8 convs)")
    parity_set.meta.arithmetic = gate.arithmetic
    parity_set.meta.onnx_sha256 = onnx_sha
    parity_set.meta.graph_sha256 = graph_sha
    return path, save_parity_set(path, parity_set.inputs, parity_set.outputs, parity_set.meta)


def export_report(built: BuiltExport, checks: GraphChecks, gate: GateOutcome, options: ExportOptions, checkpoint_path,
                  final: Path, onnx_sha: str, parity_path, parity_sha, metadata: dict, passed: bool) -> dict:
    """The JSON report written beside every export."""
    findings, lint_errors = checks.findings, checks.lint_errors
    return {
        "format": REPORT_FORMAT, "passed": passed, "exporter": f"ghost-deploy {__version__}",
        "checkpoint": str(checkpoint_path), "checkpoint_sha256": built.checkpoint_sha,
        "onnx": str(final), "onnx_sha256": onnx_sha, "onnx_bytes": final.stat().st_size,
        "parity_set": None if parity_path is None else str(parity_path), "parity_set_sha256": parity_sha,
        "options": options.to_report(built.final_opset),
        "inputs": built.input_names, "outputs": built.output_names, "img_size": built.img_size,
        "qdq_counts": built.qdq_counts, "simplify": built.simplify_note, "int4_layers": built.int4_layers,
        "cpu_form": None if built.cpu_summary is None else built.cpu_summary.to_dict(),
        "layers": checks.layers, "bits_preserved": checks.bits_ok,
        "lint": {"rules": checks.lint_note, "errors": len(lint_errors), "warnings": len(findings) - len(lint_errors),
                 "findings": [f.to_dict() for f in findings]},
        "parity": {"source": gate.note, "report": None if gate.report is None else gate.report.to_dict(),
                   "per_layer": None if gate.layer_report is None else gate.layer_report.to_dict(),
                   "noise_floor": None if gate.floor is None else gate.floor.to_dict(),
                   "float32_own_rounding": None if gate.own_rounding is None else gate.own_rounding.to_dict(),
                   "arithmetic": gate.arithmetic if gate.report is not None else None,
                   "exact_arithmetic": None if gate.exact is None else gate.exact.to_dict(),
                   "ort_integer_kernels": None if gate.kernels_report is None else gate.kernels_report.to_dict(),
                   "ort_integer_kernels_note": None if gate.kernels_report is None else ORT_KERNELS_NOTE},
        "metadata_keys": sorted(metadata), "notes": [TENSORRT_INT4_NOTE], "timings": built.timings,
    }


# ------------------------------------------------------------------------------------------------ steps
def _build_graph(model, meta, fp32, decode, img_size, input_names, output_names):
    if fp32:
        reference = torch_graph.float_copy(model)
        export_model = fold_bn(reference)
        convs = {name: torch_graph.ConvSpec(name, None, None) for name in conv_names(reference)}
        acts = {}
    else:
        reference = model
        convs, acts, export_model = torch_graph.conv_specs(model)
        torch_graph.install_markers(export_model)
    wrapper = torch_graph.make_wrapper(export_model, meta, img_size, decode)
    examples = tuple(torch.zeros(1, INPUT_CHANNELS[name], img_size, img_size) for name in input_names)
    graph = torch_graph.export_float_graph(wrapper, input_names, output_names, examples, TORCH_EXPORT_OPSET,
                                           markers=not fp32)
    if fp32:
        onnx_qdq.name_conv_nodes(graph, convs)
    else:
        onnx_qdq.write_qdq(graph, convs, acts)
    onnx_qdq.readable_node_names(graph)
    graph.graph.name = f"{meta.model}-{'fp32' if fp32 else 'qdq'}"
    return graph, convs, acts, reference


def _simplify(graph: onnx.ModelProto, enabled: bool):
    """onnxsim with a guard: every Q/DQ (types, scales, zero-points, codes, axis) must come out unchanged."""
    try:
        import onnxsim
    except ImportError:
        return "skipped: onnxsim is not installed"
    before = quantization_signature(graph)
    options = {"skipped_optimizers": ["eliminate_duplicate_initializer"]}  # keep per-layer initializer names
    try:
        try:
            simplified, ok = onnxsim.simplify(graph, certify=False, **options)
        except TypeError:  # onnxsim releases without `certify`
            simplified, ok = onnxsim.simplify(graph, **options)
    except Exception as exc:  # onnxsim raises a variety of runtime errors on unusual graphs
        return f"skipped: onnxsim failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not ok:
        return "skipped: onnxsim could not verify its result"
    changes = signature_changes(before, quantization_signature(simplified))
    if changes:
        return f"skipped: onnxsim changed the quantization ({'; '.join(changes[:3])}); kept the unsimplified graph"
    del simplified.metadata_props[:]
    return simplified, "onnxsim: Q/DQ nodes, types, scales, zero-points and codes unchanged"


def _check_graph(graph: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker (full) and strict shape inference; a failure here is an exporter bug, reported as such."""
    try:
        inferred = onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True)
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(f"exported graph fails the ONNX checker: {exc}") from exc
    return inferred


def _layer_rows(graph, convs, acts) -> list[dict]:
    rows = bits_preserved(graph, convs)
    for row in rows:
        key = convs[row["layer"]].act_key
        row["act_bits"] = acts[key].bits if key else None
    return rows


def _head_scales(graph, heads, convs, acts) -> dict[str, float]:
    """Per head: s_in * max|w|, the largest change one step of the head conv's input code can make to an output.

    The unit of the comparator's 'max abs error in output scale': an error of k means the outputs moved as much
    as k one-step flips of the head's input would (flips at rounding ties are expected across runtimes).
    """
    producers = {node.output[0]: node for node in graph.graph.node}
    scales = {}
    for head in heads:
        node = producers.get(head)
        spec = convs.get(node.name) if node is not None else None
        if spec is None or spec.weight_scale is None or spec.act_key is None:
            continue
        max_weight = float(np.max(np.abs(spec.codes.astype(np.float32)) * spec.weight_scale[:, None, None, None]))
        scales[head] = float(acts[spec.act_key].scale) * max_weight
    return scales


class _Laps:
    """Seconds since the previous lap, recorded into the export's timings under the given key."""

    def __init__(self, timings: dict):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, key: str) -> None:
        now = time.perf_counter()
        self.timings[key] = round(now - self.last, 3)
        self.last = now


def _reference_parity_set(built: BuiltExport, decode: bool, parity_inputs, budgets, output_scales) -> ParitySet:
    header = built.header
    runner = TorchRunner(torch_graph.make_wrapper(built.reference, header, built.img_size, decode), built.input_names,
                         built.output_names)
    outputs = run_in_chunks(runner, parity_inputs.inputs, batch_size=1)  # memory of one image's activations
    meta = ParityMeta(
        input_names=built.input_names, output_names=built.output_names, head_output_names=built.heads,
        image_paths=parity_inputs.paths, image_sha256=parity_inputs.sha256, image_source=parity_inputs.source,
        img_size=built.img_size, strides=list(header.strides), anchors_pixels=header.anchors_pixels,
        nc=int(header.nc), names=list(header.names), budgets=budgets.to_dict(), output_scales=output_scales,
        checkpoint_sha256=built.checkpoint_sha,
        reference="PyTorch, the checkpoint's model in eval mode (fake quantization, BN not folded)")
    return ParitySet(inputs=parity_inputs.inputs, outputs=outputs, meta=meta, sha256="", path=None,
                     input_names=built.input_names, output_names=built.output_names)


def _remove_if_ours(path: Path) -> None:
    """A stale artifact of an earlier export under a name this run supersedes (only files we wrote)."""
    if not path.is_file():
        return
    if path.suffix == ".onnx":
        try:
            load_our_onnx(path)
        except UserError:
            return
    elif not path.name.endswith(".parity.npz"):
        return
    path.unlink()


def _failure_message(result: ExportResult) -> str:
    parts = []
    bad_bits = [row["layer"] for row in result.layers if row["status"] not in ("bits preserved", "float weights")]
    if bad_bits:
        parts.append(f"bits not preserved in {len(bad_bits)} layer(s) (first {bad_bits[0]})")
    lint_errors = errors(result.lint)
    if lint_errors:
        parts.append(f"{len(lint_errors)} TensorRT lint error(s) (first: {lint_errors[0]})")
    by_exact = result.report.get("parity", {}).get("arithmetic") == "exact" and result.exact is not None
    exact_failed = by_exact and not result.exact.passed
    float32_failed = not by_exact and result.parity is not None and not result.parity.passed
    if exact_failed:
        parts.append(result.exact.summary())
    elif float32_failed:
        parts.append("; ".join(result.parity.failures))
        if result.noise_floor is not None:
            floor = result.noise_floor
            parts.append(f"{'at the model' if floor.at_noise_floor else 'beyond the model'}'s float32 noise floor "
                         f"({floor.passed_trials}/{len(floor.trials)} noisy PyTorch runs pass)")
        if result.exact is not None:
            parts.append(f"exact arithmetic: {result.exact.verdict()}")
    first = result.per_layer.first_over_budget if result.per_layer else None
    if first and (exact_failed or float32_failed):
        parts.append(f"first layer over budget: {first['name']} (W{first['weight_bits']} A{first['act_bits']}, "
                     f"{first['status']})")
    return f"{result.onnx_path}: " + "; ".join(parts) + f" (report: {result.report_path})"


# ------------------------------------------------------------------------------------------------ report
def format_report(result: ExportResult) -> str:
    report = result.report
    lines = []
    if result.layers:
        width = max(len(row["layer"]) for row in result.layers)
        lines.append(f"{'layer':<{width}}  {'W':>2}  {'A':>2}  {'container':<22}  status")
        for row in result.layers:
            lines.append(f"{row['layer']:<{width}}  {_bits(row['weight_bits']):>2}  {_bits(row['act_bits']):>2}  "
                         f"{row['container']:<22}  {row['status']}")
    counts = report["qdq_counts"]["after_simplify"]
    lines.append(f"Q/DQ: {counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} DequantizeLinear "
                 f"({counts['weight_dq']} on weights); simplify: {report['simplify']}")
    if report["int4_layers"]:
        lines.append(f"INT4 containers: {len(report['int4_layers'])} layers. {TENSORRT_INT4_NOTE}")
    if report["cpu_form"]:
        cpu = report["cpu_form"]
        lines.append(f"CPU form: {len(cpu['integer_convs'])} convs integer (QLinearConv in ORT), "
                     f"{len(cpu['float_convs'])} run in float")
    lint = report["lint"]
    lines.append(f"lint ({lint['rules']}): {lint['errors']} errors, {lint['warnings']} warnings")
    lines += [f"  {finding}" for finding in result.lint[:20]]
    if result.parity is not None:
        role = ("reported; exact arithmetic decides the gate" if report["parity"]["arithmetic"] == "exact"
                else "decides the gate")
        lines.append(f"parity vs PyTorch, the graph as written in float32 ({role}; {report['parity']['source']}):")
        lines.append(result.parity.format_table())
        kernels = report["parity"]["ort_integer_kernels"]
        if kernels is not None:
            worst = min((v["min_cosine_per_image"] for v in kernels["outputs"].values()
                         if v.get("min_cosine_per_image") is not None), default=float("nan"))
            lines.append(f"as ONNX Runtime's integer kernels run it: worst cosine {worst:.6f}, "
                         f"{'within' if kernels['passed'] else 'outside'} the budget ({ORT_KERNELS_NOTE})")
    else:
        lines.append(f"parity: {report['parity']['source']}")
    if result.per_layer is not None:
        lines.append(result.per_layer.format_table())
    if result.noise_floor is not None:
        lines.append(result.noise_floor.summary())
    if result.own_rounding is not None:
        lines.append(own_rounding_summary(result.own_rounding))
    if result.exact is not None:
        decides = report["parity"]["arithmetic"] == "exact"
        lines.append(result.exact.summary() + (" [decides the gate: parity.arithmetic exact]" if decides else
                                               " [reported; the float32 comparison decides the gate]"))
    lines.append(f"{'PASSED' if result.passed else 'FAILED'}: {result.onnx_path} ({report['onnx_bytes'] / 1e6:.2f} MB, "
                 f"{report['timings']['total_s']:.1f} s); report {result.report_path}"
                 + (f"; parity set {result.parity_set_path}" if result.parity_set_path else ""))
    return "\n".join(lines)


def own_rounding_summary(report) -> str:
    """The float32 noise floor measured without extra runs: PyTorch float32 vs the same model in exact arithmetic."""
    cosines = [o["min_cosine_per_image"] for o in report.to_dict()["outputs"].values()
               if o.get("min_cosine_per_image") is not None]
    verdict = ("the float32 comparison above is at this model's float32 noise floor: PyTorch's own float32 rounding "
               "fails the same budgets" if not report.passed else
               "PyTorch's own float32 rounding stays within these budgets (the float32 difference above is the "
               "runtimes' summation order)")
    return (f"float32 noise floor: PyTorch float32 vs the same model in exact arithmetic, worst cosine "
            f"{min(cosines, default=float('nan')):.6f}: {verdict} (--per-layer localises and injects it layer by layer)")


def _bits(bits) -> str:
    return "FP" if bits is None else str(bits)


__all__ = ["export_onnx", "ExportResult", "format_report", "sidecar_paths", "TENSORRT_INT4_NOTE", "read_metadata"]
