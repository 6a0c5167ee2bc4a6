"""Engine stage (torch-free): ONNX -> TensorRT engine(s) verified against the parity set, or a bundle.

`build()` is what `ghost-deploy build-engine` calls. With TensorRT and a GPU that matches the target it
builds the engine (plus one per requested DLA core), checks each against the parity set, and keeps an
engine only if it passes (else `<name>.FAILED.engine` and ParityError). Otherwise it writes a deployment
bundle, says plainly that no engine was built and why, and returns status 'bundle'.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ghost_deploy.contract import metadata_key
from ghost_deploy.engines.bundle import BUNDLE_TARGET, run_bundle_parity, write_bundle
from ghost_deploy.engines.receipt import (
    file_hashes,
    make_receipt,
    observe_environment,
    read_bit_plan,
    verify_runtime,
    write_receipt,
)
from ghost_deploy.engines.targets import list_targets, load_target, resolve_target
from ghost_deploy.engines.trt import EngineRunner, build_engine
from ghost_deploy.errors import ParityError, UserError
from ghost_deploy.io import sha256_file
from ghost_deploy.onnx_graph import read_metadata_props
from ghost_deploy.parity.compare import Budgets
from ghost_deploy.parity.gate import run_parity
from ghost_deploy.parity.parityset import load_parity_set
from ghost_deploy.parity.runners import OrtRunner

__all__ = ["build", "default_parity_set_path", "why_no_engine", "run_parity", "run_bundle_parity", "OrtRunner",
           "load_target", "list_targets", "resolve_target", "verify_runtime"]


def default_parity_set_path(onnx_path) -> Path:
    """Where the export stage puts the parity set: beside the ONNX, `<stem>.parity.npz`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.parity.npz")


def why_no_engine(profile, environment: dict) -> str | None:
    """The reason an engine for `profile` cannot be built on the machine `environment` describes; None = can."""
    version = environment.get("tensorrt_version")
    if version is None:
        return "TensorRT is not installed on this machine"
    if environment.get("compute_capability") is None:
        return "no CUDA GPU was found on this machine (TensorRT builds time kernels on the target GPU)"
    major = int(version.split(".")[0])
    if major not in profile.tensorrt_majors:
        return f"TensorRT {version} is installed but {profile.name} ships TensorRT {profile.tensorrt_majors}.x"
    if profile.is_jetson and environment.get("jetson_target") != profile.name:
        here = environment.get("jetson_target") or environment.get("gpu_name") or "this machine"
        return (f"the target is {profile.name} but this is {here}; engines only run on the GPU and TensorRT "
                f"they were built with, so build on the device")
    if not profile.is_jetson and environment.get("jetson_target"):
        return f"the target is {profile.name} but this is a Jetson ({environment['jetson_target']})"
    if not profile.accepts_compute_capability(environment.get("compute_capability")):
        return f"the target needs SM {profile.compute_capability}, this GPU is SM {environment['compute_capability']}"
    return None


EXPORT_FORMAT_KEY = metadata_key("format")  # every ONNX `export` writes carries it (contract.OnnxMetadata)


def _onnx_installed() -> bool:
    # Without the onnx package the metadata cannot be read at all; then only the parity-set pairing is checked.

    return importlib.util.find_spec("onnx") is not None


def _check_pairing(onnx_path: Path, parity_set, parity_path: Path) -> None:
    """The parity set must be the one made for this very ONNX file (export records the ONNX's sha256 in it)."""
    expected = parity_set.meta.onnx_sha256
    if expected and expected != sha256_file(onnx_path):
        raise UserError(onnx_path, f"does not match its parity set {parity_path.name} (sha256 differs from the ONNX "
                                   "export paired it with): the ONNX was edited after export, or the parity set is another model's")


def _dla_cores(dla_core) -> list[int]:
    if dla_core is None:
        return []
    cores = [dla_core] if isinstance(dla_core, int) else list(dla_core)
    if any(not isinstance(c, int) or c < 0 for c in cores):
        raise UserError(None, f"--dla-core must be a non-negative integer, not {dla_core!r}")
    return cores


def _build_and_verify(onnx_path, out_dir, name, profile, parity_set, hashes, bit_plan, environment, *,
                      dla_core, timing_cache, opt_level, batch, strongly_typed, trt_world, budgets, progress) -> dict:

    suffix = "" if dla_core is None else f"-dla{dla_core}"
    engine_path = out_dir / f"{name}{suffix}.engine"
    unverified = out_dir / f".{name}{suffix}.unverified.engine"
    result = build_engine(onnx_path, unverified, profile, trt_world=trt_world, dla_core=dla_core,
                          timing_cache=timing_cache, opt_level=opt_level, batch=batch,
                          strongly_typed=strongly_typed, progress=progress)
    with EngineRunner(unverified, dla_core=dla_core) as runner:
        report = run_parity(parity_set, runner, budgets)
    passed = report.passed
    final = engine_path if passed else engine_path.with_name(f"{name}{suffix}.FAILED.engine")
    os.replace(unverified, final)
    build = result.to_dict() | {"engine_path": str(final)}
    receipt = make_receipt(target=profile.to_dict(), hashes=hashes | {"engine": result.engine_sha256},
                           bit_plan=bit_plan, environment=environment, build=build, parity=report.to_dict())
    receipt_path = final.with_suffix(".receipt.json")
    write_receipt(receipt_path, receipt)
    print(report.format_table())
    if not passed:
        raise ParityError(f"{final}: engine failed parity: " + "; ".join(report.failures), report.to_dict())
    return {"engine": str(final), "receipt": str(receipt_path), "dla_core": dla_core, "parity": report.to_dict(),
            "warnings": receipt.build["plan_mapping"]["warnings"]}


def build(onnx_path, target, out_dir, *, require_engine: bool = False, dla_core=None, timing_cache=None,
          parity_set=None, checkpoint=None, batch=None, opt_level: int = 3, strongly_typed: bool = False,
          trt_world: int | None = None, budgets: dict | None = None, name: str | None = None,
          environment: dict | None = None, progress: bool = True, require_export: bool = False) -> dict:
    """Build verified engine(s) for `target`, or write a deployment bundle when that is impossible here.

    Returns {'status': 'engine', 'engines': [...]} or {'status': 'bundle', 'reason', 'bundle_dir',
    'bundle_tar', 'exit_code'} (exit_code 1 when `require_engine`). `environment` defaults to this machine.
    `require_export` (the CLI sets it) refuses an ONNX that `ghost-deploy export` did not write. Whatever
    it is, an ONNX whose parity set records another ONNX's sha256 (edited since export) is refused.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise UserError(onnx_path, "ONNX file not found")
    metadata = read_metadata_props(onnx_path)
    if require_export and not metadata.get(EXPORT_FORMAT_KEY) and _onnx_installed():
        raise UserError(onnx_path, "not a ghost-deploy export (no ghost.format metadata): build engines from "
                                   "the ONNX `ghost-deploy export` wrote")
    profile = resolve_target(target)
    cores = _dla_cores(dla_core)
    if cores and profile.dla_cores and max(cores) >= profile.dla_cores:
        raise UserError(profile.source_path, f"{profile.name} has {profile.dla_cores} DLA core(s); asked for {cores}")
    if cores and not profile.dla_cores:
        raise UserError(profile.source_path, f"{profile.name} has no DLA cores")
    parity_path = Path(parity_set) if parity_set else default_parity_set_path(onnx_path)
    if not parity_path.is_file():
        raise UserError(parity_path, "parity set not found (export writes it beside the ONNX; or pass --parity-set)")
    loaded = load_parity_set(parity_path)
    budget = Budgets.from_dict(budgets if budgets is not None else loaded.meta.budgets)
    _check_pairing(onnx_path, loaded, parity_path)
    bit_plan = read_bit_plan(onnx_path, metadata)
    hashes = file_hashes(checkpoint=checkpoint, onnx=onnx_path, parity_set=parity_path)
    stamped = metadata.get(metadata_key("checkpoint_sha256"))
    if hashes["checkpoint"] is None and stamped:
        hashes["checkpoint"] = stamped
    hashes["engine"] = None
    name = name or f"{onnx_path.stem}-{profile.name}"
    env = observe_environment() if environment is None else environment
    reason = why_no_engine(profile, env)

    if reason is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        engines = [_build_and_verify(onnx_path, out_dir, name, profile, loaded, hashes, bit_plan, env,
                                     dla_core=core, timing_cache=timing_cache, opt_level=opt_level, batch=batch,
                                     strongly_typed=strongly_typed, trt_world=trt_world, budgets=budget,
                                     progress=progress)
                   for core in [None, *cores]]
        return {"status": "engine", "engines": engines, "exit_code": 0}

    partial = make_receipt(target=profile.to_dict(), hashes=hashes, bit_plan=bit_plan, environment=None,
                           extra={"reason_not_built": reason, "packed_on": env, "dla_core": cores[0] if cores else None,
                                  "budgets": budget.to_dict()})
    written = write_bundle(onnx_path, parity_path, profile, out_dir, reason=reason,
                           target_arg=str(target) if str(target) in ("jetson", *list_targets()) else BUNDLE_TARGET,
                           dla_core=cores[0] if cores else None, timing_cache=timing_cache,
                           partial_receipt=partial, name=name)
    print(f"no engine was built: {reason}")
    print(f"deployment bundle: {written['bundle_dir']} (and {Path(written['bundle_tar']).name}); "
          f"on the device run: bash {Path(written['bundle_dir']).name}/build_on_device.sh")
    return {"status": "bundle", "reason": reason, **written, "exit_code": 1 if require_engine else 0}
