"""Latency measurement: warm-up until the spread settles, then round-robin timed runs, then statistics.

Warm-up runs a call until the coefficient of variation (std / mean) of its last `window` times falls
below `cv_target` (caches, allocator pools, ORT/TensorRT lazy init, CPU frequency all settle by then),
capped by `max_iterations` and `max_seconds` so a noisy machine cannot stall the run; whether it settled
is recorded. Timed runs interleave the callables round-robin, rotating the starting one each round,
so slow drift of the machine (thermal, other load) lands on every backend alike instead of on
whichever happened to run last. Percentiles use numpy's linear interpolation.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class WarmupPolicy:
    window: int = 10  # the last `window` runs are the ones whose spread must settle
    cv_target: float = 0.10
    min_iterations: int = 10
    max_iterations: int = 300
    max_seconds: float = 20.0


@dataclass
class WarmupResult:
    iterations: int
    settled: bool
    final_cv: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def coefficient_of_variation(times: Sequence[float]) -> float:
    values = np.asarray(times, dtype=np.float64)
    mean = values.mean()
    return float(values.std() / mean) if mean > 0 else 0.0


def warm_up(call: Callable[[], object], policy: WarmupPolicy = WarmupPolicy()) -> WarmupResult:
    """Run `call` until the CV of its last `policy.window` durations is below `policy.cv_target`."""
    times: list[float] = []
    start = time.perf_counter()
    cv = None
    while True:
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
        count = len(times)
        if count >= max(policy.window, policy.min_iterations):
            cv = coefficient_of_variation(times[-policy.window:])
            if cv <= policy.cv_target:
                return WarmupResult(count, True, cv, time.perf_counter() - start)
        if count >= policy.max_iterations or time.perf_counter() - start >= policy.max_seconds:
            return WarmupResult(count, False, cv, time.perf_counter() - start)


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: the list rotated by one more place each round."""
    shift = round_index % len(names) if names else 0
    return list(names[shift:]) + list(names[:shift])


def interleaved(calls: dict[str, Callable[[], dict[str, float] | None]], iterations: int,
                progress: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time every callable `iterations` times, round-robin. Returns {name: {"total": [seconds...], ...}}.

    A callable may return a dict of its own stage durations (e.g. preprocess / infer / postprocess, in
    seconds); they are collected beside its total wall time.
    """
    results: dict[str, dict[str, list[float]]] = {name: {"total": []} for name in calls}
    names = list(calls)
    for round_index in range(iterations):
        for name in rotation(names, round_index):
            began = time.perf_counter()
            stages = calls[name]()
            elapsed = time.perf_counter() - began
            results[name]["total"].append(elapsed)
            for stage, seconds in (stages or {}).items():
                results[name].setdefault(stage, []).append(seconds)
        if progress is not None:
            progress(round_index + 1)
    return results


def latency_stats(seconds: Sequence[float], batch: int) -> dict:
    """p50/p90/p99/max/min/mean/std in milliseconds and throughput in images per second."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarise")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {
        "count": int(ms.size), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
        "max_ms": float(ms.max()), "min_ms": float(ms.min()), "mean_ms": mean, "std_ms": float(ms.std()),
        "throughput_ips": float(batch * 1e3 / mean) if mean > 0 else None,
    }
