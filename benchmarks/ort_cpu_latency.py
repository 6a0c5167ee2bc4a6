"""ONNX Runtime CPU latency: the QDQ export in its CPU form (`target='cpu'`) vs the FP32 export, batch 1.

Exports one checkpoint both ways and times the two sessions in one interleaved run (A, B, A, B, ...), so
load from other processes hits both alike; prints the medians and their ratio (goal: QDQ <= 0.9x FP32).
Without --checkpoint it uses the demo recipe's architecture and image size (training/demo.yaml; or --model /
--img-size) with random weights and a random 3..8-bit plan: latency does not depend on the weight values.
One ORT thread by default (a shared 2-core machine makes 2-thread timings noise); the ratio is what matters.
Not a test: run it by hand.

    python benchmarks/ort_cpu_latency.py [--checkpoint CKPT | --model ghost-n --img-size 128] [--runs 300] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, feed: dict, runs: int, warmup: int = 20) -> dict[str, list[float]]:
    for _ in range(warmup):
        for sess in sessions.values():
            sess.run(None, feed)
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--model", default=None, help="architecture for the random checkpoint (default: the demo recipe's)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the demo recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here")
    args = parser.parse_args()

    from ghost_deploy.export import export_onnx
    from ghost_deploy.export.sample import save_sample_checkpoint

    with tempfile.TemporaryDirectory(prefix="ghost-ortbench-") as tmp:
        folder = args.out or Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            from ghost_deploy.recipe import load_recipe

            demo = load_recipe("demo")
            model, size = args.model or demo["model"], args.img_size or demo["img_size"]
            checkpoint = save_sample_checkpoint(folder / "sample.safetensors", model, img_size=size)
        # parity is the export's own business (and tested); here only the graphs matter
        qdq = export_onnx(checkpoint, folder / "qdq-cpu.onnx", target="cpu", parity=False, progress=False)
        fp32 = export_onnx(checkpoint, folder / "fp32.onnx", fp32=True, parity=False, progress=False)
        trt_form = export_onnx(checkpoint, folder / "qdq-trt.onnx", parity=False, progress=False)
        sessions = {"qdq-cpu": session(qdq.onnx_path, args.threads), "fp32": session(fp32.onnx_path, args.threads),
                    "qdq-trt": session(trt_form.onnx_path, args.threads)}
        meta = qdq.report
        rng = np.random.default_rng(0)
        size = meta["img_size"]
        channels = {"rgb": 3, "ir": 1}
        feed = {name: rng.random((1, channels[name], size, size), dtype=np.float32) for name in meta["inputs"]}
        times = interleaved(sessions, feed, args.runs)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:>8}: median {medians[name]:.3f} ms, p10 {np.percentile(values, 10):.3f}, "
              f"p90 {np.percentile(values, 90):.3f} ({len(values)} runs, batch 1, {size} px)")
    ratio = medians["qdq-cpu"] / medians["fp32"]
    cpu = meta["cpu_form"]
    print(f"model {meta['checkpoint']}: CPU form has {len(cpu['integer_convs'])} integer convs, "
          f"{len(cpu['float_convs'])} float; ORT threads {args.threads or 'default'}")
    print(f"for reference, the TensorRT form on ORT: {medians['qdq-trt'] / medians['fp32']:.3f}x FP32 "
          "(no Q after its convs, so ORT runs them in float)")
    print(f"ratio QDQ(cpu) / FP32 = {ratio:.3f} (goal <= 0.9): {'OK' if ratio <= 0.9 else 'NOT MET'}")


if __name__ == "__main__":
    main()
