"""Bench building blocks without a model: warm-up rule, interleaving, statistics, memory, Jetson parsers."""
from __future__ import annotations

import numpy as np
import pytest

from ghost_deploy.bench import jetson, memory, timing
from ghost_deploy.bench.timing import WarmupPolicy


class FakeClock:
    """perf_counter that advances only when a timed call 'runs' for its scripted duration."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = list(durations)
        self.calls = 0

    def perf_counter(self) -> float:
        return self.now

    def run(self) -> None:
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_warm_up_stops_when_the_spread_settles(monkeypatch):
    # 5 slow, jittery first runs (lazy init, cold caches), then steady 10 ms
    clock = FakeClock([0.2, 0.05, 0.12, 0.03, 0.08] + [0.010] * 100)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    result = timing.warm_up(clock.run, WarmupPolicy(window=4, cv_target=0.01, min_iterations=4, max_iterations=50))
    assert result.settled and result.iterations == 9  # the first window of 4 steady runs
    assert result.final_cv == pytest.approx(0.0)


def test_warm_up_gives_up_at_the_cap_and_says_so(monkeypatch):
    clock = FakeClock([0.01, 0.03] * 100)  # never settles
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    result = timing.warm_up(clock.run, WarmupPolicy(window=4, cv_target=0.05, min_iterations=4, max_iterations=20))
    assert not result.settled and result.iterations == 20 and result.final_cv == pytest.approx(0.5)


def test_warm_up_time_cap(monkeypatch):
    clock = FakeClock([1.0, 3.0] * 100)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    result = timing.warm_up(clock.run, WarmupPolicy(window=4, cv_target=0.05, max_iterations=1000, max_seconds=10.0))
    # after 5 runs 9 s have passed (< 10 s), the 6th ends at 12 s: stop, before any full window was seen
    assert not result.settled and result.iterations == 6 and result.final_cv is None


def test_interleaving_rotates_the_first_backend():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    results = timing.interleaved(calls, iterations=4)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(results[name]["total"]) == 4 for name in "abc")


def test_interleaving_collects_stage_times():
    results = timing.interleaved({"x": lambda: {"pre": 0.5, "infer": 1.5}}, iterations=3)
    assert results["x"]["pre"] == [0.5] * 3 and results["x"]["infer"] == [1.5] * 3 and len(results["x"]["total"]) == 3


def test_latency_stats():
    seconds = np.arange(1, 101) / 1e3  # 1..100 ms
    stats = timing.latency_stats(seconds, batch=4)
    assert stats["count"] == 100 and stats["p50_ms"] == pytest.approx(50.5) and stats["max_ms"] == pytest.approx(100)
    assert stats["p99_ms"] == pytest.approx(99.01) and stats["p90_ms"] == pytest.approx(90.1)
    assert stats["throughput_ips"] == pytest.approx(4 / 0.0505)
    with pytest.raises(ValueError):
        timing.latency_stats([], 1)


def test_peak_window_sees_memory_allocated_inside_it():
    with memory.PeakWindow() as window:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB touched
        block[::512] += 1
        del block
    report = window.to_dict()
    assert report["peak_rss_mb"] > 0
    if report["peak_method"] == "vmhwm":  # resettable peak (Linux): the 64 MB shows in the delta
        assert report["peak_delta_mb"] >= 60


# ------------------------------------------------------------------------------------------ Jetson
NVPMODEL_Q = "NV Power Mode: MAXN\n0\n"
CLOCKS_DYNAMIC = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano
Online CPUs: 0-5
cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=729600 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=1 c7=1
GPU MinFreq=306000000 MaxFreq=624750000 CurrentFreq=306000000
EMC MinFreq=204000000 MaxFreq=2133000000 CurrentFreq=2133000000 FreqOverride=0
NV Power Mode: 15W
"""
CLOCKS_PINNED = """cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 c7=0
cpu2: Online=0 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=115200 IdleStates: WFI=0 c7=0
gpu-gpc-0 MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000
EMC MinFreq=204000000 MaxFreq=2133000000 CurrentFreq=2133000000 FreqOverride=1
NV Power Mode: 15W
"""
TEGRASTATS_ORIN_NANO = ("RAM 2402/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [3%@729,1%@729] EMC_FREQ 0% "
                        "GR3D_FREQ 0% cpu@47.5C VDD_IN 4807mW/4807mW VDD_CPU_GPU_CV 602mW/602mW VDD_SOC 1444mW/1444mW")
TEGRASTATS_AGX_ORIN = ("RAM 5000/30536MB CPU [1%@729] GR3D_FREQ 0% VDD_GPU_SOC 2000mW/2000mW VDD_CPU_CV 400mW/400mW "
                       "VIN_SYS_5V0 3000mW/3000mW VDDQ_VDD2_1V8AO 300mW/300mW")


def test_parse_nvpmodel():
    assert jetson.parse_nvpmodel(NVPMODEL_Q) == {"name": "MAXN", "id": 0}
    assert jetson.parse_nvpmodel("garbage") == {"name": None, "id": None}


def test_parse_jetson_clocks_tells_pinned_from_dynamic():
    dynamic = jetson.parse_jetson_clocks(CLOCKS_DYNAMIC)
    assert not dynamic["clocks_pinned"] and dynamic["gpu"]["GPU"]["MaxFreq"] == 624750000
    assert dynamic["emc"]["FreqOverride"] == 0 and set(dynamic["cpus"]) == {"cpu0", "cpu1"}
    pinned = jetson.parse_jetson_clocks(CLOCKS_PINNED)
    assert pinned["clocks_pinned"] and "cpu2" not in pinned["cpus"]  # offline cores do not count
    assert not jetson.parse_jetson_clocks("")["clocks_pinned"]


def test_tegrastats_board_power():
    rails = jetson.parse_tegrastats_line(TEGRASTATS_ORIN_NANO)
    assert rails == {"VDD_IN": 4807.0, "VDD_CPU_GPU_CV": 602.0, "VDD_SOC": 1444.0}  # RAM / SWAP are not rails
    assert jetson.board_power_mw(rails) == ("VDD_IN", 4807.0)
    rail, total = jetson.board_power_mw(jetson.parse_tegrastats_line(TEGRASTATS_AGX_ORIN))
    assert rail.startswith("sum:") and total == 5700.0
    assert jetson.parse_tegrastats_line("POM_5V_IN 2840/2840 POM_5V_GPU 0/0") == {"POM_5V_IN": 2840.0, "POM_5V_GPU": 0.0}


def test_power_mode_comparison_rule():
    maxn = {"is_jetson": True, "power_mode": {"name": "MAXN", "id": 0}}
    watts15 = {"is_jetson": True, "power_mode": {"name": "15W", "id": 2}}
    off = {"is_jetson": False, "power_mode": None}
    assert jetson.same_power_mode(maxn, dict(maxn)) is None
    assert jetson.same_power_mode(off, off) is None
    assert "MAXN" in jetson.same_power_mode(maxn, watts15) and "15W" in jetson.same_power_mode(maxn, watts15)
    assert "not a Jetson" in jetson.same_power_mode(maxn, off)


def test_board_state_off_jetson():
    if jetson.is_jetson():
        pytest.skip("running on a Jetson")
    assert jetson.board_state() == {"is_jetson": False, "note": "not a Jetson", "power_mode": None, "clocks": None}
