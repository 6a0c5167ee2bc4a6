"""Engine stage (torch-free): ONNX -> engine(s) verified against the parity set, or a bundle.

`build()` is what `ghost-deploy build-engine` calls. Each target's compiler takes the export form it is proven
on (`TargetProfile.export_form`); another form is refused with one line naming the export to use, or, for
OpenVINO given the TensorRT form, replaced by the matching CPU form beside it. An OpenVINO target compiles here.
A TensorRT target with TensorRT and a GPU that matches builds the engine (plus one per requested DLA core).
Every engine is checked against the parity set with the target's engine budgets and kept only if it passes
(else `<name>.FAILED.engine` and ParityError). Where TensorRT or the target is absent, a deployment bundle is
written instead, and the result says plainly that no engine was built and why (status 'bundle').
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ghost_deploy.contract import OnnxMetadata, metadata_key
from ghost_deploy.engines import openvino
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
from ghost_deploy.io import make_folder, sha256_file
from ghost_deploy.onnx_graph import check_binding, load_onnx, metadata_props, read_metadata_props
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


def _check_pairing(onnx_path: Path, model: onnx.ModelProto, parity_set, parity_path: Path) -> None:
    """The parity set must be the one made for this very ONNX. Export records the graph's content hash in it
    (nodes, initializers, opsets, I/O names and types), so a tool that only adds shape information keeps the
    pairing; sets written before that record the file's sha256."""
    meta, metadata = parity_set.meta, metadata_props(model)
    graph_hash = metadata.get(OnnxMetadata.HASH_KEY)
    if meta.graph_sha256 and graph_hash:
        check_binding(onnx_path, model, metadata)  # the metadata itself is not edited
        if meta.graph_sha256 == graph_hash:
            return
    elif not meta.onnx_sha256 or meta.onnx_sha256 == sha256_file(onnx_path):
        return
    raise UserError(onnx_path, f"does not match its parity set {parity_path.name} (the graph differs from the one "
                               "export paired it with): the ONNX was edited after export, or the parity set is another model's")


def _form_for(profile, onnx_path: Path, metadata: dict[str, str]) -> Path:
    """The export this target's compiler is proven on: `onnx_path` itself, or for OpenVINO the matching CPU form
    beside a TensorRT form; anything else is refused (exit 2) with the export to use."""
    if not OnnxMetadata.is_ours(metadata):
        return onnx_path  # a foreign ONNX through the Python API (the CLI refuses it earlier)
    meta = OnnxMetadata.from_strings(metadata, source=onnx_path)
    if meta.precision == "fp32":
        return onnx_path
    if meta.int4_weights:
        raise UserError(onnx_path, f"INT4-weight export: {profile.name} has no INT4 convolution (TensorRT's INT4 is "
                        "weight-only GEMM block quantization); build from the INT8 export "
                        f"(`ghost-deploy export --onnx CKPT{' --target cpu' if profile.runtime == 'openvino' else ''}`)")
    if meta.target == profile.export_form:
        return onnx_path
    if profile.runtime == "tensorrt":
        raise UserError(onnx_path, "this is the ONNX Runtime CPU form (uint8 activations, zero point 128), which "
                        "TensorRT's ONNX parser rejects; build from the TensorRT form (`ghost-deploy export --onnx CKPT`)")
    sibling = _matching_cpu_form(onnx_path, meta)
    if sibling is None:
        raise UserError(onnx_path, "this is the TensorRT form (int8 activations), which OpenVINO computes wrongly "
                        "(docs/engines.md); export the CPU form (`ghost-deploy export --onnx CKPT --target cpu`) and "
                        "build from it")
    print(f"{onnx_path.name} is the TensorRT form; building {profile.name} from the matching CPU form {sibling.name}")
    return sibling


def _matching_cpu_form(onnx_path: Path, meta: OnnxMetadata) -> Path | None:
    """A CPU-form export beside `onnx_path` of the same checkpoint (its sha256) and the same bit plan, with its
    parity set (a copy of the graph another tool rewrote, metadata and all, has none)."""
    if not meta.checkpoint_sha256:
        return None
    for candidate in sorted(onnx_path.parent.glob("*.onnx"), key=lambda path: (not default_parity_set_path(path).exists(), path.name)):
        props = read_metadata_props(candidate) if candidate != onnx_path else {}
        if not OnnxMetadata.is_ours(props):
            continue
        other = OnnxMetadata.from_strings(props, source=candidate)
        if other.target == "cpu" and not other.int4_weights and other.plan_key() == meta.plan_key() \
                and other.checkpoint_sha256 == meta.checkpoint_sha256:
            return candidate
    return None


def engine_budgets(profile, parity_set, override: dict | None = None) -> Budgets:
    """The parity set's budgets with the target's engine allowance over them (docs/engines.md), or `override`."""
    if override is not None:
        return Budgets.from_dict(override)
    return Budgets.from_dict({**(parity_set.meta.budgets or {}), **profile.parity})


def check_parity_inputs(onnx_path: Path, model: onnx.ModelProto, parity_set) -> None:
    """The parity inputs must fit the ONNX's inputs (names, rank, fixed dims, float32): the device would reject them."""
    initializers = {init.name for init in model.graph.initializer}
    declared = {i.name: i for i in model.graph.input if i.name not in initializers}
    for name, array in parity_set.inputs.items():
        if name not in declared:
            raise UserError(parity_set.path, f"parity input '{name}' is not an input of {onnx_path.name} "
                                             f"(its inputs: {sorted(declared)})")
        tensor_type = declared[name].type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT or array.dtype != "float32":
            raise UserError(parity_set.path, f"parity input '{name}' is {array.dtype}; {onnx_path.name} takes float32")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != array.ndim or any(d is not None and d != n for d, n in zip(dims[1:], array.shape[1:])):
            raise UserError(parity_set.path, f"parity input '{name}' has shape {list(array.shape)}; {onnx_path.name} "
                                             f"takes {['N' if d is None else d for d in dims]}")


def _build_openvino(onnx_path, out_dir, name, profile, parity_set, hashes, bit_plan, budgets) -> dict:
    """Compile with OpenVINO, import the saved blob and run the parity set through it, keep it only if it passes."""
    if openvino.openvino_version() is None:
        raise UserError("--target", f"{profile.name} needs OpenVINO: pip install openvino (or ghost-deploy[openvino])")
    engine_path = out_dir / f"{name}.engine"
    unverified = out_dir / f".{name}.unverified.engine"
    facts = openvino.compile_engine(onnx_path, unverified, threads=profile.threads,
                                    inference_precision=profile.inference_precision, batch=profile.default_batch)
    try:
        with openvino.load_engine(unverified, profile.threads, inference_precision=profile.inference_precision) as runner:
            report = run_parity(parity_set, runner, budgets)  # the blob as saved is what is checked
        final = engine_path if report.passed else engine_path.with_name(f"{name}.FAILED.engine")
        os.replace(unverified, final)
    finally:
        if unverified.exists():
            unverified.unlink()
    for stale in (engine_path, engine_path.with_name(f"{name}.FAILED.engine")):
        if stale != final and stale.exists():
            stale.unlink()
            stale.with_suffix(".receipt.json").unlink(missing_ok=True)
    build = facts | {"engine_path": str(final), "built_from": str(onnx_path)}
    receipt = make_receipt(target=profile.to_dict(), hashes=hashes | {"engine": facts["engine_sha256"]},
                           bit_plan=bit_plan, environment=openvino.environment(), build=build, parity=report.to_dict())
    receipt_path = final.with_suffix(".receipt.json")
    write_receipt(receipt_path, receipt)
    print(report.format_table())
    if not report.passed:
        raise ParityError(f"{final}: engine failed parity: " + "; ".join(report.failures), report.to_dict())
    return {"engine": str(final), "receipt": str(receipt_path), "dla_core": None, "parity": report.to_dict(),
            "warnings": []}


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


def _check_checkpoint(checkpoint, sha256: str | None, stamped: str | None, onnx_path: Path) -> None:
    """--checkpoint (hashed into the receipt) exists, and is the one the ONNX was exported from where it says."""
    if checkpoint is None:
        return
    if sha256 is None:
        raise UserError(checkpoint, "is a folder, expected a .safetensors checkpoint" if Path(checkpoint).is_dir()
                        else "no such checkpoint")
    if stamped and sha256 != stamped:
        raise UserError(checkpoint, f"is not the checkpoint {onnx_path.name} was exported from (its sha256 differs "
                                    "from the one the export recorded): pass that one, or none")


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
        raise UserError(onnx_path, "is a folder, expected an .onnx file" if onnx_path.is_dir()
                        else "ONNX file not found")
    model = load_onnx(onnx_path)  # read once: metadata, pairing and input checks all look at it
    metadata = metadata_props(model)
    if require_export and not metadata.get(EXPORT_FORMAT_KEY):
        raise UserError(onnx_path, "not a ghost-deploy export (no ghost.format metadata): build engines from "
                                   "the ONNX `ghost-deploy export` wrote")
    profile = resolve_target(target)
    chosen = _form_for(profile, onnx_path, metadata)
    if chosen != onnx_path:
        onnx_path, model, parity_set = chosen, load_onnx(chosen), None
        metadata = metadata_props(model)
    cores = _dla_cores(dla_core)
    if cores and profile.dla_cores and max(cores) >= profile.dla_cores:
        raise UserError(profile.source_path, f"{profile.name} has {profile.dla_cores} DLA core(s); asked for {cores}")
    if cores and not profile.dla_cores:
        raise UserError(profile.source_path, f"{profile.name} has no DLA cores")
    parity_path = Path(parity_set) if parity_set else default_parity_set_path(onnx_path)
    if not parity_path.is_file():
        raise UserError(parity_path, "parity set not found (export writes it beside the ONNX; or pass --parity-set)")
    loaded = load_parity_set(parity_path)
    budget = engine_budgets(profile, loaded, budgets)
    _check_pairing(onnx_path, model, loaded, parity_path)
    check_parity_inputs(onnx_path, model, loaded)
    bit_plan = read_bit_plan(onnx_path, metadata)
    hashes = file_hashes(checkpoint=checkpoint, onnx=onnx_path, parity_set=parity_path)
    stamped = metadata.get(metadata_key("checkpoint_sha256"))
    _check_checkpoint(checkpoint, hashes["checkpoint"], stamped, onnx_path)
    if hashes["checkpoint"] is None and stamped:
        hashes["checkpoint"] = stamped
    hashes["engine"] = None
    name = name or f"{onnx_path.stem}-{profile.name}"
    if profile.runtime == "openvino":
        make_folder(out_dir)
        engine = _build_openvino(onnx_path, out_dir, name, profile, loaded, hashes, bit_plan, budget)
        return {"status": "engine", "engines": [engine], "exit_code": 0}
    env = observe_environment() if environment is None else environment
    reason = why_no_engine(profile, env)

    if reason is None:
        make_folder(out_dir)
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
