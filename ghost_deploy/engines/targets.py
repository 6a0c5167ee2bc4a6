"""Deployment target profiles (engines/targets/*.yaml) and Jetson board detection.

A profile is data: compute capability, the TensorRT majors the platform ships, DLA cores, memory and
workspace budgets, default batch/image size, and the device-tree model strings that identify the board.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_yaml

TARGETS_DIR_ENV = "GHOST_DEPLOY_TARGETS_DIR"
DEFAULT_JETSON = "jetson-agx-orin"
# /proc/device-tree links into /sys/firmware, which Docker masks by default (moby oci/defaults.go MaskedPaths);
# jetson-containers' run.sh copies the model string to /tmp/nv_jetson_model and mounts it into the container
DEVICE_TREE_MODEL_FILES = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model", "/tmp/nv_jetson_model")
JETSON_TARGET_ENV = "GHOST_DEPLOY_JETSON_TARGET"  # e.g. jetson-orin-nx: names the board where it cannot be seen
NV_TEGRA_RELEASE = "/etc/nv_tegra_release"
REQUIRED_KEYS = ("name", "kind", "compute_capability", "tensorrt_majors", "dla_cores",
                 "memory_budget_mb", "workspace_mb", "default_batch", "default_imgsz")
OPENVINO_REQUIRED_KEYS = ("name", "kind", "default_batch")
KINDS = ("jetson", "dgpu", "openvino")
# The export form each runtime is proven on (docs/engines.md, "Which form for which compiler"): TensorRT takes
# signed int8 activations with zero point 0 (its parser rejects other zero points); OpenVINO computes the
# TensorRT form wrongly and the CPU form (uint8 activations) right.
EXPORT_FORMS = {"tensorrt": "trt", "openvino": "cpu"}


@dataclass
class TargetProfile:
    name: str
    kind: str  # "jetson", "dgpu" (TensorRT) or "openvino" (OpenVINO on this CPU)
    compute_capability: str | None = None
    tensorrt_majors: list[int] = field(default_factory=list)
    dla_cores: int = 0
    memory_budget_mb: int = 0
    workspace_mb: int = 0
    default_batch: int = 1
    default_imgsz: int = 640
    description: str = ""
    # Engine parity budgets over the parity set's own (compare.Budgets keys): a compiled engine requantizes with
    # its own rounding, so it is held to the exact reference with the allowance written here (docs/engines.md)
    parity: dict = field(default_factory=dict)
    inference_precision: str = "f32"  # OpenVINO: precision of the float layers
    threads: int | None = None  # OpenVINO: inference threads (None: the plugin's default)
    dla_max_tensorrt: dict = field(default_factory=dict)  # TensorRT majors and the last minor of each with DLA
    compute_capability_aliases: list[str] = field(default_factory=list)
    tensorrt_tested: list[str] = field(default_factory=list)  # TensorRT versions an engine of ours was built with
    tensorrt_documented: list[str] = field(default_factory=list)  # what NVIDIA documents for the platform
    jetpack: list[str] = field(default_factory=list)
    min_jetpack_for_trt11: str | None = None
    memory_mb: int | None = None
    device_tree_models: list[str] = field(default_factory=list)
    source_path: str | None = None

    @property
    def is_jetson(self) -> bool:
        return self.kind == "jetson"

    @property
    def runtime(self) -> str:
        return "openvino" if self.kind == "openvino" else "tensorrt"

    @property
    def export_form(self) -> str:
        """The export form (`ghost.target`) this target's compiler is proven on."""
        return EXPORT_FORMS[self.runtime]

    def accepts_compute_capability(self, sm: str | None) -> bool:
        """True when a GPU with this SM can run engines built for the profile (None profile SM = any)."""
        if self.compute_capability is None:
            return True
        return sm is not None and str(sm) in [self.compute_capability, *self.compute_capability_aliases]

    def to_dict(self) -> dict:
        return asdict(self)


def targets_dir() -> Path:
    """The folder of bundled profiles: GHOST_DEPLOY_TARGETS_DIR, else the source tree's engines/targets,
    else a copy installed as package data (ghost_deploy/targets or ghost_deploy/engines/targets)."""
    override = os.environ.get(TARGETS_DIR_ENV)
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    candidates = (here.parents[1] / "engines" / "targets", here.parent / "targets", here / "targets")
    return next((c for c in candidates if c.is_dir() and any(c.glob("*.yaml"))), candidates[0])


def list_targets() -> list[str]:
    folder = targets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _parse_profile(path: Path) -> TargetProfile:
    data = read_user_yaml(path, "target profile")  # bounded, and a YAML error is one line
    if not isinstance(data, dict):
        raise UserError(path, "target profile must be a YAML mapping")
    if data.get("kind") not in KINDS:
        raise UserError(path, f"kind must be one of {', '.join(KINDS)}, not {data.get('kind')!r}")
    missing = [k for k in (OPENVINO_REQUIRED_KEYS if data["kind"] == "openvino" else REQUIRED_KEYS) if k not in data]
    if missing:
        raise UserError(path, f"target profile lacks {missing}")
    known = set(TargetProfile.__dataclass_fields__) - {"source_path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(path, f"target profile has unknown keys {unknown}")
    if not isinstance(data.get("parity", {}), dict):
        raise UserError(path, "parity must be a mapping of parity budgets")
    if data["kind"] == "openvino":
        return TargetProfile(**data, source_path=str(path))
    majors = data["tensorrt_majors"]
    if not isinstance(majors, list) or not majors or not all(m in (10, 11) for m in majors):
        raise UserError(path, f"tensorrt_majors must be a non-empty list of 10 and/or 11, not {majors!r}")
    if data["compute_capability"] is not None:
        data["compute_capability"] = str(data["compute_capability"])
    data["compute_capability_aliases"] = [str(s) for s in data.get("compute_capability_aliases") or []]
    for key in ("dla_cores", "memory_budget_mb", "workspace_mb", "default_batch", "default_imgsz"):
        if not isinstance(data[key], int) or data[key] < 0:
            raise UserError(path, f"{key} must be a non-negative integer, not {data[key]!r}")
    return TargetProfile(**data, source_path=str(path))


def load_target(name_or_path: str | os.PathLike) -> TargetProfile:
    """A profile by name (`jetson-orin-nx`, or `jetson` for the board we run on) or by YAML path."""
    text = str(name_or_path)
    if text == "jetson":
        return resolve_target("jetson")
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(path, "target profile not found")
        return _parse_profile(path)
    candidate = targets_dir() / f"{text}.yaml"
    if not candidate.is_file():
        known = ", ".join(["jetson", *list_targets()])
        raise UserError("--target", f"unknown target '{text}'; known targets: {known}")
    return _parse_profile(candidate)


def read_device_tree_model(paths=DEVICE_TREE_MODEL_FILES) -> str | None:
    for candidate in paths:
        try:
            raw = Path(candidate).read_bytes()
        except OSError:
            continue
        return raw.rstrip(b"\x00\n ").decode("utf-8", errors="replace")
    return None


def detect_jetson(model_string: str | None = None) -> TargetProfile | None:
    """The profile of the Jetson we run on: GHOST_DEPLOY_JETSON_TARGET, else the device-tree model string; None
    off-Jetson (or where the board is hidden: see `resolve_target`)."""
    override = os.environ.get(JETSON_TARGET_ENV)
    if override:
        return load_target(override)
    model = read_device_tree_model() if model_string is None else model_string
    if not model:
        return None
    lowered = model.lower()
    for name in list_targets():
        profile = load_target(name)
        if any(pattern.lower() in lowered for pattern in profile.device_tree_models):
            return profile
    return None


def resolve_target(name_or_path: str | os.PathLike, model_string: str | None = None) -> TargetProfile:
    """`jetson` -> the board we run on, else the default Jetson (AGX Orin); anything else -> load_target."""
    if str(name_or_path) == "jetson":
        board = detect_jetson(model_string)
        if board is None and Path(NV_TEGRA_RELEASE).is_file():  # a Jetson (L4T) whose module we cannot see
            raise UserError("--target", "this is a Jetson but its board model is hidden (Docker masks /sys/firmware): "
                            f"set {JETSON_TARGET_ENV}=<profile>, name the target (--target jetson-orin-nx), or mount "
                            "/tmp/nv_jetson_model (docs/engines.md)")
        return board or load_target(DEFAULT_JETSON)
    return load_target(name_or_path)
