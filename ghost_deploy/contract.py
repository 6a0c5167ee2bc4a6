"""The stage contract: what one stage's artifact tells the next, as typed records. Torch-free.

Four records cross stage boundaries, each with one encoder (`to_dict` / `to_strings`) and one decoder
(`from_dict` / `from_strings`) that every stage uses:

| record             | written by        | carried in                                    |
|--------------------|-------------------|-----------------------------------------------|
| `CheckpointHeader` | train, ptq, sample| the safetensors header (`ghost` JSON entry)    |
| `OnnxMetadata`     | export            | the ONNX `metadata_props` (`ghost.*` keys)     |
| `ParityMeta`       | export            | the parity set `.npz` (`meta` entry)           |
| `Receipt`          | build-engine      | `<engine>.receipt.json`, bundles (partial)     |

The bit plan inside them is a `BitPlan`, decoded once here; its size, BOPs and average bits are its own
`totals`. This module is the only one that spells the `ghost.*` metadata keys.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ghost_deploy.bitplan import BitPlan
from ghost_deploy.errors import UserError

# Smallest quantizer scale: quantizers clamp to it, and exact-arithmetic parity must use the same floor.
MIN_SCALE = 1e-8

CHECKPOINT_FORMAT = "ghost-deploy/checkpoint/v1"
ONNX_FORMAT = "ghost-deploy/onnx/v1"
RECEIPT_SCHEMA = "ghost-deploy/engine-receipt/1"
METADATA_PREFIX = "ghost."


def _require(source, data, key: str, kind, what: str):
    if key not in data:
        raise UserError(source, f"{what} lacks {key!r}")
    value = data[key]
    if kind is not None and not isinstance(value, kind):
        raise UserError(source, f"{what} {key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _check_kinds(values: dict, kinds: dict, what: str, source) -> None:
    """Each present key of `values` has its kind in `kinds` (None allowed where the kinds include NoneType)."""
    for key, allowed in kinds.items():
        value = values.get(key)
        if key in values and (not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
            raise UserError(source, f"{what} {key!r} must be {names}, got {type(value).__name__}")


_OPTIONAL = type(None)
PARITY_META_KINDS = {
    "head_output_names": (list,), "image_paths": (list,), "image_sha256": (list,), "image_source": (str,),
    "img_size": (int, _OPTIONAL), "strides": (list, _OPTIONAL), "anchors_pixels": (list, _OPTIONAL),
    "nc": (int, _OPTIONAL), "names": (list,), "budgets": (dict, _OPTIONAL), "output_scales": (dict, _OPTIONAL),
    "checkpoint_sha256": (str, _OPTIONAL), "reference": (str,), "arithmetic": (str, _OPTIONAL),
    "onnx_sha256": (str, _OPTIONAL), "graph_sha256": (str, _OPTIONAL),
}
RECEIPT_KINDS = {"target": (dict, _OPTIONAL), "hashes": (dict, _OPTIONAL), "environment": (dict, _OPTIONAL),
                 "parity": (dict, _OPTIONAL), "bit_plan": (dict, _OPTIONAL), "engine": (str, _OPTIONAL),
                 "runtime": (str,), "created_utc": (str,)}


def _plan(value, source) -> BitPlan | None:
    return None if value is None else BitPlan.from_dict(value, source=source)


# ------------------------------------------------------------------------------------ checkpoint header
@dataclass
class CheckpointHeader:
    """What a checkpoint knows about itself: the model to rebuild, its classes and inputs, how it was made.

    Field order is the order written (a header re-encoded is byte-identical). `extra` holds what one stage
    adds for itself (metrics, epoch, teacher, distill, resume state, PTQ calibration) in insertion order.
    """

    model: str
    nc: int
    names: list[str]
    input_mode: str
    version: str | None = None
    stage: str | None = None
    input_names: list[str] = field(default_factory=list)
    img_size: int | None = None
    sr: bool = False
    data: str | None = None
    recipe: dict = field(default_factory=dict)
    strides: list[float] = field(default_factory=list)
    anchors_pixels: list = field(default_factory=list)
    bit_plan: BitPlan | None = None
    extra: dict = field(default_factory=dict)

    ORDER = ("version", "stage", "model", "nc", "names", "input_mode", "input_names", "img_size", "sr", "data",
             "recipe", "strides", "anchors_pixels", "bit_plan")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": CHECKPOINT_FORMAT}
        for key in self.ORDER:
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, BitPlan) else value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data, source=None) -> "CheckpointHeader":
        what = "checkpoint metadata"
        if not isinstance(data, dict):
            raise UserError(source, f"{what} must be a JSON object, got {type(data).__name__}")
        if data.get("format") != CHECKPOINT_FORMAT:
            raise UserError(source, f"unknown checkpoint format {data.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        nc = _require(source, data, "nc", int, what)
        names = _require(source, data, "names", list, what)
        if nc < 1 or len(names) != nc:
            raise UserError(source, f"{what}: nc is {nc} but {len(names)} class names are listed")
        known = {key: data[key] for key in cls.ORDER if key in data}
        known.update(model=_require(source, data, "model", str, what), nc=nc, names=[str(n) for n in names],
                     input_mode=_require(source, data, "input_mode", str, what),
                     bit_plan=_plan(data.get("bit_plan"), source))
        for key, kind in (("input_names", list), ("recipe", dict), ("strides", list), ("anchors_pixels", list)):
            if known.get(key) is None:
                known.pop(key, None)
            elif not isinstance(known[key], kind):
                raise UserError(source, f"{what} {key!r} must be {kind.__name__}, got {type(known[key]).__name__}")
        extra = {k: v for k, v in data.items() if k not in cls.ORDER and k != "format"}
        return cls(**known, extra=extra)

    def get(self, key: str, default=None):
        """A stage-specific entry (`metrics`, `epoch`, `teacher`, ...), or `default`."""
        return self.extra.get(key, default)

    @property
    def quantized(self) -> bool:
        return self.bit_plan is not None

    def dataset(self, checkpoint, option: str = "--data YAML") -> str | None:
        """The dataset YAML the checkpoint was trained on, when it records one (None otherwise).

        Training records the path made absolute; older checkpoints hold it as typed, relative to the folder training
        ran in. A recorded path that leads to no file from here is one line naming the checkpoint, the dataset and
        `option`, the way to name the dataset instead.
        """
        if not self.data or self.data == "embedded":
            return None
        if Path(self.data).is_file():
            return self.data
        relative = not Path(self.data).is_absolute()
        where = ("a path relative to the folder training ran in, not found from here" if relative
                 else "not there any more")
        raise UserError(checkpoint, f"was trained on the dataset {self.data}, {where}: pass {option}")


# ------------------------------------------------------------------------------------ ONNX metadata
@dataclass
class OnnxMetadata:
    """The `ghost.*` metadata_props of an exported ONNX (strings; structured values as compact JSON).

    `graph_sha256` binds the metadata to the graph (export/metadata.py computes it); it is not part of
    what `to_strings` writes, the caller adds it last.
    """

    model: str
    nc: int
    names: list[str]
    input_mode: str
    input_names: list[str]
    img_size: int
    strides: list[float]
    anchors: list
    head_output_names: list[str]
    output_names: list[str]
    bit_plan: BitPlan | None
    precision: str  # "qdq" | "fp32"
    target: str  # "trt" | "cpu"
    int4_weights: bool = False
    checkpoint_sha256: str = ""
    exporter: str = ""
    graph_sha256: str = ""

    TEXT_KEYS = ("model", "input_mode", "precision", "target", "checkpoint_sha256", "exporter")
    FORMAT_KEY = METADATA_PREFIX + "format"
    HASH_KEY = METADATA_PREFIX + "graph_sha256"

    def to_strings(self) -> dict[str, str]:
        """{ghost.key: string} including ghost.format, without ghost.graph_sha256."""
        out = {self.FORMAT_KEY: ONNX_FORMAT}
        for item in fields(self):
            if item.name == "graph_sha256":
                continue
            value = getattr(self, item.name)
            if isinstance(value, BitPlan):
                value = value.to_dict()
            out[METADATA_PREFIX + item.name] = value if item.name in self.TEXT_KEYS else \
                json.dumps(value, separators=(",", ":"))
        return out

    @classmethod
    def from_strings(cls, metadata: dict[str, str], source=None) -> "OnnxMetadata":
        """Decode ghost.* entries; UserError naming the file and the key on anything missing or malformed."""
        if metadata.get(cls.FORMAT_KEY) != ONNX_FORMAT:
            found = metadata.get(cls.FORMAT_KEY)
            raise UserError(source, "not a ghost-deploy export (no ghost.format metadata)" if found is None
                            else f"unknown ghost-deploy ONNX format {found!r}, expected {ONNX_FORMAT}")
        values: dict[str, Any] = {}
        for item in fields(cls):
            key = METADATA_PREFIX + item.name
            if key not in metadata:
                if item.default is not MISSING:
                    continue
                raise UserError(source, f"ONNX metadata lacks {key!r}")
            text = metadata[key]
            if item.name in cls.TEXT_KEYS or item.name == "graph_sha256":
                values[item.name] = text
                continue
            try:
                values[item.name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(source, f"ONNX metadata {key!r} is not valid JSON ({exc})") from None
        values["bit_plan"] = _plan(values.get("bit_plan"), source)
        return cls(**values)

    @classmethod
    def is_ours(cls, metadata: dict[str, str]) -> bool:
        return cls.FORMAT_KEY in metadata

    def plan_key(self) -> str | None:
        """Equal for two exports of the same bit plan (an export's other forms are found by it)."""
        return None if self.bit_plan is None else json.dumps(self.bit_plan.to_dict(), sort_keys=True)

    @property
    def int4_label(self) -> str:
        """How bench and reports name this export's precision."""
        if self.precision == "fp32":
            return "fp32"
        return ("int4w-qdq" if self.int4_weights else "int8-qdq") + ("-cpu" if self.target == "cpu" else "")


def metadata_key(name: str) -> str:
    """The metadata_props key of an OnnxMetadata field (`bit_plan` -> `ghost.bit_plan`)."""
    if name not in {item.name for item in fields(OnnxMetadata)} | {"format"}:
        raise KeyError(name)
    return METADATA_PREFIX + name


def ghost_entries(metadata: dict[str, str]) -> dict[str, str]:
    """Only the ghost.* entries of an ONNX's metadata_props (what the graph binding hashes)."""
    return {key: value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)}


# ------------------------------------------------------------------------------------ parity set meta
@dataclass
class ParityMeta:
    """What a parity set's reference outputs mean: inputs and outputs in model order, the images they came
    from, the head geometry to decode detections, the budgets and the reference's arithmetic."""

    input_names: list[str]
    output_names: list[str]
    head_output_names: list[str] = field(default_factory=list)
    image_paths: list = field(default_factory=list)
    image_sha256: list = field(default_factory=list)
    image_source: str = ""
    img_size: int | None = None
    strides: list[float] | None = None
    anchors_pixels: list | None = None
    nc: int | None = None
    names: list[str] = field(default_factory=list)
    budgets: dict | None = None
    output_scales: dict | None = None
    checkpoint_sha256: str | None = None
    reference: str = ""
    arithmetic: str | None = None
    onnx_sha256: str | None = None
    graph_sha256: str | None = None  # the ONNX's ghost.graph_sha256: what binds the set to its export
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data, source=None) -> "ParityMeta":
        if not isinstance(data, dict):
            raise UserError(source, "parity set meta must be a JSON object")
        known = {item.name for item in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("input_names", "output_names"):
            if not isinstance(values.get(key), list) or not all(isinstance(name, str) for name in values[key]):
                raise UserError(source, f"parity set meta {key!r} must be a list of names")
        _check_kinds(values, PARITY_META_KINDS, "parity set meta", source)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @property
    def describes_heads(self) -> bool:
        return self.strides is not None and self.anchors_pixels is not None and self.nc is not None


# ------------------------------------------------------------------------------------ engine receipt
@dataclass
class Receipt:
    """The receipt beside every engine (and, partial, in every bundle): what it is bound to, what went in,
    what came out, and the parity verdict. `build` is None for a partial receipt (no engine yet)."""

    created_utc: str
    target: dict
    hashes: dict
    environment: dict | None = None
    bit_plan: BitPlan | None = None
    parity: dict | None = None
    build: dict | None = None  # runtime-specific facts: versions, flags, layers, placement, plan mapping
    engine: str | None = None
    runtime: str = "tensorrt"  # "tensorrt" | "openvino"
    extra: dict = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return self.build is not None

    def to_dict(self) -> dict:
        out = {"schema": RECEIPT_SCHEMA, "created_utc": self.created_utc, "built": self.built, "runtime": self.runtime,
               "engine": self.engine, "target": self.target, "hashes": self.hashes, "environment": self.environment,
               "bit_plan": None if self.bit_plan is None else self.bit_plan.to_dict(), "parity": self.parity}
        out.update(self.build or {})
        out.update(self.extra)
        return out

    BUILD_KEYS = ("tensorrt_version", "trt_world", "flags", "dla_core", "build_seconds", "input_shapes", "layers",
                  "dla_placement", "plan_mapping", "version_compatible", "openvino_version", "device", "device_name",
                  "runtime_requirements", "compile_properties", "inference_precision", "threads", "precision_counts",
                  "graph_edits", "built_from")

    @classmethod
    def from_dict(cls, data, source=None) -> "Receipt":
        if not isinstance(data, dict) or data.get("schema") != RECEIPT_SCHEMA:
            raise UserError(source, f"not a ghost-deploy engine receipt (schema must be {RECEIPT_SCHEMA})")
        _check_kinds(data, RECEIPT_KINDS, "receipt", source)
        build = {k: data[k] for k in cls.BUILD_KEYS if k in data} if data.get("built") else None
        fixed = {"schema", "created_utc", "built", "runtime", "engine", "target", "hashes", "environment", "bit_plan",
                 "parity"}
        extra = {k: v for k, v in data.items() if k not in fixed and k not in cls.BUILD_KEYS}
        return cls(created_utc=str(data.get("created_utc", "")), target=data.get("target") or {},
                   hashes=data.get("hashes") or {}, environment=data.get("environment"),
                   bit_plan=_plan(data.get("bit_plan"), source), parity=data.get("parity"), build=build,
                   engine=data.get("engine"), runtime=data.get("runtime", "tensorrt"), extra=extra)
