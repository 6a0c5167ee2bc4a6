"""`export_onnx`: checkpoint -> QDQ (or FP32) ONNX, checked, linted and parity-gated against PyTorch.

Artifacts beside `out_path` (stem = its name without `.onnx`):
  <stem>.onnx          the model (only when every check passed)
  <stem>.FAILED.onnx   instead, when a check failed (bits, lint or parity), so nobody deploys it by accident
  <stem>.parity.npz    inputs + PyTorch reference outputs, hashed (parityset.py), for engine builds elsewhere
  <stem>.export.json   the report (always)
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..errors import ParityError, UserError
from ..io import sha256_file, write_json_atomic
from . import onnx_qdq, torch_graph
from .checks import bits_preserved, quantization_signature, signature_changes
from .graph import name_tensors_after_nodes
from .lint import Finding, errors, lint_qdq
from .metadata import load_our_onnx, read_metadata, set_metadata

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

    @property
    def bits_preserved(self) -> dict[str, bool]:
        return {row["layer"]: row["status"] == "bits preserved" for row in self.layers if row["weight_bits"]}


def sidecar_paths(out_path: Path) -> dict[str, Path]:
    stem = out_path.name[: -len(".onnx")] if out_path.name.endswith(".onnx") else out_path.name
    return {"failed": out_path.with_name(f"{stem}.FAILED.onnx"), "parity": out_path.with_name(f"{stem}.parity.npz"),
            "report": out_path.with_name(f"{stem}.export.json")}


def _check_options(target, opset, fp32, int4_weights) -> int:
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


def export_onnx(checkpoint_path, out_path, *, fp32: bool = False, int4_weights: bool = False, simplify: bool = True,
                opset: int = 17, target: str = "trt", decode: bool = False, parity: bool = True,
                parity_images=None, per_layer: bool = False, data=None, progress: bool = True,
                parity_arithmetic: str | None = None, parity_config: dict | None = None) -> ExportResult:
    """Export a checkpoint to ONNX with explicit quantization and gate it on parity with PyTorch.

    `parity_arithmetic` ("float32" or "exact", default: the recipe's) picks the comparison that decides the gate;
    both run (exact_parity.py). `parity_config` replaces the checkpoint's recipe `parity` section (budgets, images,
    arithmetic), e.g. with the one of the recipe a pipeline runs.

    Raises UserError for bad input and ParityError when the bits, the TensorRT lint or the parity gate fail
    (the report is written and the ONNX kept only as <stem>.FAILED.onnx).
    """
    from ..train import model_from_checkpoint

    started = time.perf_counter()
    log = print if progress else (lambda *a, **k: None)
    final_opset = _check_options(target, opset, fp32, int4_weights)
    if parity_arithmetic not in (None, "float32", "exact"):
        raise UserError("--parity-arithmetic", f"must be float32 or exact, got {parity_arithmetic!r}")
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    paths = sidecar_paths(out_path)
    checkpoint_sha = sha256_file(checkpoint_path) if checkpoint_path.is_file() else None
    model, meta = model_from_checkpoint(checkpoint_path, with_sr=False)
    quantized = bool(meta.get("bit_plan"))
    if not fp32 and not quantized:
        raise UserError(checkpoint_path, "checkpoint has no bit plan (an FP32 model): export it with fp32=True (--fp32)")
    img_size = int(meta["img_size"])
    input_names = list(meta.get("input_names") or model.input_names)
    heads = torch_graph.head_names(meta["strides"])
    output_names = heads + ([DECODED_OUTPUT] if decode else [])
    log(f"export: {checkpoint_path} -> {out_path} ({'FP32' if fp32 else 'QDQ'}, target {target}, opset {final_opset})")

    # --- the graph
    built = _build_graph(model, meta, fp32, decode, img_size, input_names, output_names)
    graph, convs, acts, reference = built
    timings = {"torch_export_s": round(time.perf_counter() - started, 3)}
    if final_opset > TORCH_EXPORT_OPSET:
        graph = onnx_qdq.upgrade_opset(graph, final_opset)
    counts_before = onnx_qdq.qdq_counts(graph)
    simplify_note = _simplify(graph, simplify) if simplify else "skipped (simplify=False)"
    if isinstance(simplify_note, tuple):
        graph, simplify_note = simplify_note
    counts_after = onnx_qdq.qdq_counts(graph)
    int4_layers = onnx_qdq.store_int4_weights(graph, convs) if int4_weights else []
    cpu_summary = None
    trt_form = graph  # what the exact-arithmetic check rewrites (the CPU form re-encodes it)
    if target == "cpu" and not fp32:
        from .cpu_form import to_cpu_form

        trt_form = copy.deepcopy(graph)
        cpu_summary = to_cpu_form(graph)
    graph = _check_graph(graph)

    # --- checks on the graph itself
    layers = _layer_rows(graph, convs, acts) if not fp32 else []
    bits_ok = all(row["status"] in ("bits preserved", "float weights") for row in layers)
    if target == "trt":
        findings = lint_qdq(graph)
        lint_note = "TensorRT 10.x/11.x explicit-quantization rules"
    else:
        findings, lint_note = [], "skipped: target cpu is ONNX Runtime's form (u8 codes, code clips), not for TensorRT"
    lint_errors = errors(findings)
    output_scales = {} if fp32 else _head_scales(graph, heads, convs, acts)

    # Every consumer (ORT, TensorRT, onnx) infers the shapes again; stored, they were 6% of the file.
    del graph.graph.value_info[:]
    name_tensors_after_nodes(graph)

    # --- metadata (last change to the graph: the hash covers it)
    metadata = set_metadata(graph, {
        "model": str(meta["model"]), "nc": int(meta["nc"]), "names": list(meta["names"]),
        "input_mode": str(meta["input_mode"]), "input_names": input_names, "img_size": img_size,
        "strides": list(meta["strides"]), "anchors": meta["anchors_pixels"], "head_output_names": heads,
        "output_names": output_names, "bit_plan": None if fp32 else meta["bit_plan"],
        "precision": "fp32" if fp32 else "qdq", "target": target, "int4_weights": bool(int4_layers),
        "checkpoint_sha256": checkpoint_sha or "", "exporter": f"ghost-deploy {__version__}",
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    checking = out_path.with_name(f".{out_path.name}.{os.getpid()}.checking.onnx")
    onnx.save(graph, str(checking))
    try:
        parity_report = layer_report = parity_set = parity_inputs = kernels_report = floor = exact = None
        arithmetic, parity_ok = "float32", True
        parity_note = "skipped (parity=False)"
        if parity:
            from ..parity import budgets_from_recipe, localise, noise_floor, parity_image_count, resolve_parity_inputs
            from ..parity import parity_arithmetic as recipe_arithmetic
            from ..parity import run_gate

            gate_started = time.perf_counter()
            # the checkpoint's recipe, unless the caller brings its own parity section (the pipeline: its run's recipe)
            parity_recipe = meta.get("recipe") if parity_config is None else {"parity": parity_config}
            budgets = budgets_from_recipe(parity_recipe)
            count = parity_image_count(parity_recipe)
            parity_inputs = resolve_parity_inputs(meta, img_size, count, parity_images, data)
            parity_set = _reference_parity_set(reference, meta, decode, img_size, input_names, output_names, heads,
                                               parity_inputs, budgets, output_scales, checkpoint_sha)
            # the gate checks what the file computes (ORT's Q/DQ rewrites off); see engines.runners.OrtRunner
            parity_report = run_gate(parity_set, checking, budgets, exact=True)
            if target == "cpu":  # and, for information, what ORT's integer kernels make of it
                kernels_report = run_gate(parity_set, checking, budgets, exact=False)
            # exact arithmetic is about quantized convs: an FP32 export is compared as written
            arithmetic = "float32" if fp32 else parity_arithmetic or recipe_arithmetic(parity_recipe)
            parity_ok = parity_report.passed
            if not fp32:
                from ..exact_parity import check_exact_parity

                exact = check_exact_parity(reference, meta, trt_form, parity_set, budgets, img_size, decode,
                                           cpu_form=checking if target == "cpu" else None)
                if arithmetic == "exact":
                    parity_ok = exact.passed
            parity_note = f"{parity_inputs.count} images from {parity_inputs.source}"
            if per_layer or not parity_ok or not parity_report.passed:
                layer_bits = {name: (spec.weight_bits, acts[spec.act_key].bits if spec.act_key else None)
                              for name, spec in convs.items()} if not fp32 else \
                             {name: (None, None) for name in _conv_names(reference)}
                layer_report = localise(reference, graph, parity_inputs.inputs, layer_bits, budgets, exact=True)
                floor = noise_floor(torch_graph.make_wrapper(reference, meta, img_size, decode), reference, parity_set,
                                    layer_report, budgets)
            timings["parity_s"] = round(time.perf_counter() - gate_started, 3)
        passed = bits_ok and not lint_errors and parity_ok
        final = out_path if passed else paths["failed"]
        os.replace(checking, final)
    finally:
        if checking.exists():
            checking.unlink()

    onnx_sha = sha256_file(final)
    parity_path = None
    stale = [out_path, paths["parity"]] if not passed else [paths["failed"]]
    for old in stale:
        _remove_if_ours(old)
    if passed and parity_set is not None:
        from ..parityset import save_parity_set

        if arithmetic == "exact" and exact is not None:  # engines are then held to the exact reference too
            parity_set.outputs = exact.reference_outputs
            parity_set.meta["reference"] = ("PyTorch, the checkpoint's model with BN folded, each conv accumulating "
                                            "its integer codes exactly (exact arithmetic, as TensorRT's INT8 convs)")
        parity_set.meta["arithmetic"] = arithmetic

        parity_set.meta["onnx_sha256"] = onnx_sha
        parity_path = paths["parity"]
        parity_sha = save_parity_set(parity_path, parity_set.inputs, parity_set.outputs, parity_set.meta)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    report = {
        "format": REPORT_FORMAT, "passed": passed, "exporter": f"ghost-deploy {__version__}",
        "checkpoint": str(checkpoint_path), "checkpoint_sha256": checkpoint_sha,
        "onnx": str(final), "onnx_sha256": onnx_sha, "onnx_bytes": final.stat().st_size,
        "parity_set": None if parity_path is None else str(parity_path),
        "parity_set_sha256": None if parity_path is None else parity_sha,
        "options": {"fp32": fp32, "int4_weights": int4_weights, "simplify": simplify, "opset": final_opset,
                    "target": target, "decode": decode, "parity": parity, "per_layer": per_layer,
                    "parity_arithmetic": parity_arithmetic,
                    "parity_images": None if parity_images is None else str(parity_images),
                    "data": None if data is None else str(data)},
        "inputs": input_names, "outputs": output_names, "img_size": img_size,
        "qdq_counts": {"before_simplify": counts_before, "after_simplify": counts_after},
        "simplify": simplify_note, "int4_layers": int4_layers, "cpu_form": None if cpu_summary is None else cpu_summary.to_dict(),
        "layers": layers, "bits_preserved": bits_ok,
        "lint": {"rules": lint_note, "errors": len(lint_errors), "warnings": len(findings) - len(lint_errors),
                 "findings": [f.to_dict() for f in findings]},
        "parity": {"source": parity_note, "report": None if parity_report is None else parity_report.to_dict(),
                   "per_layer": None if layer_report is None else layer_report.to_dict(),
                   "noise_floor": None if floor is None else floor.to_dict(),
                   "arithmetic": arithmetic if parity_report is not None else None,
                   "exact_arithmetic": None if exact is None else exact.to_dict(),
                   "ort_integer_kernels": None if kernels_report is None else kernels_report.to_dict(),
                   "ort_integer_kernels_note": None if kernels_report is None else ORT_KERNELS_NOTE},
        "metadata_keys": sorted(metadata), "notes": [TENSORRT_INT4_NOTE], "timings": timings,
    }
    write_json_atomic(paths["report"], report)
    result = ExportResult(final, paths["report"], parity_path, passed, layers, findings, parity_report, layer_report, report,
                          floor, exact)
    if progress:
        log(format_report(result))
    if not passed:
        raise ParityError(_failure_message(result), report)
    return result


# ------------------------------------------------------------------------------------------------ steps
def _build_graph(model, meta, fp32, decode, img_size, input_names, output_names):
    import torch

    from ..model.detector import INPUT_CHANNELS
    from ..quant import fold_bn

    if fp32:
        reference = torch_graph.float_copy(model)
        export_model = fold_bn(reference)
        convs = {name: torch_graph.ConvSpec(name, None, None) for name in _conv_names(reference)}
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
    graph.graph.name = f"{meta['model']}-{'fp32' if fp32 else 'qdq'}"
    return graph, convs, acts, reference


def _conv_names(model) -> list[str]:
    from ..quant.trace import conv_names

    return conv_names(model)


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


def _reference_parity_set(reference, meta, decode, img_size, input_names, output_names, heads, parity_inputs,
                          budgets, output_scales, checkpoint_sha):
    from ..parity import TorchRunner, run_in_chunks
    from ..parityset import ParitySet

    runner = TorchRunner(torch_graph.make_wrapper(reference, meta, img_size, decode), input_names, output_names)
    outputs = run_in_chunks(runner, parity_inputs.inputs)
    set_meta = {
        "input_names": input_names, "output_names": output_names, "head_output_names": heads,
        "image_paths": parity_inputs.paths, "image_sha256": parity_inputs.sha256, "image_source": parity_inputs.source,
        "img_size": img_size, "strides": list(meta["strides"]), "anchors_pixels": meta["anchors_pixels"],
        "nc": int(meta["nc"]), "names": list(meta["names"]), "budgets": budgets.to_dict(),
        "output_scales": output_scales, "checkpoint_sha256": checkpoint_sha,
        "reference": "PyTorch, the checkpoint's model in eval mode (fake quantization, BN not folded)",
    }
    return ParitySet(inputs=parity_inputs.inputs, outputs=outputs, meta=set_meta, sha256="", path=None,
                     input_names=input_names, output_names=output_names)


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
    if result.exact is not None:
        decides = report["parity"]["arithmetic"] == "exact"
        lines.append(result.exact.summary() + (" [decides the gate: parity.arithmetic exact]" if decides else
                                               " [reported; the float32 comparison decides the gate]"))
    lines.append(f"{'PASSED' if result.passed else 'FAILED'}: {result.onnx_path} ({report['onnx_bytes'] / 1e6:.2f} MB, "
                 f"{report['timings']['total_s']:.1f} s); report {result.report_path}"
                 + (f"; parity set {result.parity_set_path}" if result.parity_set_path else ""))
    return "\n".join(lines)


def _bits(bits) -> str:
    return "FP" if bits is None else str(bits)


__all__ = ["export_onnx", "ExportResult", "format_report", "sidecar_paths", "TENSORRT_INT4_NOTE", "read_metadata"]
