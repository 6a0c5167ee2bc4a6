"""Orchestration: the stages in order, each reading the previous stage's artifact from one run folder."""
from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

from ghost_deploy import __version__
from ghost_deploy.bench import run_bench
from ghost_deploy.bench.run import artifacts_from_run
from ghost_deploy.checkpoint import read_meta
from ghost_deploy.engines import build
from ghost_deploy.engines.openvino import openvino_version
from ghost_deploy.engines.targets import resolve_target
from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.export import export_onnx
from ghost_deploy.io import make_folder, read_user_json, sha256_file, write_json_atomic
from ghost_deploy.train.loop import dataset_spec, train_ghost, train_teacher

# ---------------------------------------------------------------------------------------- the pipeline
STAGES = ("teacher", "ghost", "export", "engine", "bench")


@functools.lru_cache(maxsize=1)
def code_sha256() -> str:
    """sha256 of the package's own source: a stage re-runs after any code change, not only a version bump."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _fingerprint(*parts) -> str:
    """Hash of a stage's inputs: the recipe, the code (version and source), and the sha256 of the files it reads."""


    digest = hashlib.sha256(f"{__version__}:{code_sha256()}".encode())
    for part in parts:
        if isinstance(part, Path):
            digest.update(sha256_file(part).encode() if part.is_file() else str(part).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class _StageLedger:
    """`pipeline.json` in the run folder: each stage's input fingerprint and outputs, to skip unchanged work.

    Its presence says the folder is the pipeline's own (written empty before the first stage runs), so the stage
    folders in it may be replaced; one that is not a ledger is refused unless `force` (every stage runs again).
    """

    def __init__(self, run: Path, force: bool = False):
        self.path = run / "pipeline.json"
        try:
            self.entries = _read_ledger(self.path) if self.path.is_file() else {}
        except UserError:
            if not force:
                raise
            self.entries = {}

    def start(self) -> None:
        """Mark the folder as the pipeline's (the ledger as it stands, `{}` on a first run)."""
        write_json_atomic(self.path, self.entries)

    def fresh(self, stage: str, fingerprint: str) -> dict | None:
        entry = self.entries.get(stage)
        # a stage that failed (an export's gate) runs again: the fix may lie outside what the fingerprint sees
        # (an installed library, the machine)
        if entry and entry["fingerprint"] == fingerprint and not entry["summary"].get("failed") \
                and all(Path(p).exists() for p in entry["outputs"]):
            return entry
        return None

    def record(self, stage: str, fingerprint: str, outputs: list, summary: dict) -> dict:

        self.entries[stage] = {"fingerprint": fingerprint, "outputs": [str(p) for p in outputs], "summary": summary}
        write_json_atomic(self.path, self.entries)
        return self.entries[stage]


def _read_ledger(path: Path) -> dict:
    entries = read_user_json(path, "pipeline ledger")
    entry_ok = (lambda entry: isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str)
                and isinstance(entry.get("outputs"), list) and isinstance(entry.get("summary"), dict))
    if not isinstance(entries, dict) or not all(stage in STAGES and entry_ok(entry)
                                                for stage, entry in entries.items()):
        raise UserError(path, "not a pipeline ledger (stage -> fingerprint, outputs, summary): --force runs every "
                              "stage again and replaces it, or choose another --out")
    return entries


def _foreign_runs(run: Path) -> list[Path]:
    """Stage outputs in `run` that no ledger claims: a `train --out` run, a manual export, a bench."""
    outputs = [run / stage / name for stage in ("teacher", "ghost")
               for name in ("weights/best.safetensors", "weights/last.safetensors", "train_state.safetensors",
                            "results.csv")]
    outputs += [*sorted((run / "export").glob("*.onnx")), run / "bench" / "bench.json"]
    return [path for path in outputs if path.exists()]


def check_start(recipe: dict, run: Path, target: str, data, force: bool, bench_iterations: int) -> _StageLedger:
    """Everything the pipeline can refuse, refused before the first epoch: the target, the bench iterations, the
    dataset (read, modalities checked), the run folder (a file, unwritable, a ledger that is not one, someone else's
    run). Returns the ledger, the run folder made and marked as the pipeline's."""
    if resolve_target(target).runtime != "tensorrt":
        raise UserError("--target", f"the pipeline's engine target is a TensorRT device; {target} is built from the "
                        "CPU form anyway when OpenVINO is installed")
    if isinstance(bench_iterations, bool) or not isinstance(bench_iterations, int) or bench_iterations < 1:
        raise UserError("--bench-iterations", f"{bench_iterations!r} must be an integer >= 1")
    dataset_spec(recipe, data)
    make_folder(run)  # a file in the way, or a place nothing can be written, is one line naming the folder
    ledger = _StageLedger(run, force)
    foreign = [] if force or ledger.path.is_file() else _foreign_runs(run)
    if foreign:
        raise UserError(run, f"holds a run the pipeline did not make ({foreign[0].relative_to(run)}): --force "
                             "replaces it, or choose another --out")
    ledger.start()
    return ledger


def run_pipeline(recipe: dict, run: Path, target: str = "jetson-orin-nano", data=None, force: bool = False,
                 bench_iterations: int = 50, progress: bool = True, log=print) -> dict:
    """train (teacher, GHOST) -> export (QDQ, INT4-weight, CPU form, FP32) -> build-engine -> bench, in `run`.

    Each stage reads the previous stage's artifacts; a stage whose inputs did not change since the last
    run (same recipe, code version and input file hashes) is skipped. Returns the summary it prints.
    """
    run = Path(run)
    ledger = check_start(recipe, run, target, data, force, bench_iterations)  # before any training, not after it
    timings, verdicts = {}, {}

    def stage(name, fingerprint, work):
        started = time.perf_counter()
        entry = None if force else ledger.fresh(name, fingerprint)
        if entry:
            log(f"[{name}] unchanged since the last run: skipped")
        else:
            log(f"[{name}] running")
            outputs, summary = work()
            entry = ledger.record(name, fingerprint, outputs, summary)
        timings[name] = round(time.perf_counter() - started, 1)
        return entry["summary"]

    # Each stage's fingerprint holds only the recipe sections it reads, so editing e.g. the parity budgets
    # re-runs export and what follows, not training.
    common = {k: v for k, v in recipe.items() if k not in ("recipe_path", "teacher", "ghost", "parity", "name")}
    teacher = stage("teacher", _fingerprint("teacher", common, recipe["teacher"], data), lambda: _train_stage(
        train_teacher(recipe, run / "teacher", data=data, progress=progress, log=log, overwrite=True)))
    ghost = stage("ghost", _fingerprint("ghost", common, recipe["ghost"], Path(teacher["best"])), lambda: _train_stage(
        train_ghost(recipe, run / "ghost", teacher["best"], data=data, progress=progress, log=log, overwrite=True)))
    exports = stage("export", _fingerprint("export", recipe["parity"], Path(ghost["best"]), Path(teacher["best"])),
                    lambda: _export_stage(run / "export", teacher["best"], ghost["best"], log, recipe["parity"]))
    verdicts["export"] = {name: info["verdict"] for name, info in exports["onnx"].items()}
    if not all(info["passed"] for info in exports["onnx"].values()):
        raise ParityError("an export failed its checks; see " + ", ".join(i["report"] for i in exports["onnx"].values()))
    trt_form, cpu_form = exports["onnx"]["ghost"]["path"], exports["onnx"]["ghost-cpu"]["path"]
    engine = stage("engine", _fingerprint("engine", Path(trt_form), Path(cpu_form), target, openvino_version()),
                   lambda: _engine_stage(run / "engine", trt_form, cpu_form, ghost["best"], target))
    bench = stage("bench", _fingerprint("bench", *(Path(i["path"]) for i in exports["onnx"].values()), bench_iterations),
                  lambda: _bench_stage(run, ghost["best"], bench_iterations, progress, log))
    summary = {"run": str(run), "teacher": teacher, "ghost": ghost, "export": exports, "engine": engine, "bench": bench,
               "seconds": timings}
    log(format_summary(summary))
    return summary


def _train_stage(result: dict):

    header = read_meta(result["best"])
    metrics = header.get("metrics")
    summary = {"best": result["best"], "mAP50": metrics["mAP50"], "mAP50_95": metrics["mAP50_95"]}
    if header.bit_plan is not None:
        totals = header.bit_plan.totals
        summary.update(avg_weight_bits=totals["avg_weight_bits"], size_mb=totals["size_mb"], bops_g=totals["bops_g"])
    return [result["best"]], summary


def _export_stage(out: Path, teacher_ckpt: str, ghost_ckpt: str, log, parity_config: dict):

    forms = {
        "ghost": (ghost_ckpt, out / "ghost.onnx", {}),
        "ghost-int4": (ghost_ckpt, out / "ghost-int4.onnx", {"int4_weights": True}),
        "ghost-cpu": (ghost_ckpt, out / "ghost-cpu.onnx", {"target": "cpu"}),
        "teacher-fp32": (teacher_ckpt, out / "teacher-fp32.onnx", {"fp32": True}),
    }
    results = {}
    for name, (ckpt, path, options) in forms.items():
        try:
            # this run's parity section: its fingerprint is the export stage's, the checkpoints may predate it
            result = export_onnx(ckpt, path, progress=False, parity_config=parity_config, **options)
        except ParityError as error:
            log(f"[export] {name}: FAILED: {error}")
            results[name] = {"path": str(path), "passed": False, "verdict": "FAILED", "report": str(path.with_suffix(".export.json"))}
            continue
        parity = result.parity.to_dict() if result.parity is not None else {}
        results[name] = {"path": str(result.onnx_path), "passed": result.passed, "report": str(result.report_path),
                         "verdict": "passed" if result.passed else "FAILED", "size_bytes": result.onnx_path.stat().st_size,
                         "parity": {k: parity.get(k) for k in ("passed", "failures")}}
        log(f"[export] {name}: {results[name]['verdict']} ({results[name]['size_bytes'] / 1e6:.3f} MB) -> {result.onnx_path}")
    outputs = [r["path"] for r in results.values() if r["passed"]]
    return outputs, {"onnx": results, "failed": not all(r["passed"] for r in results.values())}


def _engine_stage(out: Path, trt_form: str, cpu_form: str, checkpoint: str, target: str):
    """The TensorRT target from the TensorRT form (an engine on the device, a bundle elsewhere) and, where
    OpenVINO is installed, a real OpenVINO engine from the CPU form, parity-checked here."""
    result = build(trt_form, target, out, checkpoint=checkpoint, progress=False, require_export=True)
    if result["status"] == "engine":
        outputs, summary = [e["engine"] for e in result["engines"]], {"status": "engine", "engines": result["engines"]}
    else:
        outputs = [result["bundle_dir"]]
        summary = {"status": "bundle", "reason": result["reason"], "bundle": result["bundle_dir"],
                   "bundle_tar": result.get("bundle_tar")}
    if openvino_version() is not None:
        engine = build(cpu_form, "openvino-cpu", out, checkpoint=checkpoint, progress=False, require_export=True)
        summary["openvino"] = engine["engines"][0]
        outputs.append(engine["engines"][0]["engine"])
    return outputs, summary


def _bench_stage(run: Path, checkpoint: str, iterations: int, progress: bool, log):

    # mAP on the val split of the dataset the checkpoint was trained on (recorded in the checkpoint)
    result = run_bench(artifacts_from_run(run), run / "bench", data=read_meta(checkpoint).dataset(checkpoint),
                       iterations=iterations, progress=progress, log=log)
    rows = {}
    for backend in result.get("backends", []):
        batch1 = next((row for row in backend.get("latency") or [] if row["batch"] == 1 and "infer" in row), None)
        rows[backend["name"]] = {"p50_ms": batch1["infer"]["p50_ms"] if batch1 else None,
                                 "p99_ms": batch1["infer"]["p99_ms"] if batch1 else None,
                                 "mAP50": (backend.get("accuracy") or {}).get("mAP50"),
                                 "status": backend.get("status") if batch1 else (backend.get("reason") or backend.get("status"))}
    return [str(run / "bench" / "bench.json")], {"json": str(run / "bench" / "bench.json"),
                                                 "report": str(run / "bench" / "report.md"), "backends": rows}


def format_summary(summary: dict) -> str:
    teacher, ghost, engine = summary["teacher"], summary["ghost"], summary["engine"]
    lines = ["", "=" * 78, f"ghost-deploy pipeline summary ({summary['run']})", "=" * 78,
             f"teacher FP32     mAP50 {teacher['mAP50']:.4f}  mAP50:95 {teacher['mAP50_95']:.4f}   {teacher['best']}",
             f"GHOST            mAP50 {ghost['mAP50']:.4f}  mAP50:95 {ghost['mAP50_95']:.4f}   {ghost['best']}",
             f"                 avg weight bits {ghost.get('avg_weight_bits', 0):.2f}  size {ghost.get('size_mb', 0):.3f} MB  "
             f"BOPs {ghost.get('bops_g', 0):.2f} G", "exports (parity vs PyTorch, ONNX Runtime CPU):"]
    for name, info in summary["export"]["onnx"].items():
        size = f"{info['size_bytes'] / 1e6:.3f} MB" if info.get("size_bytes") else ""
        lines.append(f"  {name:14s} {info['verdict']:7s} {size:>11s}  {info['path']}")
    if engine["status"] == "engine":
        lines.append("engines: " + ", ".join(e["engine"] for e in engine["engines"]))
    else:
        lines.append(f"engine: NO ENGINE WAS BUILT ({engine['reason']})")
        lines.append(f"  deployment bundle: {engine['bundle']}")
    if engine.get("openvino"):
        lines.append(f"OpenVINO engine (CPU form, parity passed): {engine['openvino']['engine']}")
    lines.append("bench (batch 1, this machine):")
    for name, row in summary["bench"]["backends"].items():
        if row.get("p50_ms") is None:
            lines.append(f"  {name:28s} {row.get('status') or 'skipped'}")
            continue
        m = row.get("mAP50")
        lines.append(f"  {name:28s} p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
                     f"mAP50 {'n/a' if m is None else f'{m:.4f}'}")
    lines.append(f"report: {summary['bench']['report']}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
