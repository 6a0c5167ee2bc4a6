"""Run a detector over a loader and score it: the one evaluation path used by train, export and bench."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ghost_deploy.eval.boxes import xywh2xyxy
from ghost_deploy.eval.evaluate import decode_heads, evaluate_detections, non_max_suppression


def batch_inputs(batch: dict, input_names, device="cpu") -> list[torch.Tensor]:
    return [batch[name].to(device, non_blocking=True) for name in input_names]


def ground_truth(batch: dict, image_index: int, height: int, width: int) -> np.ndarray:
    """Targets of one image as (m, 5) [cls, x1, y1, x2, y2] in input pixels."""
    targets = batch["targets"]
    rows = targets[targets[:, 0] == image_index]
    boxes = xywh2xyxy(rows[:, 2:6].clone()) * torch.tensor([width, height, width, height], dtype=rows.dtype)
    return torch.cat([rows[:, 1:2], boxes], dim=1).numpy()


@torch.no_grad()
def predict_loader(model, loader, conf_thres=0.001, iou_thres=0.6, max_det=300, device="cpu", progress=False, desc="val"):
    """Detections and ground truth per image, for `evaluate_detections`."""
    was_training = model.training
    model.eval()
    predictions, truths = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs = batch_inputs(batch, model.input_names, device)
        heads = model(*inputs)
        dets = non_max_suppression(decode_heads(heads, model.detect), conf_thres, iou_thres, max_det=max_det)
        height, width = inputs[0].shape[-2:]
        for index, det in enumerate(dets):
            predictions.append(det.cpu().numpy())
            truths.append(ground_truth(batch, index, height, width))
    model.train(was_training)
    return predictions, truths


def evaluate_model(model, loader, nc, conf_thres=0.001, iou_thres=0.6, max_det=300, device="cpu", progress=False):
    predictions, truths = predict_loader(model, loader, conf_thres, iou_thres, max_det, device, progress)
    return evaluate_detections(predictions, truths, nc)
