"""`run_bench`: every form of the model on the same inputs, in one process, one JSON out.

Order of work: load each backend and warm it up alone (its host peak RSS is measured over exactly that
window), then time all backends round-robin per batch size (inference alone, then end to end: uint8
frames -> pre-processing -> inference -> decode + NMS), then score each on the dataset, then (on a
Jetson) measure power per backend, then write the JSON, the Markdown report and its plots.
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from ghost_deploy import __version__
from ghost_deploy.bench import jetson
from ghost_deploy.bench.accuracy import evaluate_backends
from ghost_deploy.bench.backends import Backend, BackendUnavailable, backends_from_artifacts
from ghost_deploy.bench.memory import PeakWindow
from ghost_deploy.bench.plan_layers import plan_summary
from ghost_deploy.bench.prepost import (
    DEPLOY_NMS,
    EVAL_NMS,
    HeadSpec,
    check_heads,
    dataset_frame_paths,
    decode_frame,
    head_spec_from_meta,
    head_spec_from_onnx,
    postprocess,
    preprocess,
    synthetic_frames,
)
from ghost_deploy.bench.report import write_reports
from ghost_deploy.bench.sizes import artifact_sizes
from ghost_deploy.bench.timing import WarmupPolicy, interleaved, latency_stats, warm_up
from ghost_deploy.checkpoint import read_meta
from ghost_deploy.contract import OnnxMetadata
from ghost_deploy.errors import UserError
from ghost_deploy.export.metadata import load_our_onnx
from ghost_deploy.io import output_folder
from ghost_deploy.onnx_graph import read_metadata_props

FORMAT = "ghost-deploy/bench/v1"
ACCURACY_BATCH = 8  # images per accuracy batch (fixed-batch backends are fed their own size)


# ------------------------------------------------------------------------------------------ artifacts
def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(item) for item in value]


def normalise_artifacts(artifacts: dict) -> dict[str, list[str]]:
    """{checkpoints, onnx, engines} lists from a dict that may also use `teacher`, `ghost`, `checkpoint`, `engine`."""
    known = {"teacher", "ghost", "checkpoint", "checkpoints", "onnx", "engine", "engines"}
    unknown = sorted(set(artifacts) - known)
    if unknown:
        raise UserError(None, f"unknown artifact kind(s) {unknown}; known: {sorted(known)}")
    checkpoints = [*_as_list(artifacts.get("teacher")), *_as_list(artifacts.get("ghost")),
                   *_as_list(artifacts.get("checkpoint")), *_as_list(artifacts.get("checkpoints"))]
    result = {"checkpoints": list(dict.fromkeys(checkpoints)), "onnx": list(dict.fromkeys(_as_list(artifacts.get("onnx")))),
              "engines": list(dict.fromkeys([*_as_list(artifacts.get("engine")), *_as_list(artifacts.get("engines"))]))}
    if not any(result.values()):
        raise UserError(None, "nothing to bench: give a checkpoint, an ONNX or an engine (or a run folder)")
    return result


def artifacts_from_run(run_dir: str | os.PathLike) -> dict[str, list[str]]:
    """What a pipeline run folder holds: teacher/ghost best checkpoints, export/*.onnx, engine/*.engine."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(run, "is a file, not a run folder" if run.exists() else "run folder not found")
    checkpoints = [str(path) for path in (run / "teacher/weights/best.safetensors", run / "ghost/weights/best.safetensors")
                   if path.is_file()]
    onnx = [str(path) for path in sorted((run / "export").glob("*.onnx"))
            if not path.name.startswith(".") and not path.name.endswith(".FAILED.onnx")]
    engines = [str(path) for path in sorted((run / "engine").glob("*.engine"))
               if not path.name.startswith(".") and ".FAILED." not in path.name]
    found = {"checkpoints": checkpoints, "onnx": onnx, "engines": engines}
    if not any(found.values()):
        raise UserError(run, "no artifacts found (looked for teacher/weights/best.safetensors, "
                        "ghost/weights/best.safetensors, export/*.onnx, engine/*.engine)")
    return found


def resolve_head_spec(artifacts: dict[str, list[str]]) -> HeadSpec:
    """From the first checkpoint's metadata, else the first ONNX whose metadata carries it."""
    for path in artifacts["checkpoints"]:
        return head_spec_from_meta(read_meta(path), path)
    for path in artifacts["onnx"]:
        spec = head_spec_from_onnx(path)
        if spec is not None:
            return spec
    if artifacts["onnx"]:
        raise UserError(artifacts["onnx"][0], "not a ghost-deploy export (no ghost.* metadata), so its classes, "
                        "strides and anchors are unknown: pass the checkpoint it was exported from (--checkpoint)")
    raise UserError(artifacts["engines"][0], "an engine does not record the model's classes, strides and anchors: "
                    "pass the checkpoint (--checkpoint) or the exported ONNX (--onnx) it was built from")


def check_onnx_files(paths: Sequence[str]) -> None:
    """Each ONNX exists, and one stamped by our exporter still matches its stamp (an edited export is refused).

    A plain ONNX (no ghost.format) is allowed: bench times it, decoding with the checkpoint's parameters.
    """
    for path in paths:
        if Path(path).is_dir():
            raise UserError(path, "is a folder, expected an .onnx file")
        if not Path(path).is_file():
            raise UserError(path, "ONNX file not found")
        if OnnxMetadata.is_ours(read_metadata_props(path)):
            load_our_onnx(path)


def _check_agreement(spec: HeadSpec, artifacts: dict[str, list[str]]) -> None:
    """Every checkpoint and every exported ONNX must be a form of the same model (classes, inputs, size)."""
    others = [head_spec_from_meta(read_meta(path), path) for path in artifacts["checkpoints"]]
    others += [other for path in artifacts["onnx"] if (other := head_spec_from_onnx(path))]
    for other in others:
        for key in ("nc", "input_names", "img_size"):
            theirs, ours = getattr(other, key), getattr(spec, key)
            if key == "input_names":
                theirs, ours = sorted(theirs), sorted(ours)
            if theirs != ours:
                raise UserError(other.source, f"{key} is {getattr(other, key)!r} but {spec.source} has "
                                f"{getattr(spec, key)!r}: bench compares forms of one model")


# ------------------------------------------------------------------------------------------ helpers
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(threads: int | None, device: str) -> dict:

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "threads": threads, "device": device, "ghost_deploy": __version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "numpy": _version("numpy"), "torch": _version("torch"), "onnxruntime": _version("onnxruntime"),
            "tensorrt": _version("tensorrt")}


def _default_threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return max(1, (os.cpu_count() or 2) // 2)


def _progress_bar(enabled: bool, total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _bit_plan_summary(artifacts: dict[str, list[str]]) -> dict | None:
    for path in artifacts["checkpoints"]:
        plan = read_meta(path).bit_plan
        if plan is not None:
            return plan_summary(plan, path)
    return None


# ------------------------------------------------------------------------------------------ phases
def _load_and_warm(backend: Backend, spec: HeadSpec, feeds: dict[int, dict], policy: WarmupPolicy, log) -> dict:
    """Load, check, warm up at every batch size; the host peak RSS covers exactly this."""
    record = {**backend.describe(), "status": "ok", "reason": None, "latency": [], "accuracy": None, "power": None}
    with PeakWindow() as window:
        began = time.perf_counter()
        try:
            backend.load()
        except BackendUnavailable as exc:
            record.update(status="skipped", reason=str(exc))
            log(f"  {backend.name}: skipped ({exc})")
            return record
        record["load_seconds"] = time.perf_counter() - began
        _check_backend(backend, spec)
        warmups = {}
        for batch, feed in feeds.items():
            if _batch_refusal(backend, batch):
                continue
            check_heads(backend.infer(feed), spec, backend.name)
            warmups[batch] = warm_up(lambda: backend.infer(feed), policy).to_dict()
    record["memory"] = {**window.to_dict(), "device_peak_mb": _mb(backend.device_memory())}
    record["_warmup"] = warmups
    settled = ", ".join(f"b{b}: {w['iterations']} runs{'' if w['settled'] else ' (spread never settled)'}"
                        for b, w in warmups.items())
    log(f"  {backend.name}: loaded in {record['load_seconds']:.2f} s, warm-up {settled}")
    return record


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 2)


def _check_backend(backend: Backend, spec: HeadSpec) -> None:
    if set(backend.input_names) != set(spec.input_names):
        raise UserError(next(iter(backend.artifact_paths.values())),
                        f"inputs {list(backend.input_names)} differ from the model's {list(spec.input_names)}")
    side = backend.static_image_size()
    if side is not None and side != spec.img_size:
        raise UserError(next(iter(backend.artifact_paths.values())),
                        f"built for {side} px inputs but the model runs at {spec.img_size} px")


def _batch_refusal(backend: Backend, batch: int) -> str | None:
    fixed = backend.static_batch()
    if fixed is not None and fixed != batch:
        return f"fixed batch {fixed} (static input shape)"
    return None


def _time_inference(active: Sequence[Backend], feeds: dict[int, dict], refusals: dict, iterations: int,
                    progress: bool) -> dict:
    """{batch: {backend: {"total": [s...]}}}, backends interleaved round-robin."""
    def infer_only(backend: Backend, feed: dict) -> None:
        backend.infer(feed)

    timings = {}
    for batch, feed in feeds.items():
        calls = {b.name: (lambda b=b, feed=feed: infer_only(b, feed)) for b in active if batch not in refusals[b.name]}
        with _progress_bar(progress, iterations, f"latency b{batch}") as bar:
            timings[batch] = interleaved(calls, iterations, progress=lambda n: bar.update(1))
    return timings


def _time_end_to_end(active: Sequence[Backend], frames: dict[int, list], spec: HeadSpec, refusals: dict,
                     iterations: int, progress: bool) -> dict:
    """{batch: {backend: {"total", "preprocess", "infer", "postprocess": [s...]}}}."""
    def pipeline(backend: Backend, batch_frames: list) -> dict[str, float]:
        began = time.perf_counter()
        feed = preprocess(batch_frames, spec.input_names, spec.img_size)
        fed = time.perf_counter()
        heads = backend.infer(feed)
        inferred = time.perf_counter()
        postprocess(heads, spec, **DEPLOY_NMS)
        return {"preprocess": fed - began, "infer": inferred - fed, "postprocess": time.perf_counter() - inferred}

    timings = {}
    for batch, batch_frames in frames.items():
        calls = {b.name: (lambda b=b, batch_frames=batch_frames: pipeline(b, batch_frames))
                 for b in active if batch not in refusals[b.name]}
        with _progress_bar(progress, iterations, f"end-to-end b{batch}") as bar:
            timings[batch] = interleaved(calls, iterations, progress=lambda n: bar.update(1))
    return timings


def _decode_stats(paths: list[dict], repeats: int = 3) -> dict | None:
    """Time reading + decoding each frame's image files (PNG/JPEG of every sensor), per frame."""
    if not paths:
        return None
    seconds = []
    for _ in range(repeats):
        for frame in paths:
            began = time.perf_counter()
            decode_frame(frame)
            seconds.append(time.perf_counter() - began)
    return latency_stats(seconds, 1)


def _accuracy_entry(metrics: dict) -> dict:
    per_class = metrics["per_class"]
    names = metrics["names"]
    return {
        "mAP50": metrics["mAP50"], "mAP50_95": metrics["mAP50_95"], "precision": metrics.get("precision"),
        "recall": metrics.get("recall"), "images": metrics["images"],
        "per_class": [{"name": names[i], "labels": int(per_class["labels"][i]), "ap50": per_class["ap50"][i],
                       "ap50_95": per_class["ap50_95"][i], "precision": per_class["precision"][i],
                       "recall": per_class["recall"][i]} for i in range(len(names))],
    }


def _primary_size(record: dict, files: list[dict]) -> float | None:
    by_path = {entry["path"]: entry for entry in files}
    for path in record["artifacts"].values():
        if path in by_path:
            return by_path[path]["mb"]
    return None


# ------------------------------------------------------------------------------------------ entry
def _frames(data, split: str, spec: HeadSpec, batch_sizes: list[int]) -> tuple[dict[int, list], list[dict]]:
    """uint8 frames per batch size: the split's first images with a dataset, else random sensor frames."""
    largest = max(batch_sizes)
    paths = dataset_frame_paths(data, split, spec.input_names, largest) if data else []
    if paths and len(paths) < largest:
        paths = [paths[i % len(paths)] for i in range(largest)]
    pool = [decode_frame(p) for p in paths] if paths else synthetic_frames(spec.input_names, largest, spec.img_size)
    return {b: pool[:b] for b in batch_sizes}, paths


def _latency_entries(name: str, batch_sizes, refusals: dict, warmups: dict, infer_times: dict, e2e_times: dict) -> list:
    entries = []
    for batch in batch_sizes:
        if batch in refusals:
            entries.append({"batch": batch, "skipped": refusals[batch]})
            continue
        infer, e2e = infer_times[batch][name]["total"], e2e_times[batch][name]
        entries.append({
            "batch": batch, "warmup": warmups[batch], "infer": latency_stats(infer, batch),
            "end_to_end": {stage: latency_stats(e2e[stage], batch) for stage in ("preprocess", "infer", "postprocess", "total")},
            "samples_ms": [round(seconds * 1e3, 4) for seconds in infer],
        })
    return entries


def _measure(backends: list[Backend], spec: HeadSpec, frames: dict, feeds: dict, data, split: str,
             max_images: int | None, iterations: int, policy: WarmupPolicy, board: dict, power_seconds: float,
             progress: bool, log) -> list[dict]:
    """Every phase on loaded backends; returns one record per backend (the JSON's `backends`)."""
    records = [_load_and_warm(backend, spec, feeds, policy, log) for backend in backends]
    active = [backend for backend, record in zip(backends, records) if record["status"] == "ok"]
    if not active:
        raise UserError(None, "no backend could run here: " + "; ".join(f"{r['name']}: {r['reason']}" for r in records))
    refusals = {backend.name: {b: _batch_refusal(backend, b) for b in feeds if _batch_refusal(backend, b)}
                for backend in active}
    infer_times = _time_inference(active, feeds, refusals, iterations, progress)
    e2e_times = _time_end_to_end(active, frames, spec, refusals, iterations, progress)

    accuracy = {}
    if data:
        log(f"bench: mAP on {split} of {data}" + (f" (first {max_images} images)" if max_images else ""))

        with _progress_bar(progress, 0, "mAP") as bar:
            def advance(done, total):
                bar.total, bar.n = total, done
                bar.refresh()

            accuracy = evaluate_backends(active, spec, str(data), split, ACCURACY_BATCH, max_images, advance)

    power = {}
    if board.get("is_jetson") and board.get("tegrastats"):
        first = min(feeds)
        for backend in active:
            log(f"bench: power of {backend.name} ({power_seconds:.0f} s under tegrastats)")
            power[backend.name] = jetson.measure_power(lambda: backend.infer(feeds[first]), first, power_seconds)

    for backend, record in zip(backends, records):
        warmups = record.pop("_warmup", {})
        if record["status"] == "ok":
            record["latency"] = _latency_entries(backend.name, sorted(feeds), refusals[backend.name], warmups,
                                                 infer_times, e2e_times)
            record["accuracy"] = _accuracy_entry(accuracy[backend.name]) if backend.name in accuracy else None
            record["power"] = power.get(backend.name)
    return records


def run_bench(artifacts: dict, out_dir: str | os.PathLike, data: str | os.PathLike | None = None,
              batch_sizes: Sequence[int] = (1,), iterations: int = 100, split: str = "val",
              max_images: int | None = None, progress: bool = True, threads: int | None = None,
              device: str = "cpu", warmup: WarmupPolicy | None = None, power_seconds: float = 3.0,
              plots: bool = True, log: Callable[[str], None] = print, accuracy: bool = True) -> dict:
    """Bench every backend the artifacts give; write bench.json, report.md and plots into `out_dir`.

    Args:
        artifacts: paths by kind: `teacher`/`ghost`/`checkpoints` (.safetensors), `onnx`, `engines`.
        data: dataset YAML for mAP on `split` (first `max_images` images); None skips accuracy.
        accuracy: False times `data`'s images without scoring mAP (bench --no-accuracy --data).
        batch_sizes: batch sizes to time; iterations: timed runs per backend and batch size.
        threads: intra-op threads given to PyTorch and ONNX Runtime alike (default: PyTorch's default).
    Returns the result dict (the JSON's content, plus `outputs`: the paths written).
    """
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise UserError("--batch", f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if iterations < 1:
        raise UserError("--iterations", f"must be at least 1, got {iterations}")
    policy = warmup or WarmupPolicy()
    artifacts = normalise_artifacts(artifacts)
    check_onnx_files(artifacts["onnx"])
    for path in artifacts["engines"]:
        if not Path(path).is_file():
            raise UserError(path, "is a folder, expected an engine file" if Path(path).is_dir()
                            else "engine file not found")
    spec = resolve_head_spec(artifacts)
    _check_agreement(spec, artifacts)
    threads = threads or _default_threads()
    with output_folder(out_dir):  # an --out that cannot take the report is refused before the timing
        return _run_and_write(artifacts, Path(out_dir), spec, data, accuracy, batch_sizes, iterations, split,
                              max_images, progress, threads, device, policy, power_seconds, plots, log)


def _run_and_write(artifacts, out_dir: Path, spec, data, accuracy, batch_sizes, iterations, split, max_images,
                   progress, threads, device, policy, power_seconds, plots, log) -> dict:
    board = jetson.board_state()
    files = artifact_sizes(artifacts)
    bit_plan = _bit_plan_summary(artifacts)
    frames, frame_paths = _frames(data, split, spec, batch_sizes)
    scored = data if accuracy else None
    feeds = {b: preprocess(frames[b], spec.input_names, spec.img_size) for b in batch_sizes}
    backends = backends_from_artifacts(artifacts, threads=threads, device=device)
    log(f"bench: {len(backends)} backend(s), batch {batch_sizes}, {iterations} timed runs each, {threads} threads")
    try:
        records = _measure(backends, spec, frames, feeds, scored, split, max_images, iterations, policy, board,
                           power_seconds, progress, log)
    finally:
        for backend in backends:
            backend.close()
    for record in records:
        record["size_mb"] = _primary_size(record, files)

    notes = [] if scored else ["accuracy not measured (--no-accuracy)" if data else
                               "no dataset given: accuracy not measured (pass --data)"]
    result = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(threads, device),
        "board": board,
        "model": spec.to_dict(),
        "settings": {
            "batch_sizes": batch_sizes, "iterations": iterations, "warmup": vars(policy).copy(),
            "interleaved": True, "split": split if data else None, "data": str(data) if data else None,
            "max_images": max_images, "frames": "dataset" if frame_paths else "synthetic",
            "frame_shape": list(frames[batch_sizes[0]][0][spec.input_names[0]].shape),
            "deploy_nms": DEPLOY_NMS, "eval_nms": EVAL_NMS,
        },
        "frames": {"decode": _decode_stats(frame_paths)},
        "backends": records,
        "sizes": {"files": files, "bit_plan": bit_plan},
        "notes": notes + list((bit_plan or {}).get("notes", [])),
    }

    paths = write_reports(result, out_dir, plots=plots)
    return {**result, "outputs": {key: str(path) for key, path in paths.items()}}
