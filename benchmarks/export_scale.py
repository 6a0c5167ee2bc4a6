"""Export at the scale users run (issue 14): wall time and peak memory of `ghost-deploy export` per form, against one
PyTorch FP32 pass over the same parity images, and CPU latency of every form against ORT FP32.

    python benchmarks/export_scale.py [--sizes 512 1024] [--model ghost-s-vedai] [--latency-size 512]
                                      [--runs 20] [--json docs/results/export-scale.json] [--residual-outputs]
                                      [--demo-run RUN [--demo-extra LABEL=GHOST_CHECKPOINT ...]]

For every size: a `ghost-deploy sample` checkpoint (random weights off the power-of-two grid, like a trained
model's; HQ plan), then each export in its own process (wall time and that process's peak RSS, from wait4),
default checks (the gate decided by exact arithmetic, the float32 comparison run and reported beside it). The
baseline, measured in the same run: the FP32 model of the same architecture over the same parity images (batch
1, the export's own chunking), best of two. At `--latency-size`: ORT FP32, the TensorRT form (ORT as written),
the CPU form (ORT's integer kernels) and ORT's own `quantize_static` (u8, per channel, QDQ) of the FP32 export,
interleaved (A, B, C, D, A, ...) at 1 and 2 threads. Not a test: run it by hand (about 15 min at 512 + 1024).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of one child process (os.wait4: that child's own rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "exit_code": os.waitstatus_to_exitcode(status), "tail": output.strip().splitlines()[-3:]}


def torch_fp32_pass(checkpoint: Path, count: int) -> float:
    """Seconds of one FP32 PyTorch pass over the export's parity images (same architecture and inputs)."""
    import torch

    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.model import build_model
    from ghost_deploy.parity.inputs import resolve_parity_inputs

    header = read_meta(checkpoint)
    model = build_model(header.model, nc=header.nc, input_mode=header.input_mode).eval()
    inputs = resolve_parity_inputs(header, int(header.img_size), count).inputs
    names = list(header.input_names or model.input_names)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            for index in range(count):
                model(*(torch.from_numpy(inputs[name][index:index + 1]) for name in names))
            best = min(best, time.perf_counter() - started)
    return best


def export_report(path: Path) -> dict:
    report_path = path.with_name(f"{path.stem}.export.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    gate = report.get("parity") or {}
    exact = gate.get("exact_arithmetic") or {}
    return {"timings": report.get("timings"), "passed": report.get("passed"), "arithmetic": gate.get("arithmetic"),
            "float32_passed": (gate.get("report") or {}).get("passed"), "exact_bit_identical": exact.get("bit_identical"),
            "exact_float_convs": exact.get("float_convs")}


def latency(paths: dict[str, Path], inputs: dict, threads: int, runs: int) -> dict[str, float]:
    from ort_cpu_latency import interleaved, session  # benchmarks/: the interleaved ORT timer both scripts use

    sessions = {name: session(path, threads) for name, path in paths.items()}
    times = interleaved(sessions, {name: value[:1] for name, value in inputs.items()}, runs, warmup=3)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def quantize_static_u8(fp32_path: Path, out_path: Path, inputs: dict) -> Path:
    """ORT's own post-training quantization of the FP32 export: u8 activations, s8 per-channel weights, QDQ."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            count = len(next(iter(inputs.values())))
            self.rows = iter([{name: value[i:i + 1] for name, value in inputs.items()} for i in range(count)])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def demo_comparison(run: Path, folder: Path, runs: int, extra: dict[str, Path] | None = None, cli=None) -> dict:
    """The demo model at 128 px: latency (1 thread, interleaved) and val mAP50 of ORT FP32 (teacher), the
    TensorRT and CPU forms of the GHOST model, and ORT's own `quantize_static` u8 of the FP32 teacher.

    `extra`: {label: GHOST checkpoint} of the same teacher (e.g. trained with `ghost.plan.residual_outputs`),
    exported here in both forms (default checks) and measured beside the rest."""
    from ghost_deploy.bench.accuracy import evaluate_backends
    from ghost_deploy.bench.backends import OrtBackend
    from ghost_deploy.bench.prepost import head_spec_from_meta
    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.data.synth import ensure_synthetic_dataset
    from ghost_deploy.onnx_graph import onnx_metadata
    from ghost_deploy.parity.inputs import resolve_parity_inputs

    teacher_header = read_meta(run / "teacher" / "weights" / "best.safetensors")
    calibration = resolve_parity_inputs(teacher_header, int(teacher_header.img_size), 32).inputs
    paths = {"ort-fp32": run / "export" / "teacher-fp32.onnx", "trt-form": run / "export" / "ghost.onnx",
             "cpu-form": run / "export" / "ghost-cpu.onnx",
             "ort-quantize-static-u8": quantize_static_u8(run / "export" / "teacher-fp32.onnx",
                                                          folder / "demo-ort-qs.onnx", calibration)}
    for label, checkpoint in (extra or {}).items():
        for form, flags in (("trt-form", []), ("cpu-form", ["--target", "cpu"])):
            out = folder / f"demo-{label}-{form}.onnx"
            subprocess.run(cli + ["export", "--onnx", str(checkpoint), "--out", str(out), *flags], check=True,
                           stdout=subprocess.DEVNULL)
            paths[f"{label}-{form}"] = out
    medians = latency(paths, calibration, 1, runs)
    spec = head_spec_from_meta(onnx_metadata(paths["trt-form"]), str(paths["trt-form"]))
    backends = [OrtBackend(path, label=name, threads=1) for name, path in paths.items()]
    for backend in backends:
        backend.load()
    try:
        scores = evaluate_backends(backends, spec, str(ensure_synthetic_dataset()), "val")
    finally:
        for backend in backends:
            backend.close()
    return {name: {"median_ms": medians[name], "over_ort_fp32": round(medians[name] / medians["ort-fp32"], 3),
                   "val_map50": round(float(scores[name]["mAP50"]), 4)} for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ghost-s-vedai")
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="none: only --demo-run")
    parser.add_argument("--latency-size", type=int, default=512, help="0: no latency")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parity-count", type=int, default=8)
    parser.add_argument("--forms", nargs="+", default=["trt", "cpu", "fp32"])
    parser.add_argument("--json", type=Path, default=Path("docs/results/export-scale.json"))
    parser.add_argument("--keep", type=Path, default=None, help="keep samples and exports here")
    parser.add_argument("--demo-run", type=Path, default=None, help="a demo pipeline run folder: compare its 128 px "
                        "exports with ORT's quantize_static of its teacher (latency and val mAP50)")
    parser.add_argument("--demo-extra", nargs="*", default=[], metavar="LABEL=CHECKPOINT",
                        help="more GHOST checkpoints of the demo teacher to export and compare (both forms)")
    parser.add_argument("--residual-outputs", action="store_true", help="also a sample with residual-branch output "
                        "quantizers (`sample --residual-outputs`), exported in the CPU form and timed beside the rest")
    args = parser.parse_args()

    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.parity.inputs import resolve_parity_inputs

    cli = [sys.executable, "-c", "from ghost_deploy.cli import main; main()"]
    results = {"setup": {"command": " ".join(["python", *sys.argv]), "model": args.model,
                         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                         "parity_count": args.parity_count}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="ghost-export-scale-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            checkpoint = folder / f"sample-{size}.safetensors"
            if not checkpoint.exists():
                subprocess.run(cli + ["sample", args.model, "--img-size", str(size), "--out", str(checkpoint)],
                               check=True, stdout=subprocess.DEVNULL)
            variants = {"": checkpoint}
            if args.residual_outputs:
                variants["-residual"] = folder / f"sample-{size}-residual.safetensors"
                if not variants["-residual"].exists():
                    subprocess.run(cli + ["sample", args.model, "--img-size", str(size), "--residual-outputs", "--out",
                                          str(variants["-residual"])], check=True, stdout=subprocess.DEVNULL)
            baseline = torch_fp32_pass(checkpoint, args.parity_count)
            row = {"torch_fp32_pass_s": round(baseline, 2), "forms": {}}
            jobs = [(form, "") for form in args.forms] + [("cpu", "-residual")] * ("-residual" in variants)
            for form, variant in jobs:
                out = folder / f"{size}-{form}{variant}.onnx"
                extra = {"trt": [], "cpu": ["--target", "cpu"], "fp32": ["--fp32"]}[form]
                measured = run_measured(cli + ["export", "--onnx", str(variants[variant]), "--out", str(out),
                                               "--parity-count", str(args.parity_count), *extra])
                measured.update(export_report(out))
                measured["wall_over_torch_pass"] = round(measured["wall_s"] / baseline, 2)
                row["forms"][form + variant] = measured
                print(f"{size} px {form + variant:5s}: {measured['wall_s']:.1f} s ({measured['wall_over_torch_pass']:.1f}x one "
                      f"FP32 pass of {baseline:.2f} s), peak {measured['peak_rss_mb']:.0f} MB, exit "
                      f"{measured['exit_code']}, passed {measured.get('passed')}", flush=True)
            if size == args.latency_size and {"trt", "cpu", "fp32"} <= set(args.forms):
                header = read_meta(checkpoint)
                inputs = resolve_parity_inputs(header, size, args.parity_count).inputs
                paths = {"ort-fp32": folder / f"{size}-fp32.onnx", "trt-form": folder / f"{size}-trt.onnx",
                         "cpu-form": folder / f"{size}-cpu.onnx",
                         "ort-quantize-static-u8": quantize_static_u8(folder / f"{size}-fp32.onnx",
                                                                       folder / f"{size}-ort-qs.onnx", inputs)}
                if "-residual" in variants:
                    paths["cpu-form-residual"] = folder / f"{size}-cpu-residual.onnx"
                row["latency_ms"] = {}
                for threads in (1, 2):
                    medians = latency(paths, inputs, threads, args.runs)
                    ratios = {name: round(value / medians["ort-fp32"], 3) for name, value in medians.items()}
                    row["latency_ms"][f"{threads}_threads"] = {"median_ms": medians, "over_ort_fp32": ratios}
                    print(f"{size} px, {threads} thread(s): " + ", ".join(f"{k} {v} ms ({ratios[k]}x)"
                                                                          for k, v in medians.items()), flush=True)
            results["sizes"][str(size)] = row
        if args.demo_run is not None:
            extra = dict(item.split("=", 1) for item in args.demo_extra)
            results["demo_128"] = demo_comparison(args.demo_run, folder, max(args.runs, 200),
                                                  {k: Path(v) for k, v in extra.items()}, cli)
            for name, value in results["demo_128"].items():
                print(f"demo 128 px {name}: {value}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
