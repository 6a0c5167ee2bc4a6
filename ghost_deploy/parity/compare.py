"""Backend-agnostic output comparison (Polygraphy style): two dicts of arrays in, one verdict out.

Tensor level: cosine similarity per image (the gate) and overall, max abs error, also in units of the
output's quantization scale when known (1 LSB = one scale step; TensorRT rounds half-to-even and uses
reciprocal scales, so 1-LSB flips are expected and bit-exactness is not a valid gate).
Detection level (when a `detection_fn` is given): boxes matched by class and IoU, counting missing and
extra detections and the largest score change. When the detections say which prediction (anchor) each came
from and carry the dense predictions, a detection is compared with the other side's prediction *at the same
anchor*: two runtimes whose numbers agree can still let NMS pick a different one of two near-tied boxes, which
is not a difference in the model. Numpy only; knows nothing about torch, ORT or TensorRT.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np

from ghost_deploy.errors import UserError

DetectionFn = Callable[[dict], list]


@dataclass
class Budgets:
    min_cosine: float = 0.9999
    max_abs_error_in_output_scale: float | None = None
    score_threshold: float = 0.25
    match_iou: float = 0.95
    max_score_delta: float = 0.02
    allow_missing: int = 0
    allow_extra: int = 0
    # a share of the reference detections (on top of the counts): compiled engines' budgets use it (docs/engines.md)
    allow_missing_fraction: float = 0.0
    allow_extra_fraction: float = 0.0

    def allowed(self, count: int, fraction: float, reference_count: int) -> int:
        return count + int(math.floor(fraction * reference_count))

    @classmethod
    def from_dict(cls, values: dict | None) -> "Budgets":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(None, f"unknown parity budget(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParityReport:
    passed: bool
    failures: list[str]
    outputs: dict[str, dict]
    detections: dict | None
    budgets: dict
    worst_outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "budgets": dict(self.budgets),
                "worst_outputs": list(self.worst_outputs), "outputs": _json_clean(self.outputs),
                "detections": _json_clean(self.detections)}

    def format_table(self) -> str:
        header = f"{'output':<24} {'shape':<20} {'min cos/img':>12} {'cos all':>10} {'max abs':>11} {'max LSB':>8}"
        lines = [header, "-" * len(header)]
        for name in self.worst_outputs:
            stats = self.outputs[name]
            lsb = stats.get("max_abs_error_in_output_scale")
            lines.append(f"{name:<24} {str(tuple(stats.get('shape') or ())):<20} "
                         f"{_fmt(stats.get('min_cosine_per_image'), '.6f'):>12} {_fmt(stats.get('cosine'), '.6f'):>10} "
                         f"{_fmt(stats.get('max_abs_error'), '.3e'):>11} {_fmt(lsb, '.2f'):>8}")
        if self.detections is not None:
            d = self.detections
            lines.append(f"detections >= {d['score_threshold']}: reference {d['reference_count']}, "
                         f"candidate {d['candidate_count']}, matched {d['matched']}, missing {d['missing']}, "
                         f"extra {d['extra']}, max |score delta| {_fmt(d['max_score_delta'], '.4f')}")
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    return obj


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 and norm_b == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return float(np.dot(a, b) / (norm_a * norm_b))


def tensor_stats(reference: np.ndarray, candidate: np.ndarray, scale: float | None) -> dict:
    """Cosine per image (axis 0 = batch) and overall, max abs error (raw and in scale units)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    batched_ref = ref.reshape(ref.shape[0], -1) if ref.ndim >= 1 and ref.shape[0] > 0 else ref.reshape(1, -1)
    batched_cand = cand.reshape(batched_ref.shape)
    finite = bool(np.isfinite(cand).all())
    per_image = [_cosine(r, c) for r, c in zip(batched_ref, batched_cand)] if finite else [float("nan")]
    abs_error = np.abs(ref - cand)
    max_abs = float(abs_error.max()) if abs_error.size else 0.0
    return {"shape": list(ref.shape), "finite": finite,
            "cosine_per_image": per_image,
            "min_cosine_per_image": min(per_image) if per_image else 1.0,
            "cosine": _cosine(ref.ravel(), cand.ravel()) if finite else float("nan"),
            "max_abs_error": max_abs if finite else float("nan"),
            "mean_abs_error": (float(abs_error.mean()) if abs_error.size else 0.0) if finite else float("nan"),
            "output_scale": scale,
            "max_abs_error_in_output_scale": (max_abs / scale) if (scale and finite) else None}


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix between (n,4) and (m,4) xyxy boxes."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    # Degenerate (zero-area) boxes have no overlap to measure; identical ones are still the same box.
    identical = (a[:, None, :] == b[None, :, :]).all(axis=2)
    return np.where(identical, 1.0, iou)


@dataclass
class ImageDetections:
    """One image's detections, and where they came from.

    `boxes`: (n, 6) [x1, y1, x2, y2, score, class] after NMS. `anchors`: (n,) the row of `predictions` each
    detection was taken from. `predictions`: (N, 4 + 1 + nc) every anchor's [x1, y1, x2, y2, obj, cls...]
    before NMS (scores are obj * cls).
    """
    boxes: np.ndarray
    anchors: np.ndarray
    predictions: np.ndarray

    def at(self, anchors: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(n, 6) this image's prediction at each given anchor, scored for the given class."""
        rows = self.predictions[anchors.astype(np.int64)]
        scores = rows[:, 4] * rows[np.arange(len(rows)), 5 + classes.astype(np.int64)]
        return np.concatenate((rows[:, :4], scores[:, None], classes[:, None]), axis=1)


def _match_at_anchors(reference: ImageDetections, candidate: ImageDetections, budgets: Budgets) -> dict:
    """Each side's detections against the other side's prediction at the same anchor and class."""
    ref = np.asarray(reference.boxes, dtype=np.float64).reshape(-1, 6)
    cand = np.asarray(candidate.boxes, dtype=np.float64).reshape(-1, 6)
    above_ref = ref[:, 4] >= budgets.score_threshold
    above_cand = cand[:, 4] >= budgets.score_threshold
    score_deltas = []

    def agree(mine: np.ndarray, anchors: np.ndarray, other: ImageDetections) -> np.ndarray:
        there = other.at(np.asarray(anchors), mine[:, 5]).astype(np.float64)
        iou = np.diag(box_iou(mine[:, :4], there[:, :4])) if len(mine) else np.zeros(0)
        ok = iou >= budgets.match_iou
        score_deltas.extend(np.abs(mine[ok, 4] - there[ok, 4]).tolist())
        return ok

    ref_ok = agree(ref[above_ref], np.asarray(reference.anchors)[above_ref], candidate)
    cand_ok = agree(cand[above_cand], np.asarray(candidate.anchors)[above_cand], reference)
    return {"reference_count": int(above_ref.sum()), "candidate_count": int(above_cand.sum()),
            "matched": int(ref_ok.sum()), "missing": int((~ref_ok).sum()), "extra": int((~cand_ok).sum()),
            "max_score_delta": max(score_deltas) if score_deltas else 0.0}


def match_detections(reference, candidate, budgets: Budgets) -> dict:
    """Same-anchor comparison for ImageDetections (see the module docstring); for bare (n, 6) arrays, a greedy
    match (reference by descending score) to the best-IoU unmatched candidate of the same class."""
    if isinstance(reference, ImageDetections) and isinstance(candidate, ImageDetections):
        return _match_at_anchors(reference, candidate, budgets)
    ref = np.asarray(getattr(reference, "boxes", reference), dtype=np.float64).reshape(-1, 6)
    cand = np.asarray(getattr(candidate, "boxes", candidate), dtype=np.float64).reshape(-1, 6)
    iou = box_iou(ref[:, :4], cand[:, :4])
    cand_taken = np.zeros(len(cand), dtype=bool)
    ref_taken = np.zeros(len(ref), dtype=bool)
    score_deltas = []
    for r in np.argsort(-ref[:, 4], kind="stable"):
        ok = (~cand_taken) & (cand[:, 5] == ref[r, 5]) & (iou[r] >= budgets.match_iou)
        if not ok.any():
            continue
        c = int(np.argmax(np.where(ok, iou[r], -1.0)))
        cand_taken[c] = ref_taken[r] = True
        # only pairs where either side is reportable count: low-score noise may drift freely
        if max(ref[r, 4], cand[c, 4]) >= budgets.score_threshold:
            score_deltas.append(abs(ref[r, 4] - cand[c, 4]))
    above_ref = ref[:, 4] >= budgets.score_threshold
    above_cand = cand[:, 4] >= budgets.score_threshold
    return {"reference_count": int(above_ref.sum()), "candidate_count": int(above_cand.sum()),
            "matched": int((ref_taken & above_ref).sum()),
            "missing": int((~ref_taken & above_ref).sum()), "extra": int((~cand_taken & above_cand).sum()),
            "max_score_delta": max(score_deltas) if score_deltas else 0.0}


def compare_detections(reference_dets: list, candidate_dets: list, budgets: Budgets) -> dict:
    if len(reference_dets) != len(candidate_dets):
        raise ValueError(f"detection lists differ in length: {len(reference_dets)} vs {len(candidate_dets)}")
    per_image = [match_detections(r, c, budgets) for r, c in zip(reference_dets, candidate_dets)]
    total = {key: sum(p[key] for p in per_image)
             for key in ("reference_count", "candidate_count", "matched", "missing", "extra")}
    total["max_score_delta"] = max((p["max_score_delta"] for p in per_image), default=0.0)
    total["score_threshold"] = budgets.score_threshold
    total["match_iou"] = budgets.match_iou
    total["per_image"] = per_image
    return total


def compare_outputs(reference: dict, candidate: dict, budgets: Budgets | None = None,
                    output_scales: dict | None = None, detection_fn: DetectionFn | None = None) -> ParityReport:
    """Compare every reference output with the candidate's; see module docstring for what is measured.

    Without a scale for an output, `max_abs_error_in_output_scale` is not checked for it (reported as None).
    """
    budgets = budgets or Budgets()
    output_scales = output_scales or {}
    failures: list[str] = []
    outputs: dict[str, dict] = {}
    for name, ref in reference.items():
        if name not in candidate:
            failures.append(f"output '{name}' missing from candidate (has {sorted(candidate)})")
            continue
        ref, cand = np.asarray(ref), np.asarray(candidate[name])
        if ref.shape != cand.shape:
            failures.append(f"output '{name}' shape {cand.shape} != reference {ref.shape}")
            outputs[name] = {"shape": list(ref.shape), "candidate_shape": list(cand.shape),
                             "min_cosine_per_image": None, "cosine": None, "max_abs_error": None}
            continue
        scale = output_scales.get(name)
        stats = tensor_stats(ref, cand, float(scale) if scale is not None else None)
        outputs[name] = stats
        if not stats["finite"]:
            failures.append(f"output '{name}' has NaN/Inf values")
            continue
        if stats["min_cosine_per_image"] < budgets.min_cosine:
            failures.append(f"output '{name}' cosine {stats['min_cosine_per_image']:.6f} < {budgets.min_cosine} "
                            f"(worst image {int(np.argmin(stats['cosine_per_image']))})")
        lsb = stats["max_abs_error_in_output_scale"]
        if budgets.max_abs_error_in_output_scale is not None and lsb is not None \
                and lsb > budgets.max_abs_error_in_output_scale:
            failures.append(f"output '{name}' max abs error {lsb:.2f} scale steps > "
                            f"{budgets.max_abs_error_in_output_scale}")

    detections = None
    if detection_fn is not None and not any("missing from candidate" in f or "shape" in f for f in failures):
        detections = compare_detections(detection_fn(reference), detection_fn(candidate), budgets)
        allow_missing = budgets.allowed(budgets.allow_missing, budgets.allow_missing_fraction, detections["reference_count"])
        allow_extra = budgets.allowed(budgets.allow_extra, budgets.allow_extra_fraction, detections["reference_count"])
        if detections["missing"] > allow_missing:
            failures.append(f"{detections['missing']} reference detection(s) missing (allowed {allow_missing})")
        if detections["extra"] > allow_extra:
            failures.append(f"{detections['extra']} extra detection(s) (allowed {allow_extra})")
        if detections["max_score_delta"] > budgets.max_score_delta:
            failures.append(f"detection score changed by {detections['max_score_delta']:.4f} > {budgets.max_score_delta}")

    def badness(name: str) -> float:
        value = outputs[name].get("min_cosine_per_image")
        return -math.inf if value is None or not math.isfinite(value) else value

    worst = sorted(outputs, key=badness)
    return ParityReport(passed=not failures, failures=failures, outputs=outputs, detections=detections,
                        budgets=budgets.to_dict(), worst_outputs=worst)
