"""OpenVINO vs ONNX Runtime on the CPU, at the scale users run (ghost-s-vedai at 512 px by default), batch 1.

Writes a random-weight, calibrated sample of the architecture (mixed 3..8-bit plan, off the power-of-two grid like
a trained model), exports its CPU form and its FP32 form (parity gates off: the sample's numbers are not the point
here), builds the OpenVINO engine with `build-engine`'s own compile step, and times in one interleaved run
(A, B, C, A, B, C, ...): the OpenVINO engine (CPU form), ONNX Runtime on the FP32 export, ONNX Runtime on the CPU
form. It also reports how far each runtime's outputs sit from ONNX Runtime running the CPU form as written (the
export's reference arithmetic) on a few random images. Prints one table; the ratios are what matter on a shared
machine. Not a test: run it by hand.

    python benchmarks/openvino_latency.py [--model ghost-s-vedai] [--img-size 512] [--runs 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ghost_deploy.engines.openvino import compile_engine, load_engine, openvino_version
from ghost_deploy.export import export_onnx
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.parity.compare import compare_outputs
from ghost_deploy.parity.runners import OrtRunner


def interleaved(runners: dict, feed: dict, runs: int, warmup: int = 5) -> dict[str, list[float]]:
    for _ in range(warmup):
        for runner in runners.values():
            runner.infer(feed)
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.infer(feed)
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ghost-s-vedai")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=2, help="random images for the agreement columns")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="ov-latency-"))
    model, plan = build_sample_model(args.model, nc=8, img_size=args.img_size, weight_bits=(3, 8), seed=0,
                                     exact_grid=False)
    checkpoint = save_sample_checkpoint(root / "sample.safetensors", model_name=args.model, nc=8,
                                        img_size=args.img_size, model=model, plan=plan)
    cpu = export_onnx(checkpoint, root / "sample-cpu.onnx", target="cpu", parity=False, progress=False).onnx_path
    teacher, _ = build_sample_model(args.model, nc=8, img_size=args.img_size, weight_bits=None, seed=0)
    fp32_ckpt = save_sample_checkpoint(root / "teacher.safetensors", model_name=args.model, nc=8,
                                       img_size=args.img_size, model=teacher, plan=None)
    fp32 = export_onnx(fp32_ckpt, root / "teacher-fp32.onnx", fp32=True, parity=False, progress=False).onnx_path
    facts = compile_engine(cpu, root / "sample-cpu.engine", threads=args.threads)
    runners = {"openvino engine (CPU form)": load_engine(root / "sample-cpu.engine", args.threads),
               "ORT FP32": OrtRunner(fp32, threads=args.threads, exact=False),
               "ORT CPU form (integer kernels)": OrtRunner(cpu, threads=args.threads, exact=False)}
    rng = np.random.default_rng(0)
    feed = {"rgb": rng.random((1, 3, args.img_size, args.img_size), dtype=np.float32),
            "ir": rng.random((1, 1, args.img_size, args.img_size), dtype=np.float32)}
    times = interleaved(runners, feed, args.runs)
    with OrtRunner(cpu, threads=args.threads) as as_written:
        images = [{k: rng.random(v.shape, dtype=np.float32) for k, v in feed.items()} for _ in range(args.images)]
        reference = [as_written.infer(image) for image in images]
    base = statistics.median(times["ORT FP32"])
    print(f"{args.model} at {args.img_size} px, batch 1, {args.threads} thread(s), {args.runs} interleaved runs; "
          f"OpenVINO {openvino_version()}, {facts['device_name']}, {facts['precision_counts']['conv_int8']} int8 convs")
    print(f"{'runtime':<34} {'p50 ms':>8} {'x ORT FP32':>10} {'min cos vs CPU form as written':>31}")
    for name, runner in runners.items():
        cosine = "-"
        if name != "ORT FP32":
            worst = [min(v["cosine"] for v in compare_outputs(ref, runner.infer(image)).outputs.values())
                     for ref, image in zip(reference, images)]
            cosine = f"{min(worst):.6f}"
        median = statistics.median(times[name])
        print(f"{name:<34} {median:8.1f} {median / base:10.3f} {cosine:>31}")


if __name__ == "__main__":
    main()
