"""What runs around the network in a deployed detector: frames in, detections out (numpy only).

Pre-processing takes the two sensors' uint8 frames (RGB (H, W, 3), IR (H, W)), scales the long side to
the model size, letterboxes both alike (pad 114) and packs them into float32 NCHW batches in [0, 1]:
the same steps, and the same code, as the dataset's validation path. Post-processing decodes the raw
head maps and runs NMS with the torch-free twins in `ghost_deploy.eval.postprocess`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ghost_deploy.contract import CheckpointHeader, OnnxMetadata
from ghost_deploy.data.augment import letterbox, resize_long_side
from ghost_deploy.data.dataset import Dataset, load_dataset_yaml
from ghost_deploy.data.images import read_ir, read_rgb
from ghost_deploy.errors import UserError
from ghost_deploy.eval.postprocess import decode_heads_np, non_max_suppression_np
from ghost_deploy.onnx_graph import onnx_metadata

CHANNELS = {"rgb": 3, "ir": 1}
# Thresholds of a deployed detector (what the end-to-end latency is measured with) and of mAP scoring.
DEPLOY_NMS = {"conf_thres": 0.25, "iou_thres": 0.45, "max_det": 300}
EVAL_NMS = {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300}


@dataclass(frozen=True)
class HeadSpec:
    """What decoding needs, and what every backend of one bench must agree on."""

    nc: int
    names: tuple[str, ...]
    strides: tuple[float, ...]
    anchors_pixels: tuple  # (nl, na, 2)
    input_names: tuple[str, ...]
    img_size: int
    source: str  # the file it was read from

    @property
    def outputs_per_anchor(self) -> int:
        return self.nc + 5

    def to_dict(self) -> dict:
        return {"nc": self.nc, "names": list(self.names), "strides": list(self.strides),
                "input_names": list(self.input_names), "img_size": self.img_size, "source": self.source}


def head_spec_from_meta(meta: CheckpointHeader | OnnxMetadata, source: str) -> HeadSpec:
    """From a checkpoint's header or an export's ONNX metadata (the same head geometry under two records)."""
    anchors = meta.anchors_pixels if isinstance(meta, CheckpointHeader) else meta.anchors
    missing = [key for key, value in (("strides", meta.strides), ("anchors", anchors), ("input_names", meta.input_names),
                                      ("img_size", meta.img_size)) if not value]
    if missing:
        raise UserError(source, f"metadata lacks {missing}, needed to decode the heads")
    anchors = np.asarray(anchors, dtype=np.float32).tolist()
    return HeadSpec(nc=int(meta.nc), names=tuple(str(n) for n in meta.names),
                    strides=tuple(float(s) for s in meta.strides),
                    anchors_pixels=tuple(tuple(map(tuple, level)) for level in anchors),
                    input_names=tuple(meta.input_names), img_size=int(meta.img_size), source=str(source))


def head_spec_from_onnx(path: str | Path) -> HeadSpec | None:
    """From the `ghost.*` metadata our exporter writes; None for a plain ONNX."""
    meta = onnx_metadata(path)
    return None if meta is None else head_spec_from_meta(meta, str(path))


HEAD_OUTPUT = re.compile(r"^head_s(\d+)$")  # the exporter's head output names (head_s4, head_s8, ...)


def head_outputs(output_names: Sequence[str], declared: Sequence[str] | None = None) -> list[str]:
    """Which outputs of an ONNX / engine are the raw head maps, in head order.

    `declared` (the ONNX's ghost.head_output_names) wins; else outputs named head_s<stride>, by stride;
    else every output in graph order (a plain torch.onnx.export of the detector).
    """
    if declared:
        return [name for name in declared if name in output_names] if set(declared) <= set(output_names) else list(output_names)
    named = [name for name in output_names if HEAD_OUTPUT.match(name)]
    if named:
        return sorted(named, key=lambda name: int(HEAD_OUTPUT.match(name).group(1)))
    return list(output_names)


# ------------------------------------------------------------------------------------------- frames
def synthetic_frames(input_names: Sequence[str], count: int, img_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random uint8 sensor frames, 4:3 at twice the model size, so resizing and letterboxing both do work."""
    rng = np.random.default_rng(seed)
    height, width = 2 * img_size, (8 * img_size) // 3
    frames = []
    for _ in range(count):
        frame = {}
        for name in input_names:
            shape = (height, width, 3) if CHANNELS[name] == 3 else (height, width)
            frame[name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        frames.append(frame)
    return frames


def dataset_frame_paths(data_yaml: str | Path, split: str, input_names: Sequence[str], count: int) -> list[dict[str, Path]]:
    """The image files of the first `count` samples of a split, per sensor."""
    spec = load_dataset_yaml(data_yaml)
    check_modalities(spec, input_names)
    dataset = Dataset(spec, split, 64, augment=False)  # indexing only: the size is not used to read paths
    return [{name: sample.images[name] for name in input_names} for sample in dataset.samples[:count]]


def decode_frame(paths: dict[str, Path]) -> dict[str, np.ndarray]:

    readers = {"rgb": read_rgb, "ir": read_ir}
    return {name: readers[name](path) for name, path in paths.items()}


def check_modalities(spec, input_names: Sequence[str]) -> None:
    missing = [name for name in input_names if name not in spec.modalities]
    if missing:
        raise UserError(spec.yaml_path, f"the model reads {list(input_names)} but the dataset has only {list(spec.modalities)}")


# --------------------------------------------------------------------------------------- pre / post
def preprocess(frames: Sequence[dict[str, np.ndarray]], input_names: Sequence[str], img_size: int) -> dict[str, np.ndarray]:
    """uint8 frames -> {name: float32 (B, C, img_size, img_size)} in [0, 1], letterboxed like validation."""
    batches: dict[str, list[np.ndarray]] = {name: [] for name in input_names}
    no_boxes = np.zeros((0, 6))
    for frame in frames:
        images, _ = resize_long_side({name: frame[name] for name in input_names}, no_boxes, img_size)
        images, _ = letterbox(images, no_boxes, img_size)
        for name in input_names:
            array = images[name]
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            batches[name].append(array)
    # divide (not multiply by 1/255) so the values are bit-identical to the dataset's tensors
    return {name: np.stack(arrays).astype(np.float32) / np.float32(255) for name, arrays in batches.items()}


def check_heads(heads: Sequence[np.ndarray], spec: HeadSpec, backend: str) -> None:
    """The outputs must be the raw head maps the spec describes (count, channels, stride)."""
    if len(heads) != len(spec.strides):
        raise UserError(backend, f"gives {len(heads)} outputs, the model has {len(spec.strides)} detection heads")
    na = len(spec.anchors_pixels[0])
    for level, head in enumerate(heads):
        if head.ndim != 4 or head.shape[1] != na * spec.outputs_per_anchor:
            raise UserError(backend, f"output {level} has shape {tuple(head.shape)}, expected "
                            f"(B, {na * spec.outputs_per_anchor}, H, W) raw head maps")


def postprocess(heads: Sequence[np.ndarray], spec: HeadSpec, conf_thres: float, iou_thres: float,
                max_det: int) -> list[np.ndarray]:
    """Raw head maps -> per image (n, 6) [x1, y1, x2, y2, score, class] in input pixels."""
    predictions = decode_heads_np(heads, spec.strides, spec.anchors_pixels, spec.nc)
    return non_max_suppression_np(predictions, conf_thres, iou_thres, max_det=max_det)
