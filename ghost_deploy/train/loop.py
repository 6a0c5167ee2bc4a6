"""Training: the FP32 teacher and GHOST QAT with self-distillation, one loop for both.

Every epoch starts by reseeding all generators from (seed, epoch), and a resumable state is saved at
the end of every epoch, so a killed run resumed with `--resume` ends with the same weights as a run
that was never interrupted.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ghost_deploy import __version__
from ghost_deploy.checkpoint import load_checkpoint, load_model_state, model_from_checkpoint, save_checkpoint
from ghost_deploy.contract import CheckpointHeader
from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml
from ghost_deploy.data.dataset import Dataset, collate
from ghost_deploy.errors import UserError
from ghost_deploy.eval.val import batch_inputs, evaluate_model
from ghost_deploy.io import make_folder
from ghost_deploy.model import build_model
from ghost_deploy.quant import (
    BitPlan,
    act_quantizers,
    calibrate_activations,
    check_plan_against_model,
    fold_bn,
    quantize_model,
)
from ghost_deploy.quant.hq import choose_plan
from ghost_deploy.quant.plans import with_residual_outputs
from ghost_deploy.recipe import AMP_MODES
from ghost_deploy.train.distill import (
    OpenRateLog,
    SelfTeaching,
    SwitchLog,
    gqsd_loss,
    ost_distance,
    random_gates,
    switch_mode,
)
from ghost_deploy.train.distributed import broadcast_object
from ghost_deploy.train.loss import DetectionLoss


# ----------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), sharded across DDP ranks; the reference never shuffled (B5).

    Yields (index, (seed, epoch, index)): the dataset seeds each sample's augmentation from that, so a
    resumed epoch sees exactly the images and augmentations the interrupted one saw.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = math.ceil(self.size / self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad so every rank has the same count
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter([(index, (self.seed, self.epoch, index)) for index in self._order()])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError("--device", f"{device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UserError("--device", f"{device!r}: training runs on cpu or cuda (cuda:N), not {parsed.type}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", f"{device} requested but CUDA is not available on this machine")
    return parsed


@dataclass
class DataBundle:
    spec: object
    train: object
    val: object
    data_yaml: str


def dataset_spec(recipe: dict, data: str | None) -> tuple[str, object]:
    """(YAML path, DatasetSpec) of the dataset named by `data`, else by the recipe (`embedded`: the demo set, built
    when missing), its modalities checked against the recipe's input mode. Reads no image."""
    source = data or recipe.get("data") or "embedded"
    data_yaml = str(ensure_synthetic_dataset(seed=0) if source == "embedded" else source)
    spec = load_dataset_yaml(data_yaml)
    modalities = set(spec.modalities)
    needed = {"rgb+ir": {"rgb", "ir"}, "rgb": {"rgb"}, "ir": {"ir"}}[recipe["input_mode"]]
    if not needed <= modalities:
        raise UserError(data_yaml, f"input mode {recipe['input_mode']} needs modalities {sorted(needed)}, dataset has {sorted(modalities)}")
    return data_yaml, spec


def load_data(recipe: dict, data: str | None, strict: bool = False, with_hr: bool | None = None) -> DataBundle:
    """The dataset named by `data` (a YAML path), else by the recipe; `embedded` builds the demo set."""
    data_yaml, spec = dataset_spec(recipe, data)
    hr = recipe.get("sr", False) if with_hr is None else with_hr
    train = Dataset(spec, "train", recipe["img_size"], augment=True, hyp=recipe["hyp"], strict=strict, with_hr=hr,
                    cache=recipe.get("cache"))
    val = Dataset(spec, "val", recipe["img_size"], augment=False, hyp=recipe["hyp"], strict=strict)
    return DataBundle(spec=spec, train=train, val=val, data_yaml=data_yaml)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None):
    """Batches of `collate`, in an order fixed by (seed, epoch). Workers stay alive across epochs (no re-fork and
    re-index each epoch) and, for a GPU, batches land in pinned memory so the copy overlaps compute."""
    sampler = EpochSampler(len(dataset), seed, shuffle=shuffle, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        drop_last=False, persistent_workers=workers > 0, pin_memory=device is not None and device.type == "cuda",
    )




def amp_mode(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device` (None: no autocast). `auto`: fp16 on CUDA, off on the CPU.
    Quantizers, their scales and the losses stay float32 inside (quant.quantizers, train.loss)."""
    if mode not in AMP_MODES:
        raise UserError("--amp", f"must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp", "fp16 autocast needs a CUDA device; on the CPU use --amp bf16")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


# ------------------------------------------------------------------------------------------ optimiser
def build_optimizer(model: nn.Module, extra: list[nn.Module], cfg: dict, accumulate: int, batch_size: int) -> torch.optim.SGD:
    """SGD with three groups: conv/linear weights (decayed), norm weights and biases (not decayed).

    Weight decay really applies here (the reference built groups without it, B6); it scales with the
    effective batch as in YOLOv5.
    """
    decay, no_decay, biases = [], [], []
    for module in [model, *extra]:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith(".bias"):
                biases.append(param)
            elif param.ndim <= 1:  # norm weights, quantizer scales
                no_decay.append(param)
            else:
                decay.append(param)
    weight_decay = cfg["weight_decay"] * batch_size * accumulate / cfg["nominal_batch"]
    if cfg["optimizer"] == "adamw":  # beta1 follows the momentum schedule, as in YOLOv5's --adam
        optimizer = torch.optim.AdamW(no_decay, lr=cfg["lr0"], betas=(cfg["momentum"], 0.999), weight_decay=0.0)
    elif cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(no_decay, lr=cfg["lr0"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    else:
        raise UserError(None, f"recipe optimizer must be sgd or adamw, got {cfg['optimizer']!r}")
    optimizer.add_param_group({"params": decay, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": biases})
    return optimizer


def cosine_lambda(epochs: int, lrf: float):
    return lambda epoch: ((1 - math.cos(epoch * math.pi / max(epochs, 1))) / 2) * (lrf - 1) + 1


class ModelEMA:
    """Exponential moving average of weights with YOLOv5's ramped decay."""

    def __init__(self, model: nn.Module, decay: float, tau: float, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for param in self.ema.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        source = model.state_dict()
        for key, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[key].detach(), alpha=1 - d)
            else:
                value.copy_(source[key])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class StageSpec:
    """What differs between the teacher and the GHOST stage: the model(s) and the loss of one step."""

    name: str  # "teacher" | "ghost"
    model: nn.Module
    cfg: dict
    extra_modules: list[nn.Module] = field(default_factory=list)
    meta: CheckpointHeader | None = None
    step_fn: object = None  # (batch, inputs) -> (loss, items dict)
    epoch_end_fn: object = None  # (epoch) -> dict of extra log columns
    train_module: nn.Module | None = None  # what one step calls (DDP wraps it); holds `model`


def _warm_up(optimizer, cfg: dict, iteration: int, warmup_iters: int, accumulate: int, lr_factor: float) -> int:
    """YOLOv5's warm-up: learning rates, momentum and gradient accumulation ramp over the first iterations.
    Returns how many batches this step accumulates."""
    if not (iteration <= warmup_iters and warmup_iters > 0):
        return accumulate
    for index, group in enumerate(optimizer.param_groups):
        start_lr = cfg["warmup_bias_lr"] if index == 2 else 0.0
        group["lr"] = float(np.interp(iteration, [0, warmup_iters], [start_lr, group["initial_lr"] * lr_factor]))
        momentum = float(np.interp(iteration, [0, warmup_iters], [cfg["warmup_momentum"], cfg["momentum"]]))
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum
    return max(1, round(np.interp(iteration, [0, warmup_iters], [1, accumulate])))


def _optimizer_step(scaler, optimizer, ema, model) -> None:
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 10.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model)


def _log_epoch(csv_path, name, epoch, epochs, running, batches, metrics, optimizer, train_seconds, extra_columns, log):
    row = {"epoch": epoch + 1, **{k: round(v / batches, 5) for k, v in running.items()},
           "mAP50": round(metrics["mAP50"], 5), "mAP50_95": round(metrics["mAP50_95"], 5),
           "lr": round(optimizer.param_groups[0]["lr"], 6), "seconds": round(train_seconds, 1), **extra_columns}
    _append_csv(csv_path, row)
    log(f"{name} epoch {epoch + 1}/{epochs}: " + " ".join(f"{k}={v}" for k, v in row.items() if k != "epoch"))


def fit(stage: StageSpec, recipe: dict, data: DataBundle, out_dir: Path, device: torch.device,
        resume: bool = False, progress: bool = True, epochs: int | None = None, rank: int = 0, world_size: int = 1,
        log=print) -> dict:
    """Train `stage.model`; write last/best checkpoints (EMA weights), results.csv and a resumable state."""
    cfg = stage.cfg
    epochs = epochs if epochs is not None else cfg["epochs"]
    batch_size = cfg["batch_size"]
    seed = recipe["seed"]
    model = stage.model.to(device)
    train_module = stage.train_module.to(device)
    if world_size > 1:
        train_module = nn.parallel.DistributedDataParallel(train_module, find_unused_parameters=True)
    amp_dtype = amp_mode(recipe.get("amp", "auto"), device)
    if device.type == "cuda":  # NHWC lets cuDNN use tensor-core kernels; on the CPU it would only change summation order
        model.to(memory_format=torch.channels_last)
    loader = make_loader(data.train, batch_size, True, seed, recipe["workers"], rank, world_size, device=device)
    val_loader = make_loader(data.val, batch_size, False, seed, recipe["workers"], device=device)
    batches = len(loader)
    accumulate = max(round(cfg["nominal_batch"] / (batch_size * world_size)), 1)
    optimizer = build_optimizer(model, stage.extra_modules, cfg, accumulate, batch_size * world_size)
    lf = cosine_lambda(epochs, cfg["lrf"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model, cfg["ema_decay"], cfg["ema_tau"])
    # fp16 needs loss scaling (its range underflows small gradients); bf16 has float32's range
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    warmup_iters = round(cfg["warmup_epochs"] * batches) if cfg["warmup_epochs"] > 0 else 0
    weights_dir = out_dir / "weights"
    state_path = out_dir / "train_state.safetensors"
    csv_path = out_dir / "results.csv"
    start_epoch, best_fitness, best_metrics = 0, -1.0, {}
    if resume:
        start_epoch, best_fitness, best_metrics = _restore_state(state_path, model, ema, optimizer, scheduler, stage)
        log(f"resumed {stage.name} from {state_path} at epoch {start_epoch}/{epochs}")
    iteration = start_epoch * batches
    nc = data.spec.nc
    for epoch in range(start_epoch, epochs):
        seed_everything(epoch_seed(seed, epoch) + rank)
        loader.sampler.set_epoch(epoch)
        train_module.train()
        running = {}
        bar = tqdm(loader, desc=f"{stage.name} {epoch + 1}/{epochs}", disable=not progress or rank != 0, leave=False)
        optimizer.zero_grad(set_to_none=True)
        last_step_iteration = iteration - 1  # accumulation restarts each epoch, so a resumed epoch steps alike
        started = time.perf_counter()
        for batch in bar:
            accumulate_now = _warm_up(optimizer, cfg, iteration, warmup_iters, accumulate, lf(epoch))
            inputs = batch_inputs(batch, model.input_names, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, items = stage.step_fn(train_module, batch, inputs)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at epoch {epoch} iteration {iteration}: {items}")
            scaler.scale(loss).backward()
            if iteration - last_step_iteration >= accumulate_now:
                _optimizer_step(scaler, optimizer, ema, model)
                last_step_iteration = iteration
            for key, value in items.items():
                running[key] = running.get(key, 0.0) + float(value)
            count = iteration - epoch * batches + 1
            bar.set_postfix({k: f"{v / count:.3g}" for k, v in running.items()})
            iteration += 1
        scheduler.step()
        train_seconds = time.perf_counter() - started
        extra_columns = stage.epoch_end_fn(epoch) if stage.epoch_end_fn else {}
        if rank != 0:
            continue
        metrics = evaluate_model(ema.ema, val_loader, nc, recipe["eval"]["conf_thres"], recipe["eval"]["iou_thres"],
                                 recipe["eval"]["max_det"], device=device)
        fitness = float(metrics["mAP50"])
        _log_epoch(csv_path, stage.name, epoch, epochs, running, batches, metrics, optimizer, train_seconds,
                   extra_columns, log)
        epoch_meta = {"epoch": epoch + 1, "metrics": {"mAP50": metrics["mAP50"], "mAP50_95": metrics["mAP50_95"]}}
        save_checkpoint(weights_dir / "last.safetensors", ema.ema, _with_extra(stage.meta, epoch_meta))
        if fitness > best_fitness:
            best_fitness, best_metrics = fitness, metrics
            save_checkpoint(weights_dir / "best.safetensors", ema.ema, _with_extra(stage.meta, {**epoch_meta, "best": True}))
        _save_state(state_path, model, ema, optimizer, scheduler, stage, epoch + 1, best_fitness, best_metrics)
    if rank == 0 and not (weights_dir / "best.safetensors").exists():
        raise RuntimeError("training ran no epoch; nothing to save")
    return {"best_fitness": best_fitness, "best_metrics": _jsonable(best_metrics), "model": model,
            "best": str(weights_dir / "best.safetensors"), "last": str(weights_dir / "last.safetensors")}


def _with_extra(header: CheckpointHeader, entries: dict) -> CheckpointHeader:
    return dataclasses.replace(header, extra={**header.extra, **entries})


def _jsonable(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _append_csv(path: Path, row: dict) -> None:
    exists = path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if not exists:
            writer.writeheader()
        writer.writerow(row)


def _save_state(path, model, ema, optimizer, scheduler, stage, epoch, best_fitness, best_metrics) -> None:
    tensors, optim_meta = optimizer_tensors(optimizer)
    extra = {f"ema.{k}": v for k, v in ema.ema.state_dict().items()}
    extra.update(tensors)
    for index, module in enumerate(stage.extra_modules):
        extra.update({f"extra{index}.{k}": v for k, v in module.state_dict().items()})
    resume = {"epoch": epoch, "best_fitness": best_fitness, "best_metrics": _jsonable(best_metrics),
              "ema_updates": ema.updates, "optimizer": optim_meta, "scheduler": scheduler.state_dict()}
    save_checkpoint(path, model, _with_extra(stage.meta, {"resume": resume}), extra=extra)


def _restore_state(path, model, ema, optimizer, scheduler, stage):
    if not path.exists():
        raise UserError(path.parent, "cannot resume: no train_state.safetensors in this run folder")
    ckpt = load_checkpoint(path)
    load_model_state(model, ckpt.model_state, path)
    load_model_state(ema.ema, ckpt.prefixed("ema."), path)
    for index, module in enumerate(stage.extra_modules):
        load_model_state(module, ckpt.prefixed(f"extra{index}."), path)
    info = ckpt.meta.get("resume")
    if not isinstance(info, dict):
        raise UserError(path, "cannot resume: the train state has no resume entry")
    ema.updates = info["ema_updates"]
    restore_optimizer(optimizer, {k: v for k, v in ckpt.tensors.items() if k.startswith("optim.")}, info["optimizer"])
    scheduler.load_state_dict(info["scheduler"])
    return info["epoch"], info["best_fitness"], info["best_metrics"]


# ------------------------------------------------------------------------------------------ stages
def checkpoint_meta(recipe: dict, spec, stage: str, data_yaml: str, model, bit_plan=None, **extra) -> CheckpointHeader:
    """The header of a trained checkpoint. The dataset is recorded absolute (messages keep the path as typed): the
    checkpoint is exported, benchmarked or distilled from any folder."""
    data_yaml = None if data_yaml is None else str(Path(data_yaml).absolute())
    return CheckpointHeader(
        version=__version__, stage=stage, model=recipe["model"], nc=spec.nc, names=list(spec.names),
        input_mode=recipe["input_mode"], input_names=list(model.input_names), img_size=recipe["img_size"],
        sr=model.sr is not None, data=data_yaml, recipe={k: v for k, v in recipe.items()},
        strides=model.detect.stride.tolist(), anchors_pixels=model.detect.anchors_pixels.tolist(),
        bit_plan=bit_plan, extra=extra)


class TeacherForward(nn.Module):
    """What one teacher step computes, as one module so DDP can wrap it: head maps and the SR output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        heads, features = self.model.forward_features(*inputs)
        sr = self.model.forward_sr(features) if self.model.sr is not None else None
        return heads, sr


def _teacher_step(loss_fn, sr_weight: float, input_names):
    def step(train_module, batch, inputs):
        heads, sr = train_module(*inputs)
        loss, items = loss_fn(heads, batch["targets"].to(inputs[0].device))
        logged = {"box": items[0], "obj": items[1], "cls": items[2]}
        if sr is not None:
            target = torch.cat([batch[f"hr_{name}"].to(sr.device) for name in input_names], dim=1)
            sr_loss = sr_weight * F.l1_loss(sr.float(), target)
            loss = loss + sr_loss * inputs[0].shape[0]  # the detection loss is scaled by batch size too
            logged["sr"] = sr_loss.detach()
        return loss, logged

    return step


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never train over a run silently: a folder holding one is continued (`resume`), replaced (`overwrite`: the
    pipeline, whose ledger says the folder is its own, or --force), or refused with one line."""
    state, finished = out_dir / "train_state.safetensors", out_dir / "weights" / "best.safetensors"
    if resume:
        if not state.is_file():
            raise UserError(out_dir, "cannot resume: no train_state.safetensors in this run folder")
        return
    leftovers = [path for path in (finished, out_dir / "weights" / "last.safetensors", state, out_dir / "results.csv")
                 if path.exists()]
    if leftovers and not overwrite:
        raise UserError(out_dir, f"holds a run already ({leftovers[0].relative_to(out_dir)}): --resume continues it, "
                                 "--force replaces it, or choose another --out")
    for path in leftovers:
        path.unlink()


def train_teacher(recipe: dict, out_dir, data: str | None = None, device: str | None = None, resume: bool = False,
                  progress: bool = True, strict: bool = False, epochs: int | None = None, rank: int = 0,
                  world_size: int = 1, log=print, overwrite: bool = False, init_from=None) -> dict:
    """Train the FP32 teacher (with the SR branch when the recipe asks). Returns paths and best metrics.

    init_from: a checkpoint whose detector weights start the run (fine-tuning a teacher for as many epochs as
    GHOST trains, the control that tells extra epochs from distillation)."""
    out_dir = Path(out_dir)
    amp_mode(recipe.get("amp", "auto"), resolve_device(device))  # a bad --device or --amp: refused before any folder
    if rank == 0:
        prepare_run_folder(out_dir, resume, overwrite)
    bundle = load_data(recipe, data, strict=strict)
    seed_everything(recipe["seed"])
    model = build_model(recipe["model"], nc=bundle.spec.nc, input_mode=recipe["input_mode"], sr=recipe["sr"])
    if init_from is not None:
        state = model_from_checkpoint(init_from, with_sr=False)[0].detector_state_dict()
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes differ: another config or class count
            raise UserError(init_from, f"does not fit {recipe['model']} with {bundle.spec.nc} classes "
                                       f"({str(exc).splitlines()[1].strip()})") from None
        if unexpected or any(not key.startswith("sr.") for key in missing):  # only a fresh SR branch may start anew
            raise UserError(init_from, f"does not fit {recipe['model']}: {(unexpected or missing)[0]!r}")
    loss_fn = DetectionLoss(model.detect, recipe["hyp"], img_size=recipe["img_size"])
    dev = resolve_device(device)
    stage = StageSpec("teacher", model, recipe["teacher"], meta=checkpoint_meta(recipe, bundle.spec, "teacher", bundle.data_yaml, model),
                      step_fn=_teacher_step(loss_fn, recipe["hyp"]["sr_weight"], model.input_names),
                      train_module=TeacherForward(model))
    make_folder(out_dir)  # a file in the way, or a place nothing can be written: one line naming it
    result = fit(stage, recipe, bundle, out_dir, dev, resume=resume, progress=progress, epochs=epochs, rank=rank,
                 world_size=world_size, log=log)
    result["skipped"] = _skipped(bundle)
    return result


def _skipped(bundle: DataBundle) -> int:
    """Bad samples skipped with a warning (the loader warns per sample; --strict makes them errors)."""
    return len(getattr(bundle.train, "skipped", [])) + len(getattr(bundle.val, "skipped", []))


class GhostForward(nn.Module):
    """One GHOST step's trainable part, as one module for DDP: the quantized student and the switch."""

    def __init__(self, student, distiller):
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, *inputs):
        return self.student.forward_features(*inputs)


def _ghost_step(teacher, loss_fn, distill_cfg, logs: "DistillLogs"):
    open_log, switch_log, grad_log = logs.open_rate, logs.switch, logs.gradient_ratio
    mode = switch_mode(distill_cfg["switch"])
    det_weight, ost_weight = distill_cfg["det_weight"], distill_cfg["ost_weight"]

    def step(train_module, batch, inputs):
        inner = train_module.module if hasattr(train_module, "module") else train_module
        targets = batch["targets"].to(inputs[0].device)
        heads, student_features = train_module(*inputs)
        det_loss, items = loss_fn(heads, targets)
        logged = {"box": items[0], "obj": items[1], "cls": items[2]}
        if not distill_cfg["enabled"]:
            return det_weight * det_loss, logged
        with torch.no_grad():
            teacher_heads, teacher_features = teacher.forward_features(*inputs)
            teacher_per_image = loss_fn(teacher_heads, targets, per_image=True)[0]
        if mode != "learned":  # GQSD: every layer distilled (off), or a blind gate at a fixed open rate (random)
            distance = ost_distance(teacher_features, student_features, distill_cfg["layer_norm"])
            if mode == "random":
                gates = random_gates(distance.detach(), distill_cfg["random_open_rate"])
                open_log.update(gates)
                distance = gates * distance
            ost = distance.mean(dim=0).sum()
            logged["ost"] = (ost_weight * ost).detach()
            grad_log.maybe_measure(inner.student, det_weight * det_loss, ost_weight * ost)
            return det_weight * det_loss + ost_weight * ost, logged
        student_per_image = loss_fn([h.detach() for h in heads], targets, per_image=True)[0]
        out = inner.distiller(teacher_features, student_features, teacher_per_image, student_per_image)
        open_log.update(out.gates)
        switch_log.update(out.probability, out.switch_target)
        total, parts = gqsd_loss(det_loss, out, ost_weight=ost_weight, switch_weight=distill_cfg["switch_weight"],
                                 det_weight=det_weight)
        grad_log.maybe_measure(inner.student, det_weight * det_loss, ost_weight * out.ost_loss)
        logged.update({"ost": parts["ost"], "switch": parts["switch"], "open": out.gates.detach().float().mean()})
        return total, logged

    return step


class GradientRatioLog:
    """||grad of the OST term|| / ||grad of the detection term|| over the student's weights, on the first step of
    each epoch (two extra backward passes an epoch): how much the distillation steers the student."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.ratio: float | None = None

    def maybe_measure(self, student: nn.Module, det_term: torch.Tensor, ost_term: torch.Tensor) -> None:
        if not self.enabled or self.ratio is not None or not ost_term.requires_grad:
            return
        params = [p for p in student.parameters() if p.requires_grad]
        norms = []
        for term in (det_term, ost_term):
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item())
        self.ratio = norms[1] / norms[0] if norms[0] > 0 else float("inf")

    def take(self) -> float | None:
        ratio, self.ratio = self.ratio, None
        return ratio


class DistillLogs:
    """What results.csv records of the distillation per epoch: open rates, the switch's AUC against its target and
    the target's base rate, and the OST/detection gradient ratio."""

    def __init__(self, grad_enabled: bool = True):
        self.open_rate, self.switch, self.gradient_ratio = OpenRateLog(), SwitchLog(), GradientRatioLog(grad_enabled)

    def epoch_end(self, epoch: int) -> dict:
        rates, switch = self.open_rate.epoch_summary(), self.switch.epoch_summary()
        self.open_rate.reset()
        self.switch.reset()
        ratio = self.gradient_ratio.take()
        return {"open_rate": round(float(np.mean(rates)), 4) if rates else "",
                "open_rate_per_layer": " ".join(f"{r:.2f}" for r in rates),
                "switch_auc": round(switch["auc"], 4) if switch else "",
                "switch_auc_per_layer": " ".join(f"{a:.2f}" for a in switch["auc_per_layer"]) if switch else "",
                "switch_base_rate": round(switch["base_rate"], 4) if switch else "",
                "ost_det_grad_ratio": round(ratio, 4) if ratio is not None else ""}


def make_bit_plan(student, recipe: dict, bit_plan_path=None, log=print):
    """The GHOST bit plan: an edited JSON when given, else HQ (k-means rule) or a budget, per the recipe."""
    plan_cfg = recipe["ghost"]["plan"]
    if isinstance(bit_plan_path, BitPlan):
        return bit_plan_path
    if bit_plan_path:
        plan = BitPlan.load(bit_plan_path)
        check_plan_against_model(plan, student)
        return plan
    plan = choose_plan(student, plan_cfg["method"], recipe["img_size"], threshold=plan_cfg["threshold"],
                       bit_min=plan_cfg["bit_min"], bit_max=plan_cfg["bit_max"], seed=recipe["seed"],
                       act_bits=plan_cfg["act_bits"],
                       budget={k: plan_cfg[k] for k in ("avg_bits", "size_mb", "bops_g") if k in plan_cfg},
                       source=recipe.get("recipe_path"), distortion=plan_cfg.get("distortion", "raw"))
    if plan_cfg.get("residual_outputs"):
        plan = with_residual_outputs(plan, student)
    return plan


def train_ghost(recipe: dict, out_dir, teacher_path, data: str | None = None, bit_plan_path=None, device: str | None = None,
                resume: bool = False, progress: bool = True, strict: bool = False, epochs: int | None = None,
                rank: int = 0, world_size: int = 1, log=print, distill: bool | None = None,
                overwrite: bool = False) -> dict:
    """GHOST: student initialised from the teacher, quantized with the bit plan, trained with GQSD + OST/SCM."""
    out_dir = Path(out_dir)
    amp_mode(recipe.get("amp", "auto"), resolve_device(device))  # a bad --device or --amp: refused before any folder

    teacher, teacher_meta = model_from_checkpoint(teacher_path, with_sr=False)
    if teacher_meta.quantized:
        raise UserError(teacher_path, f"is a quantized checkpoint (stage {teacher_meta.stage!r}); the teacher is the "
                                      "FP32 model: pass the teacher's checkpoint (--teacher)")
    student_init = teacher.detector_state_dict()
    # The frozen teacher runs in eval mode, where folding BN into the convs is exact: one op fewer per layer.
    teacher = fold_bn(teacher).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    recipe = {**recipe, "model": teacher_meta.model, "input_mode": teacher_meta.input_mode}
    bundle = load_data(recipe, data or teacher_meta.dataset(teacher_path), strict=strict, with_hr=False)
    if bundle.spec.nc != teacher_meta.nc:
        raise UserError(bundle.data_yaml, f"has {bundle.spec.nc} classes, the teacher {teacher_path} was trained on "
                                          f"{teacher_meta.nc}: distil on the teacher's dataset (--data)")
    if rank == 0:  # after every check of the inputs: a refused run leaves no folder
        prepare_run_folder(out_dir, resume, overwrite)
    seed_everything(recipe["seed"])
    student = build_model(teacher_meta.model, nc=teacher_meta.nc, input_mode=teacher_meta.input_mode)
    student.load_state_dict(student_init)
    plan_file = out_dir / "bit_plan.json"
    if resume and plan_file.exists():
        bit_plan_path = plan_file  # the plan is part of the run's state
    if callable(bit_plan_path):  # a plan that depends on the student, e.g. a uniform plan for an ablation
        bit_plan_path = bit_plan_path(student)

    # Computed once on rank 0 and broadcast, so every rank quantizes with the very same plan.
    plan_json = make_bit_plan(student, recipe, bit_plan_path, log).to_json() if rank == 0 else None
    plan = BitPlan.from_json(broadcast_object(plan_json))
    if rank == 0:
        plan.save(plan_file)
        log(plan.summary())
    calib_loader = make_loader(bundle.train, recipe["ghost"]["batch_size"], True, recipe["seed"])
    calib_batches = []
    for index, batch in enumerate(calib_loader):
        if index >= recipe["ghost"]["calib_batches"]:
            break
        calib_batches.append(batch_inputs(batch, student.input_names))
    student = quantize_model(student, plan)
    calibrate_activations(student, calib_batches)
    if not recipe["ghost"]["learn_act_scales"]:

        # Calibrated (MSE) and kept: weight scales still learn (LSQ); learned 8-bit activation scales add little
        # and their LSQ gradient was ~40% of a CPU QAT step.
        for quantizer in act_quantizers(student).values():
            quantizer.scale.requires_grad_(False)
    distill_cfg = dict(recipe["ghost"]["distill"])
    if distill is not None:
        distill_cfg["enabled"] = distill
    probe = [torch.zeros(1, 3 if n == "rgb" else 1, 64, 64) for n in student.input_names]
    with torch.no_grad():
        channels = [f.shape[1] for f in teacher.forward_features(*probe)[1]]
    distiller = SelfTeaching(channels, channels, qk_dim=distill_cfg["qk_dim"], tau=distill_cfg["tau"],
                             open_bounds=tuple(distill_cfg["open_bounds"]), layer_norm=distill_cfg["layer_norm"])
    logs = DistillLogs(grad_enabled=world_size == 1)  # autograd.grad beside DDP's reducer hooks is not safe
    loss_fn = DetectionLoss(student.detect, recipe["hyp"], img_size=recipe["img_size"])
    dev = resolve_device(device)
    teacher.to(dev)
    meta = checkpoint_meta(recipe, bundle.spec, "ghost", bundle.data_yaml, student, bit_plan=plan,
                           teacher={"path": str(teacher_path), "metrics": teacher_meta.get("metrics")},
                           distill=distill_cfg)
    stage = StageSpec("ghost", student, recipe["ghost"], extra_modules=[distiller], meta=meta,
                      step_fn=_ghost_step(teacher, loss_fn, distill_cfg, logs), epoch_end_fn=logs.epoch_end,
                      train_module=GhostForward(student, distiller))
    result = fit(stage, recipe, bundle, out_dir, dev, resume=resume, progress=progress, epochs=epochs, rank=rank,
                 world_size=world_size, log=log)
    result["bit_plan"] = str(plan_file)
    result["skipped"] = _skipped(bundle)
    return result
