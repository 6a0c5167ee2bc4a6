"""mAP of every backend on the same letterboxed images: one dataset pass, each batch fed to every backend.

Inputs come from the dataset's validation path (no augmentation), decoding and NMS from the numpy
twins, scoring from `evaluate.evaluate_detections` (COCO-style mAP50 and mAP50:95, per class), with the
same thresholds as `val.py`, so a PyTorch backend scores here what `ghost-deploy train` reported.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ghost_deploy.bench.backends import Backend
from ghost_deploy.bench.prepost import EVAL_NMS, HeadSpec, check_heads, check_modalities, postprocess
from ghost_deploy.data.dataset import Dataset, collate, load_dataset_yaml
from ghost_deploy.errors import UserError
from ghost_deploy.eval.evaluate import evaluate_detections


def _ground_truth(targets: np.ndarray, image_index: int, height: int, width: int) -> np.ndarray:
    """Targets [img, cls, cx, cy, w, h] (normalised) of one image -> (m, 5) [cls, x1, y1, x2, y2] in pixels."""
    rows = targets[targets[:, 0] == image_index]
    cx, cy, w, h = (rows[:, 2] * width, rows[:, 3] * height, rows[:, 4] * width, rows[:, 5] * height)
    return np.stack([rows[:, 1], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


def _batches(dataset, batch_size: int, max_images: int | None):

    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    for start in range(0, count, batch_size):
        yield collate([dataset[index] for index in range(start, min(start + batch_size, count))])


def evaluate_backends(backends: Sequence[Backend], spec: HeadSpec, data_yaml: str, split: str = "val",
                      batch_size: int = 1, max_images: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """{backend name: metrics} where metrics = evaluate_detections(...) plus `images` and class `names`.

    A backend whose input batch is fixed (a static-shape ONNX or engine) is fed that batch size.
    """

    data_spec = load_dataset_yaml(data_yaml)
    check_modalities(data_spec, spec.input_names)
    if data_spec.nc != spec.nc:
        raise UserError(data_yaml, f"dataset has {data_spec.nc} classes but the model predicts {spec.nc}")
    dataset = Dataset(data_spec, split, spec.img_size, augment=False)
    predictions: dict[str, list[np.ndarray]] = {backend.name: [] for backend in backends}
    truths: list[np.ndarray] = []
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    for batch in _batches(dataset, batch_size, max_images):
        feed = {name: batch[name].numpy() for name in spec.input_names}
        images = feed[spec.input_names[0]].shape[0]
        height, width = feed[spec.input_names[0]].shape[-2:]
        targets = batch["targets"].numpy()
        truths.extend(_ground_truth(targets, index, height, width) for index in range(images))
        for backend in backends:
            predictions[backend.name].extend(_predict(backend, feed, spec, images))
        if progress is not None:
            progress(len(truths), total)
    results = {}
    for backend in backends:
        metrics = evaluate_detections(predictions[backend.name], truths, spec.nc)
        results[backend.name] = {**metrics, "images": len(truths), "names": list(spec.names)}
    return results


def _predict(backend: Backend, feed: dict[str, np.ndarray], spec: HeadSpec, images: int) -> list[np.ndarray]:
    fixed = backend.static_batch()
    step = fixed or images
    detections = []
    for start in range(0, images, step):
        chunk = {name: array[start:start + step] for name, array in feed.items()}
        real = next(iter(chunk.values())).shape[0]
        if fixed and real < fixed:  # pad the last chunk of a fixed-batch backend; padded rows are dropped
            chunk = {name: np.concatenate([array, np.repeat(array[-1:], fixed - real, 0)]) for name, array in chunk.items()}
        heads = backend.infer(chunk)
        check_heads(heads, spec, backend.name)
        detections.extend(postprocess(heads, spec, **EVAL_NMS)[:real])
    return detections

