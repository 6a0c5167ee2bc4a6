"""Checkpoints: one safetensors file whose header carries the JSON that makes it self-describing.

The JSON (`ghost` key of the safetensors metadata) is a `contract.CheckpointHeader`: the model config,
classes, input mode, image size, the recipe, the bit plan of a quantized model, and metrics. Loading
never unpickles anything: a legacy `.pt` file is refused unless it loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as save_tensors

from ghost_deploy.contract import CHECKPOINT_FORMAT, CheckpointHeader
from ghost_deploy.errors import UserError
from ghost_deploy.io import atomic_path
from ghost_deploy.model import CONFIGS, INPUT_MODES, build_model
from ghost_deploy.quant.quantizers import quantize_model


@dataclass
class Checkpoint:
    """A loaded checkpoint: the tensors and the metadata that says how to rebuild the model."""

    meta: CheckpointHeader
    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, header: CheckpointHeader | dict,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model`'s state (plus optional extra tensors, e.g. EMA or optimiser state) atomically.

    `header` may be a plain dict of the header's fields: it is decoded (and so checked) like a read header.
    """
    if not isinstance(header, CheckpointHeader):
        header = CheckpointHeader.from_dict({"format": CHECKPOINT_FORMAT, **header}, source=path)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for key, value in (extra or {}).items():
        tensors[key] = value.detach().to("cpu").contiguous()
    path = Path(path)
    # Serialised in memory, then written by Python: a full or read-only disk is then an OSError that atomic_path
    # reports naming `path` (safetensors' own writer raises an opaque SafetensorError).
    data = save_tensors(tensors, metadata={"ghost": json.dumps(header.to_dict())})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def read_meta(path: str | os.PathLike) -> CheckpointHeader:
    """The JSON header of a checkpoint, without loading tensors."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(path, f"not a safetensors checkpoint ({error})") from None
    return _parse_meta(path, metadata)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    _check_exists(path)
    if path.suffix in {".pt", ".pth"}:
        return _load_legacy(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(path, f"not a readable safetensors checkpoint ({error})") from None
    meta = _parse_meta(path, metadata)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(path, f"tensor {name} has non-finite values (NaN or inf)")
    return Checkpoint(meta=meta, tensors=tensors, path=path)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(path, "no such checkpoint")
    if path.is_dir():
        raise UserError(path, "is a folder, expected a .safetensors checkpoint")


def _parse_meta(path: Path, metadata: dict) -> CheckpointHeader:
    if "ghost" not in metadata:
        raise UserError(path, "safetensors file has no ghost-deploy metadata (not one of our checkpoints)")
    try:
        meta = json.loads(metadata["ghost"])
    except json.JSONDecodeError as error:
        raise UserError(path, f"checkpoint metadata is not valid JSON ({error})") from None
    header = CheckpointHeader.from_dict(meta, source=path)
    _check_header(path, header)
    return header


def _check_header(path: Path, header: CheckpointHeader) -> None:
    """What the model is rebuilt from, checked before it is: a bad entry is one line naming the checkpoint and the
    key (not a shape error deep in the model, or a TypeError in the export)."""
    what = "checkpoint metadata"
    if header.model not in CONFIGS:
        raise UserError(path, f"{what} 'model': unknown model {header.model!r} (known: {', '.join(CONFIGS)})")
    if header.input_mode not in INPUT_MODES:
        raise UserError(path, f"{what} 'input_mode': must be one of {', '.join(INPUT_MODES)}, "
                              f"got {header.input_mode!r}")
    expected = list(INPUT_MODES[header.input_mode])
    if header.input_names and list(header.input_names) != expected:
        raise UserError(path, f"{what} 'input_names' {header.input_names} do not fit input_mode {header.input_mode} "
                              f"(inputs {expected})")
    stride = CONFIGS[header.model].max_stride
    size = header.img_size
    if isinstance(size, bool) or not isinstance(size, int) or size < stride or size % stride:
        raise UserError(path, f"{what} 'img_size': must be a positive multiple of {stride} (the deepest stride of "
                              f"{header.model}), got {size!r}")
    for key, kinds in (("sr", (bool,)), ("version", (str, type(None))), ("stage", (str, type(None))),
                       ("data", (str, type(None)))):
        if not isinstance(getattr(header, key), kinds):
            names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
            raise UserError(path, f"{what} {key!r} must be {names}, got {type(getattr(header, key)).__name__}")


def _check_geometry(path, header: CheckpointHeader, model) -> CheckpointHeader:
    """The header's strides and anchors are the rebuilt model's (decoding the ONNX uses them); a header that
    records none gets the model's."""
    actual = {"strides": model.detect.stride.tolist(), "anchors_pixels": model.detect.anchors_pixels.tolist()}
    for key, value in actual.items():
        recorded = getattr(header, key)
        if not recorded:
            header = dataclasses.replace(header, **{key: value})
        elif not _close(recorded, value):
            raise UserError(path, f"checkpoint metadata {key!r} {_short(recorded)} does not match the model's "
                                  f"{_short(value)}")
    return header


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _close(recorded, value) -> bool:
    if isinstance(value, list):
        return isinstance(recorded, list) and len(recorded) == len(value) and all(map(_close, recorded, value))
    number = isinstance(recorded, (int, float)) and not isinstance(recorded, bool)
    return number and abs(recorded - value) <= 1e-6 * max(1.0, abs(value))


def _load_legacy(path: Path) -> Checkpoint:
    """A `.pt` is read only as plain tensors (weights_only=True): pickled code is refused, never run."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError subclasses here
        raise UserError(path, f"refused: legacy checkpoint holds objects other than tensors ({type(error).__name__}); "
                        "only safetensors checkpoints or weights-only .pt files are loaded") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(path, "legacy checkpoint is not a flat dict of tensors")
    raise UserError(path, "legacy .pt read safely (weights only) but it has no ghost-deploy metadata: build the model "
                    "with ghost_deploy.build_model(...) and load_state_dict() it yourself, then save a checkpoint")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike | None, strict: bool = True) -> None:
    """`load_state_dict` with missing/extra tensors and shape mismatches reported as one-line UserErrors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if strict and (missing or extra):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        raise UserError(path, "checkpoint does not match the model: " + ", ".join(parts))
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise UserError(path, f"tensor {key} has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def model_from_checkpoint(path, with_sr: bool = True) -> tuple[torch.nn.Module, CheckpointHeader]:
    """Rebuild the exact model a checkpoint was saved from (quantizers and bit plan included)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    state = ckpt.model_state
    has_sr = any(k.startswith("sr.") for k in state)
    model = build_model(meta.model, nc=meta.nc, input_mode=meta.input_mode, sr=has_sr)
    if meta.bit_plan is not None:
        model = quantize_model(model, meta.bit_plan, scale_init="max")  # scales are overwritten by the checkpoint's
    load_model_state(model, state, path)
    meta = _check_geometry(path, meta, model)
    if has_sr and not with_sr:
        model.sr = None
    return model.eval(), meta
