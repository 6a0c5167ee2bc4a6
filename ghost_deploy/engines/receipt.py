"""The receipt written beside every engine (and, partial, into every bundle).

It records what the engine is bound to (TensorRT major.minor, GPU SM, JetPack/L4T), what went in (hashes of
checkpoint, ONNX, parity set), what came out (engine hash, per-layer precision as built, DLA placement),
the parity verdict, and how engine layers map back to the bit plan. `verify_runtime` reads it before
TensorRT does, so a version or GPU mismatch gets a plain sentence instead of a deserialisation failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from ghost_deploy.bitplan import BitPlan
from ghost_deploy.contract import OnnxMetadata, Receipt
from ghost_deploy.engines.openvino import verify_runtime as openvino_verify_runtime
from ghost_deploy.engines.targets import JETSON_TARGET_ENV, NV_TEGRA_RELEASE, detect_jetson, read_device_tree_model
from ghost_deploy.engines.trt import trt_version
from ghost_deploy.io import read_user_json, sha256_file, write_json_atomic
from ghost_deploy.onnx_graph import read_metadata_props


def read_l4t_release(path: str = NV_TEGRA_RELEASE) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' -> '36.4.3'; None off-Jetson."""
    try:
        first = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"{match.group(1)}.{match.group(2)}" if match else first.strip()


def _cuda_python_device() -> dict | None:
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    err_rt, runtime_version = cudart.cudaRuntimeGetVersion()
    err_drv, driver_version = cudart.cudaDriverGetVersion()
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    fmt = lambda v: f"{v // 1000}.{(v % 1000) // 10}"  # noqa: E731  (CUDA encodes 12060 as 12.6)
    return {"gpu_name": name, "compute_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": fmt(runtime_version) if err_rt == cudart.cudaError_t.cudaSuccess else None,
            "cuda_driver_api": fmt(driver_version) if err_drv == cudart.cudaError_t.cudaSuccess else None}


def _nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 3:
        return None
    return {"gpu_name": parts[0], "compute_capability": parts[1], "driver_version": parts[2]}


def observe_environment() -> dict:
    """What this machine runs: TensorRT, CUDA, driver, GPU name and SM, L4T, Jetson board."""
    env = {"tensorrt_version": trt_version(), "cuda_runtime": None, "cuda_driver_api": None, "driver_version": None,
           "gpu_name": None, "compute_capability": None, "l4t": read_l4t_release(),
           "device_tree_model": read_device_tree_model(), "jetson_target": None}
    for source in (_cuda_python_device(), _nvidia_smi()):
        for key, value in (source or {}).items():
            if env.get(key) is None and value not in (None, "", "[N/A]", "N/A"):
                env[key] = value
    board = detect_jetson(env["device_tree_model"]) if env["device_tree_model"] or os.environ.get(JETSON_TARGET_ENV) \
        else None
    if board is not None:
        env["jetson_target"] = board.name
        if env["compute_capability"] is None:  # Jetson nvidia-smi may lack compute_cap; the SoC fixes it
            env["compute_capability"] = board.compute_capability
    return env


def read_bit_plan(onnx_path, metadata: dict[str, str] | None = None) -> BitPlan | None:
    """The bit plan the export stage stored in the ONNX metadata; None for an FP32 export or a foreign ONNX."""
    metadata = read_metadata_props(onnx_path) if metadata is None else metadata
    if not OnnxMetadata.is_ours(metadata):
        return None
    return OnnxMetadata.from_strings(metadata, source=onnx_path).bit_plan


def map_engine_layers_to_plan(engine_layers: list[str], plan_layer_names) -> dict[str, list[str]]:
    """{plan layer: engine layers whose name contains it as a whole dotted name}.

    Fused engine layers carry every ONNX node name they absorbed ('model.3.conv + model.3.act ...');
    exporters that write '/model.3/conv/Conv' are matched too ('/' is read as '.').
    """
    normalised = [(name, name.replace("/", ".")) for name in engine_layers]
    mapping = {}
    for plan_name in plan_layer_names:
        pattern = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(plan_name) + r"(?![A-Za-z0-9_])")
        mapping[plan_name] = [name for name, text in normalised if pattern.search(text)]
    return mapping


def plan_precision_report(layers: list[dict], bit_plan: BitPlan | None) -> dict:
    """Per plan layer: engine layers and the precision they ran in; warns where a quantized layer is not INT8."""
    entries = {} if bit_plan is None else {name: layer.weight_bits for name, layer in bit_plan.layers.items()}
    # reformat/copy layers only move a tensor between formats; their names mention the consumer layer
    compute = [layer for layer in layers if "reformat" not in f"{layer.get('type')} {layer['name']}".lower()]
    searchable = [f"{layer['name']} {layer.get('metadata') or ''}" for layer in compute]
    mapping = map_engine_layers_to_plan(searchable, list(entries))
    by_text = dict(zip(searchable, compute))
    report, warnings = {}, []
    for plan_name, texts in mapping.items():
        precisions = sorted({by_text[t].get("precision") or "unknown" for t in texts})
        bits = entries[plan_name]
        report[plan_name] = {"engine_layers": [by_text[t]["name"] for t in texts], "precisions": precisions,
                             "weight_bits": bits}
        if not texts:
            warnings.append(f"plan layer {plan_name} not found in any engine layer name")
        elif isinstance(bits, int) and bits <= 8 and "INT8" not in precisions:
            warnings.append(f"plan layer {plan_name} is W{bits} but ran {'/'.join(precisions)}")
    return {"layers": report, "unmapped": [n for n, t in mapping.items() if not t], "warnings": warnings}


def file_hashes(**paths) -> dict[str, str | None]:
    return {key: (sha256_file(p) if p and Path(p).is_file() else None) for key, p in paths.items()}


def make_receipt(*, target: dict, hashes: dict, bit_plan: BitPlan | None, environment: dict | None = None,
                 build: dict | None = None, parity: dict | None = None, extra: dict | None = None) -> Receipt:
    """Assemble a receipt; `build` None means a partial receipt (no engine yet)."""
    facts = None
    if build is not None and build.get("runtime") == "openvino":
        facts = {key: build[key] for key in Receipt.BUILD_KEYS if key in build}
    elif build is not None:
        facts = {
            "tensorrt_version": build["tensorrt_version"], "trt_world": build["trt_world"],
            "flags": build["flags"], "dla_core": build["dla_core"], "build_seconds": build["build_seconds"],
            "input_shapes": build["input_shapes"], "layers": build["layers"], "dla_placement": build["placement"],
            "plan_mapping": plan_precision_report(build["layers"], bit_plan),
            "version_compatible": bool(build.get("version_compatible", False)),
        }
    return Receipt(created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), target=target, hashes=hashes,
                   environment=environment, bit_plan=bit_plan, parity=parity, build=facts,
                   engine=None if build is None else Path(build["engine_path"]).name,
                   runtime=(build or {}).get("runtime", "tensorrt"), extra=dict(extra or {}))


def write_receipt(path, receipt: Receipt) -> None:
    write_json_atomic(path, receipt.to_dict())


def load_receipt(path) -> Receipt:
    return Receipt.from_dict(read_user_json(path, "receipt"), source=path)


def _major_minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def verify_runtime(receipt_path, environment: dict | None = None) -> list[str]:
    """Problems that would stop this engine from loading here ([] = fine). `environment` defaults to
    `observe_environment()`; pass one to check another machine's description."""
    receipt = load_receipt(receipt_path)
    if not receipt.built:
        return [f"{receipt_path}: no engine was built (partial receipt); build it on the device first"]
    if receipt.runtime == "openvino":
        return openvino_verify_runtime(receipt.build, environment)
    env = observe_environment() if environment is None else environment
    problems = []
    built_trt, have_trt = receipt.build.get("tensorrt_version"), env.get("tensorrt_version")
    if have_trt is None:
        problems.append(f"TensorRT is not installed here; the engine needs TensorRT {built_trt}")
    elif not _loads_on(built_trt, have_trt, receipt.build.get("version_compatible", False)):
        problems.append(f"engine built with TensorRT {built_trt}, this machine has {have_trt} (an engine loads only on "
                        f"the exact TensorRT it was built with unless built version-compatible; rebuild with "
                        f"build_on_device.sh)")
    built_env = receipt.environment or {}
    built_sm, have_sm = built_env.get("compute_capability"), env.get("compute_capability")
    if built_sm and have_sm and str(built_sm) != str(have_sm):
        problems.append(f"engine built for GPU SM {built_sm}, this GPU is SM {have_sm}")
    elif built_sm and not have_sm:
        problems.append(f"no CUDA GPU found here; the engine needs SM {built_sm}")
    built_l4t, have_l4t = built_env.get("l4t"), env.get("l4t")
    # the L4T major is the JetPack generation (R36 = JetPack 6, R38/R39 = JetPack 7); patch releases keep engines
    if built_l4t and (have_l4t or "").split(".")[0] != built_l4t.split(".")[0]:
        problems.append(f"engine built on L4T {built_l4t} (JetPack), this machine has "
                        f"{'L4T ' + have_l4t if have_l4t else 'no L4T (not a Jetson)'}")
    return problems


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _loads_on(built: str | None, have: str, version_compatible: bool) -> bool:
    """TensorRT deserializes an engine only with the exact library version that built it (major.minor.patch),
    unless it was built with BuilderFlag.VERSION_COMPATIBLE: then the same or a newer runtime of that major
    (docs: "Version Compatibility", developer guide)."""
    if not built:
        return False
    if version_compatible:
        return _release(have)[0] == _release(built)[0] and _release(have) >= _release(built)
    return _release(have) == _release(built)
