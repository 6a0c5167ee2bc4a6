"""GHOST self-distillation: OST (one-to-one self-teaching) gated by SCM (the switch control machine).

Teacher layer l teaches student layer l, for every layer before Detect, through normalised spatial
attention maps. A per-image, per-layer switch decides whether that layer's guidance is applied.
Design and the deviations from the reference (bugs B3, B4) are in docs/distillation.md. In short:

- the switch is trained only by its own objective: predict whether the teacher's detection loss on
  this image is lower than the student's (BCE), so it cannot close itself to dodge the OST loss;
- its open probability is squashed into `open_bounds`, so it can neither close nor open for good;
- the OST product uses the detached hard gate, and the switch reads detached descriptors, so the
  switch and the student never train each other;
- the query/key norm is LayerNorm (per sample), so a batch of 1 works and train/eval agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghost_deploy.recipe import LAYER_NORMS, SWITCH_MODES

PAPER_OST_WEIGHT = 400.0  # the reference's kd_weight, tuned for layer_norm='paper' at 512 px input
_PROB_EPS = 1e-6


def spatial_attention(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): L2-normalised vec(mean_c F^2), in float32."""
    attention = feature.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(attention, p=2, dim=1)


def ost_distance(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    layer_norm: str = "mean",
) -> torch.Tensor:
    """Per-image, per-layer OST distance (B, L); the OST loss is sum_l mean_b gate * distance.

    `layer_norm='paper'`: ||v_s - v_t||^2 / (H_l W_l), as GHOST (early high-resolution layers weigh ~0).
    `layer_norm='mean'`: ||v_s - v_t||^2 / L, every layer weighs the same and the loss lies in [0, 4].
    Teacher features are detached: the teacher is frozen.
    """
    _check_layer_norm(layer_norm)
    _check_pairs(teacher_features, student_features)
    num_layers = len(student_features)
    columns = []
    for teacher, student in zip(teacher_features, student_features):
        # float32 under autocast too: the attention maps are normalised sums over channels
        student, teacher = student.float(), teacher.float()
        squared = (spatial_attention(student) - spatial_attention(teacher.detach())).pow(2).sum(dim=1)
        scale = 1.0 / (student.shape[-2] * student.shape[-1]) if layer_norm == "paper" else 1.0 / num_layers
        columns.append(squared * scale)
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class DistillOutput:
    """What one SelfTeaching step produced.

    ost_loss: scalar, sum_l mean_b gate * distance (gate detached). switch_loss: scalar BCE of the switch
    (0 without per-image detection losses). open_rate_per_layer (L,): share of images whose hard gate was
    open. open_probability_per_layer (L,): mean open probability. gates (B, L): hard 0/1 in the forward,
    soft straight-through gradient. distance (B, L): detached per-layer OST distance. switch_target (B,)
    or None: 1 where the teacher's detection loss was lower. probability (B, L): detached open probability.
    """

    ost_loss: torch.Tensor
    switch_loss: torch.Tensor
    open_rate_per_layer: torch.Tensor
    open_probability_per_layer: torch.Tensor
    gates: torch.Tensor
    distance: torch.Tensor
    switch_target: torch.Tensor | None = None
    probability: torch.Tensor | None = None


class SelfTeaching(nn.Module):
    """OST + SCM. Its parameters (the switch) must be in the optimiser: see `require_in_optimizer`.

    Args:
        teacher_channels / student_channels: channels of every layer before Detect (same length).
        qk_dim: width of the query/key projections.
        tau: Gumbel-sigmoid temperature; shapes only the soft (backward) gate, not P(open).
        open_bounds: (min_open, max_open); every open probability is squashed into this interval.
        layer_norm: 'mean' (default) or 'paper'; see `ost_distance`.
    """

    def __init__(
        self,
        teacher_channels: Sequence[int],
        student_channels: Sequence[int],
        qk_dim: int = 128,
        tau: float = 1.0,
        open_bounds: tuple[float, float] = (0.1, 0.9),
        layer_norm: str = "mean",
    ):
        super().__init__()
        if len(teacher_channels) != len(student_channels) or not teacher_channels:
            raise ValueError(
                f"teacher and student need the same non-zero number of layers, got {len(teacher_channels)} "
                f"and {len(student_channels)}"
            )
        min_open, max_open = open_bounds
        if not 0.0 <= min_open < max_open <= 1.0:
            raise ValueError(f"open_bounds must satisfy 0 <= min_open < max_open <= 1, got {open_bounds}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        _check_layer_norm(layer_norm)
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.student_channels = [int(c) for c in student_channels]
        self.qk_dim = qk_dim
        self.tau = tau
        self.open_bounds = (float(min_open), float(max_open))
        self.layer_norm = layer_norm
        # LayerNorm instead of the reference's BN1d: per-sample, so batch 1 works (B4) and the gate of an
        # image does not depend on which other images share its batch or on train/eval mode.
        self.queries = nn.ModuleList(
            nn.Sequential(nn.Linear(c, qk_dim), nn.LayerNorm(qk_dim)) for c in self.teacher_channels
        )
        self.keys = nn.ModuleList(
            nn.Sequential(nn.Linear(c, qk_dim), nn.LayerNorm(qk_dim), nn.ReLU()) for c in self.student_channels
        )

    @classmethod
    def from_detectors(cls, teacher: nn.Module, student: nn.Module, **kwargs) -> "SelfTeaching":
        """Build from two `Detector`s (their `layer_channels`)."""
        return cls(teacher.layer_channels, student.layer_channels, **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.student_channels)

    def switch_logits(self, teacher_features, student_features) -> torch.Tensor:
        """Diagonal teacher-query x student-key logits z (B, L), from detached GAP descriptors."""
        columns = []
        for layer, (teacher, student) in enumerate(zip(teacher_features, student_features)):
            query = self.queries[layer](teacher.detach().float().mean(dim=(2, 3)))
            key = self.keys[layer](student.detach().float().mean(dim=(2, 3)))
            columns.append((query * key).sum(dim=1) / math.sqrt(self.qk_dim))
        return torch.stack(columns, dim=1)

    def open_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(gate open) = min_open + (max_open - min_open) * sigmoid(z): never leaves open_bounds."""
        min_open, max_open = self.open_bounds
        return min_open + (max_open - min_open) * torch.sigmoid(logits)

    def sample_gates(self, probability: torch.Tensor) -> torch.Tensor:
        """Straight-through Gumbel-sigmoid: hard 0/1 forward, soft sigmoid backward.

        Logistic noise (a difference of two Gumbels) makes P(hard = 1) exactly `probability`; no noise in
        eval, where the gate is open iff probability > 0.5.
        """
        logit = torch.logit(probability.clamp(_PROB_EPS, 1.0 - _PROB_EPS))
        if self.training:
            uniform = torch.rand_like(logit).clamp(_PROB_EPS, 1.0 - _PROB_EPS)
            logit = logit + torch.log(uniform) - torch.log1p(-uniform)
        soft = torch.sigmoid(logit / self.tau)
        hard = (logit > 0).to(soft.dtype)
        # hard + (soft - soft) is exactly hard in the forward; the gradient is soft's.
        return hard + (soft - soft.detach())

    def forward(
        self,
        teacher_features: Sequence[torch.Tensor],
        student_features: Sequence[torch.Tensor],
        teacher_det_loss_per_image: torch.Tensor | None = None,
        student_det_loss_per_image: torch.Tensor | None = None,
    ) -> DistillOutput:
        self._check_features(teacher_features, student_features)
        if (teacher_det_loss_per_image is None) != (student_det_loss_per_image is None):
            raise ValueError("pass both per-image detection losses (teacher and student) or neither")
        device = student_features[0].device
        # Distances, logits and BCE in float32 even under AMP: squared features overflow fp16.
        with torch.autocast(device_type=device.type, enabled=False):
            distance = ost_distance(teacher_features, student_features, self.layer_norm)
            probability = self.open_probability(self.switch_logits(teacher_features, student_features))
            gates = self.sample_gates(probability)
            # Detached gate: d >= 0, so a gradient through s * d would only ever close the switch (B3).
            ost_loss = (gates.detach() * distance).mean(dim=0).sum()
            switch_target = None
            switch_loss = torch.zeros((), device=device)
            if teacher_det_loss_per_image is not None:
                switch_target = self._switch_target(teacher_det_loss_per_image, student_det_loss_per_image)
                switch_loss = _bce(probability, switch_target[:, None].expand_as(probability))
        return DistillOutput(
            ost_loss=ost_loss,
            switch_loss=switch_loss,
            open_rate_per_layer=gates.detach().mean(dim=0),
            open_probability_per_layer=probability.detach().mean(dim=0),
            gates=gates,
            distance=distance.detach(),
            switch_target=switch_target,
            probability=probability.detach(),
        )

    def require_in_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if any switch parameter is missing from `optimizer` (the reference's bug B3)."""
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.named_parameters() if id(p) not in optimised]
        if missing:
            raise RuntimeError(
                f"{len(missing)} SelfTeaching parameters are not in the optimiser (e.g. {missing[0]}); "
                "the switch would stay at its random init (bug B3)"
            )

    def _switch_target(self, teacher_loss: torch.Tensor, student_loss: torch.Tensor) -> torch.Tensor:
        teacher_loss, student_loss = teacher_loss.detach().float(), student_loss.detach().float()
        if teacher_loss.shape != student_loss.shape or teacher_loss.dim() != 1:
            raise ValueError(
                f"per-image detection losses must both be (B,), got {tuple(teacher_loss.shape)} and "
                f"{tuple(student_loss.shape)}"
            )
        return (teacher_loss < student_loss).float()

    def _check_features(self, teacher_features, student_features) -> None:
        _check_pairs(teacher_features, student_features)
        if len(student_features) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} feature layers, got {len(student_features)}")
        for layer, (teacher, student) in enumerate(zip(teacher_features, student_features)):
            if teacher.shape[1] != self.teacher_channels[layer] or student.shape[1] != self.student_channels[layer]:
                raise ValueError(
                    f"layer {layer}: channels teacher {teacher.shape[1]} / student {student.shape[1]}, built "
                    f"for {self.teacher_channels[layer]} / {self.student_channels[layer]}"
                )


def switch_mode(value) -> str:
    """The recipe's ghost.distill.switch as a mode: booleans (older recipes) map to learned / off."""
    if value is True:
        return "learned"
    if value is False:
        return "off"
    if value not in SWITCH_MODES:
        raise ValueError(f"ghost.distill.switch must be one of {', '.join(SWITCH_MODES)} (or true/false), got {value!r}")
    return value


def random_gates(distance: torch.Tensor, open_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A gate per image and layer, open with probability `open_rate`, blind to the images: the switch's control."""
    if not 0.0 <= open_rate <= 1.0:
        raise ValueError(f"random_open_rate must lie in [0, 1], got {open_rate}")
    draw = torch.rand(distance.shape, generator=generator, device="cpu").to(distance.device)
    return (draw < open_rate).to(distance.dtype)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan when one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average rank over each run of equal scores
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1])
    ends = np.concatenate([starts[1:], [scores.size]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


class SwitchLog:
    """Does the switch decide anything? Per layer over an epoch: AUC of the open probability against the switch's
    target (0.5 = chance) and the target's base rate. `update(probability (B, L), target (B,))` per step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._probabilities: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, probability: torch.Tensor, target: torch.Tensor) -> None:
        self._probabilities.append(probability.detach().float().cpu().numpy())
        self._targets.append(target.detach().float().cpu().numpy())

    def epoch_summary(self) -> dict:
        """{"auc_per_layer": [...], "auc": mean over layers, "base_rate": share of targets = 1}; {} when empty."""
        if not self._probabilities:
            return {}
        probability, target = np.concatenate(self._probabilities), np.concatenate(self._targets)
        per_layer = [roc_auc(probability[:, layer], target) for layer in range(probability.shape[1])]
        finite = [auc for auc in per_layer if np.isfinite(auc)]
        return {"auc_per_layer": per_layer, "auc": float(np.mean(finite)) if finite else float("nan"),
                "base_rate": float(target.mean())}


class OpenRateLog:
    """Per-layer share of open gates over an epoch: `update(gates)` per step, then `epoch_summary()`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._open_counts: torch.Tensor | None = None
        self._images = 0

    def update(self, gates: torch.Tensor) -> None:
        gates = gates.detach().float().cpu()
        if gates.dim() != 2:
            raise ValueError(f"gates must be (B, L), got {tuple(gates.shape)}")
        if self._open_counts is None:
            self._open_counts = torch.zeros(gates.shape[1], dtype=torch.float64)
        elif gates.shape[1] != self._open_counts.numel():
            raise ValueError(f"gates have {gates.shape[1]} layers, the log holds {self._open_counts.numel()}")
        self._open_counts += gates.sum(dim=0).double()
        self._images += gates.shape[0]

    def epoch_summary(self) -> list[float]:
        """Open rate per layer since the last reset; [] when nothing was logged."""
        if self._open_counts is None or self._images == 0:
            return []
        return (self._open_counts / self._images).tolist()


def gqsd_loss(
    det_loss: torch.Tensor,
    distill_out: DistillOutput,
    ost_weight: float = 1.0,
    switch_weight: float = 1.0,
    det_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GQSD total = det_weight * L_det + ost_weight * L_OST + switch_weight * L_switch.

    The reference is det_weight=2, ost_weight=PAPER_OST_WEIGHT with layer_norm='paper' and no switch loss.
    `items` holds detached scalars (call float() to log them).
    """
    det = det_weight * det_loss
    ost = ost_weight * distill_out.ost_loss
    switch = switch_weight * distill_out.switch_loss
    total = det + ost + switch
    items = {
        "det": det.detach(),
        "ost": ost.detach(),
        "switch": switch.detach(),
        "total": total.detach(),
        "open_rate": distill_out.open_rate_per_layer.mean(),
    }
    return total, items


def _bce(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Explicit logs: F.binary_cross_entropy refuses autocast regions, and p is already bounded.
    probability = probability.clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    return -(target * probability.log() + (1.0 - target) * (1.0 - probability).log()).mean()


def _check_layer_norm(layer_norm: str) -> None:
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"layer_norm must be one of {LAYER_NORMS}, got {layer_norm!r}")


def _check_pairs(teacher_features, student_features) -> None:
    if len(teacher_features) != len(student_features):
        raise ValueError(f"teacher has {len(teacher_features)} feature layers, student {len(student_features)}")
    for layer, (teacher, student) in enumerate(zip(teacher_features, student_features)):
        if teacher.dim() != 4 or student.dim() != 4:
            raise ValueError(f"layer {layer}: features must be (B, C, H, W)")
        if teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(
                f"layer {layer}: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ in "
                "batch or spatial size"
            )
