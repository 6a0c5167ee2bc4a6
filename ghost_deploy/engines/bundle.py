"""Deployment bundle: what `build-engine` writes when no engine can be built here (no TensorRT, no GPU,
or not the target board). Engines are bound to the TensorRT version and GPU they were built on, so the
honest artefact is everything needed to build and verify the engine on the device itself.

Also holds the parity check shared by the engine build and the bundle: parity set in, runner in,
`compare.ParityReport` out.
"""
from __future__ import annotations

import atexit
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import onnx

from ghost_deploy import __version__
from ghost_deploy.contract import Receipt
from ghost_deploy.engines.targets import targets_dir
from ghost_deploy.errors import UserError
from ghost_deploy.io import atomic_path, make_folder, read_user_json, sha256_file, write_json_atomic, write_text_atomic
from ghost_deploy.parity.compare import Budgets, ParityReport
from ghost_deploy.parity.gate import run_parity
from ghost_deploy.parity.parityset import load_parity_set

BUNDLE_ONNX = "model.onnx"
BUNDLE_PARITY = "parity.npz"
BUNDLE_TARGET = "target.yaml"
BUNDLE_RECEIPT = "receipt.partial.json"
BUNDLE_SCRIPT = "build_on_device.sh"
BUNDLE_TRTEXEC = "TRTEXEC.md"
BUNDLE_README = "README.txt"
BUNDLE_TIMING_CACHE = "timing.cache"
BUNDLE_WHEELS = "wheels"
BUNDLE_TARGETS = "targets"
ENGINE_STAGE_DEPS = "numpy click pyyaml onnx"
BUNDLE_FILES = (BUNDLE_ONNX, BUNDLE_PARITY, BUNDLE_TARGET, BUNDLE_RECEIPT, BUNDLE_SCRIPT, BUNDLE_TRTEXEC, BUNDLE_README)


def onnx_input_dims(onnx_path) -> dict[str, list]:
    """{input: dims} with None for symbolic/unknown dims."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in initializers}


def _shape_spec(dims: dict[str, list], batch: int, imgsz: int) -> str:
    def fill(axis, d):
        return d if d is not None else (batch if axis == 0 else imgsz)
    return ",".join(f"{name}:" + "x".join(str(fill(a, d)) for a, d in enumerate(shape)) for name, shape in dims.items())


def trtexec_commands(profile, *, dla_core: int | None, input_dims: dict[str, list],
                     batch: int | None = None) -> dict[int, list[str]]:
    """The equivalent trtexec command line(s) per TensorRT major (10: weak or strong typing; 11: strong only)."""
    batch = batch or profile.default_batch
    common = [f"--memPoolSize=workspace:{profile.workspace_mb}M", f"--timingCacheFile={BUNDLE_TIMING_CACHE}",
              "--builderOptimizationLevel=3", "--profilingVerbosity=detailed", "--exportLayerInfo=model.layers.json",
              "--noTF32"]  # as build_on_device.sh builds: TF32 would round float layers' inputs (NvInfer.h kTF32)
    if any(None in dims for dims in input_dims.values()):
        common.append(f"--shapes={_shape_spec(input_dims, batch, profile.default_imgsz)}")
    if dla_core is not None:
        common += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    base = f"trtexec --onnx={BUNDLE_ONNX} --saveEngine=model.engine"
    # trtexec 11 stops at --int8/--fp16 ("Unknown option") and takes --stronglyTyped as a no-op: no precision flag
    return {10: [" ".join([base, "--int8", "--fp16", *common]), " ".join([base, "--stronglyTyped", *common])],
            11: [" ".join([base, *common])]}


def _trtexec_markdown(profile, commands: dict[int, list[str]]) -> str:
    lines = [f"# Building the engine with trtexec ({profile.name})", "",
             "`build_on_device.sh` does the same through the TensorRT Python API and also checks parity and writes",
             "the receipt; use trtexec only to cross-check. On JetPack, trtexec is `/usr/src/tensorrt/bin/trtexec`.", ""]
    if 10 in profile.tensorrt_majors:
        lines += ["## TensorRT 10.x (JetPack 6: TensorRT 10.3)", "",
                  "Q/DQ model, weak typing (NVIDIA's QAT recipe: layers without Q/DQ may run FP16):", "",
                  "```", commands[10][0], "```", "",
                  "or strongly typed (every layer runs in the type the ONNX gives it):", "",
                  "```", commands[10][1], "```", ""]
    if 11 in profile.tensorrt_majors:
        lines += ["## TensorRT 11.x (JetPack >= 7.2.2 with TensorRT >= 11.4.1)", "",
                  "Networks are always strongly typed; 11.x removed --int8, --fp16, --best and --calib",
                  "(they stop trtexec with \"Unknown option\"; --stronglyTyped is a no-op):", "", "```",
                  commands[11][0], "```", ""]
    lines += ["Check the result: `--exportLayerInfo` lists every layer's precision; Q/DQ convolutions should be INT8."]
    return "\n".join(lines) + "\n"


def _script(target_arg: str, dla_core: int | None, package_spec: str, has_timing_cache: bool, wheel: str | None) -> str:
    extra = [f"--dla-core {dla_core}"] if dla_core is not None else []
    if has_timing_cache:
        extra.append(f"--timing-cache {BUNDLE_TIMING_CACHE}")
    command = (f"ghost-deploy build-engine --onnx {BUNDLE_ONNX} --target {shlex.quote(target_arg)} "
               f"--parity-set {BUNDLE_PARITY} --require-engine --out . {' '.join(extra)}").strip()
    # the engine stage is torch-free: the bundle's own wheel without its dependencies, then only what that stage
    # imports (TensorRT and its CUDA bindings come with JetPack / the TensorRT container)
    install = (f'python3 -m pip install --no-deps "{BUNDLE_WHEELS}/{wheel}" && python3 -m pip install {ENGINE_STAGE_DEPS}'
               if wheel else f'python3 -m pip install "${{GHOST_DEPLOY_PIP_SPEC:-{package_spec}}}"')
    return f"""#!/usr/bin/env bash
# Build and verify the TensorRT engine on the device itself (engines are bound to its TensorRT and GPU).
# Writes <name>.engine and <name>.receipt.json here, or <name>.FAILED.engine and exits 1 if parity fails.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import tensorrt" 2>/dev/null; then
  echo "TensorRT Python bindings not found. On a Jetson they come with JetPack (sudo apt install python3-libnvinfer);" >&2
  echo "on x86 use the NVIDIA TensorRT container or NVIDIA's pip index." >&2
  exit 1
fi
if ! command -v ghost-deploy >/dev/null 2>&1; then
  {install}
fi
export GHOST_DEPLOY_TARGETS_DIR="${{GHOST_DEPLOY_TARGETS_DIR:-$PWD/{BUNDLE_TARGETS}}}"
{command} "$@"
"""


@functools.lru_cache(maxsize=1)
def _project_wheel() -> Path | None:
    """A wheel of this ghost-deploy: GHOST_DEPLOY_WHEEL, else built once from the source tree (pip wheel
    --no-deps); None where neither exists (an install from an index: the script then installs from one)."""
    given = os.environ.get("GHOST_DEPLOY_WHEEL")
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(path, "GHOST_DEPLOY_WHEEL names no wheel file")
        return path
    source = Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").is_file():
        return None
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and the user's
    # checkout is not ours to write. The folder goes when the process ends.
    folder = Path(tempfile.mkdtemp(prefix="ghost-deploy-wheel-"))
    atexit.register(shutil.rmtree, folder, True)
    tree = folder / "source"
    shutil.copytree(source / "ghost_deploy", tree / "ghost_deploy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        if (source / name).is_file():
            shutil.copyfile(source / name, tree / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(folder), str(tree)], capture_output=True, text=True)
    wheels = sorted(folder.glob("ghost_deploy-*.whl"))
    return wheels[0] if built.returncode == 0 and wheels else None


def _readme(profile, reason: str, dla_core: int | None) -> str:
    return f"""NO ENGINE WAS BUILT.
Reason: {reason}

A TensorRT engine only runs on the TensorRT version and GPU it was built with, so it has to be built on
the target ({profile.name}: {profile.description}). This folder holds everything needed to do that:

  {BUNDLE_ONNX:<22} the QDQ ONNX (its bit plan is in the ONNX metadata and in {BUNDLE_RECEIPT})
  {BUNDLE_PARITY:<22} fixed inputs and reference outputs; the engine must match them to be kept
  {BUNDLE_TARGET:<22} the target profile (SM {profile.compute_capability}, TensorRT {profile.tensorrt_majors}.x, workspace {profile.workspace_mb} MB)
  {BUNDLE_RECEIPT:<22} hashes and everything known so far ("built": false)
  {BUNDLE_SCRIPT:<22} run this on the device: builds, checks parity, writes the receipt
  {BUNDLE_TRTEXEC:<22} the equivalent trtexec commands for the TensorRT majors this target ships ({'/'.join(f"{m}.x" for m in profile.tensorrt_majors)})
  {BUNDLE_WHEELS + "/":<22} a wheel of ghost-deploy, installed without dependencies (no PyTorch on the device)
  {BUNDLE_TARGETS + "/":<22} the target profiles (a wheel carries none)

On the device:   bash {BUNDLE_SCRIPT}{f"   (DLA core {dla_core}, GPU fallback on)" if dla_core is not None else ""}
"""


def write_bundle(onnx_path, parity_set_path, profile, out_dir, *, reason: str, target_arg: str | None = None,
                 dla_core: int | None = None, timing_cache=None, partial_receipt: Receipt,
                 name: str | None = None, package_spec: str | None = None) -> dict:
    """Write `<name>.bundle/` (temp folder + rename) and `<name>.bundle.tar.gz`; returns their paths."""
    onnx_path, parity_set_path, out_dir = Path(onnx_path), Path(parity_set_path), Path(out_dir)
    name = name or f"{onnx_path.stem}-{profile.name}"
    final = out_dir / f"{name}.bundle"
    make_folder(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.bundle.", dir=out_dir))
    try:
        shutil.copyfile(onnx_path, staging / BUNDLE_ONNX)
        shutil.copyfile(parity_set_path, staging / BUNDLE_PARITY)
        if profile.source_path:
            shutil.copyfile(profile.source_path, staging / BUNDLE_TARGET)
        has_cache = bool(timing_cache) and Path(timing_cache).is_file()
        if has_cache:
            shutil.copyfile(timing_cache, staging / BUNDLE_TIMING_CACHE)
        write_json_atomic(staging / BUNDLE_RECEIPT, partial_receipt.to_dict())
        wheel = _project_wheel()
        if wheel is not None:
            (staging / BUNDLE_WHEELS).mkdir()
            shutil.copyfile(wheel, staging / BUNDLE_WHEELS / wheel.name)
        shutil.copytree(targets_dir(), staging / BUNDLE_TARGETS)  # a wheel carries no profiles (package data)
        script = staging / BUNDLE_SCRIPT
        write_text_atomic(script, _script(target_arg or profile.name, dla_core,
                                          package_spec or f"ghost-deploy=={__version__}", has_cache,
                                          None if wheel is None else wheel.name))
        script.chmod(0o755)
        commands = trtexec_commands(profile, dla_core=dla_core, input_dims=onnx_input_dims(onnx_path))
        write_text_atomic(staging / BUNDLE_TRTEXEC, _trtexec_markdown(profile, commands))
        write_text_atomic(staging / BUNDLE_README, _readme(profile, reason, dla_core))
        staging.chmod(0o755)
        if final.exists():  # replace an older bundle: move it aside first, a rename cannot overwrite a folder
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir))
            os.replace(final, old / "bundle")
            shutil.rmtree(old)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    tar_path = out_dir / f"{name}.bundle.tar.gz"
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w:gz") as archive:
            archive.add(final, arcname=final.name)
    return {"bundle_dir": str(final), "bundle_tar": str(tar_path), "bundle_tar_sha256": sha256_file(tar_path)}


def run_bundle_parity(bundle_dir, runner, budgets: Budgets | None = None) -> ParityReport:
    """The bundle's parity check: its parity set (hash checked against the partial receipt) through `runner`."""
    bundle_dir = Path(bundle_dir)
    receipt_path = bundle_dir / BUNDLE_RECEIPT
    receipt = Receipt.from_dict(read_user_json(receipt_path, "bundle receipt"), source=receipt_path)
    parity_set = load_parity_set(bundle_dir / BUNDLE_PARITY)
    expected = receipt.hashes.get("parity_set")
    if expected and expected != parity_set.sha256:
        raise UserError(bundle_dir / BUNDLE_PARITY, "parity set does not match the hash in the bundle receipt")
    return run_parity(parity_set, runner, budgets)
