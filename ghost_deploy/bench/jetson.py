"""Board state and power on a Jetson: power mode, clocks, and energy per frame from tegrastats.

Latency on a Jetson depends on the power mode (`nvpmodel`) and on whether `jetson_clocks` pinned the
clocks at their maximum; a bench result without them cannot be compared with another. Off a Jetson the
state says so (`is_jetson: false`) and nothing is sampled. Two results made in different power modes
are refused by `bench --compare` (see `same_power_mode`).

Power: `tegrastats` prints one line per interval with rails such as `VDD_IN 4807mW/4807mW` (Orin,
instantaneous/average) or `POM_5V_IN 2840/2840` (Nano). The module input rail (VDD_IN, POM_5V_IN) is
the whole module's power; boards that list no input rail (AGX Orin, Xavier) get the sum of their rails,
and the rail names used are recorded. Energy per frame = mean power x run time / frames.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ghost_deploy.engines.receipt import read_l4t_release
from ghost_deploy.engines.targets import NV_TEGRA_RELEASE, read_device_tree_model

BOARD_RAILS = ("VDD_IN", "POM_5V_IN")  # whole-module input rail, first match wins
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
_FREQ = re.compile(r"\b(Online|MinFreq|MaxFreq|CurrentFreq|FreqOverride)=(\d+)")


def _run(command: list[str], timeout: float = 10.0) -> tuple[str | None, str | None]:
    """(stdout, None) or (None, why it failed)."""
    if shutil.which(command[0]) is None:
        return None, f"{command[0]} not found"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{' '.join(command)} failed ({exc})"
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        return None, f"{' '.join(command)} exited {done.returncode}" + (f": {message[-1]}" if message else "")
    return done.stdout, None


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q` -> {"name": "MAXN", "id": 0}."""
    name = None
    mode_id = None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("NV Power Mode"):
            name = line.split(":", 1)[1].strip()
            if index + 1 < len(lines) and lines[index + 1].isdigit():
                mode_id = int(lines[index + 1])
    return {"name": name, "id": mode_id}


def parse_jetson_clocks(text: str) -> dict:
    """`jetson_clocks --show` -> CPU / GPU / EMC frequencies and whether jetson_clocks pinned them.

    Pinned (what `sudo jetson_clocks` does): every online CPU and the GPU run at MinFreq = MaxFreq =
    CurrentFreq; the EMC keeps its MinFreq but has FreqOverride=1 and runs at MaxFreq.
    """
    state: dict = {"cpus": {}, "gpu": {}, "emc": None}
    for raw in text.splitlines():
        line = raw.strip()
        values = {key: int(value) for key, value in _FREQ.findall(line)}
        if "MaxFreq" not in values:
            continue
        head = line.split()[0].rstrip(":")
        if head.startswith("cpu") and head[3:].isdigit():
            if values.get("Online", 1):
                state["cpus"][head] = values
        elif head.lower().startswith("gpu"):  # `GPU` (JetPack 5) or `gpu-gpc-0` (JetPack 6+)
            state["gpu"][head] = values
        elif head == "EMC":
            state["emc"] = values

    def at_max(unit: dict) -> bool:
        return unit.get("CurrentFreq", unit["MaxFreq"]) == unit["MaxFreq"]

    fixed = [*state["cpus"].values(), *state["gpu"].values()]
    emc = state["emc"]
    seen = bool(fixed) or emc is not None
    state["clocks_pinned"] = seen and all(at_max(unit) and unit.get("MinFreq") == unit["MaxFreq"] for unit in fixed) and (
        emc is None or (at_max(emc) and (emc.get("FreqOverride") == 1 or emc.get("MinFreq") == emc["MaxFreq"])))
    return state


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """{rail: instantaneous milliwatts} from one tegrastats line."""
    return {rail: float(now) for rail, now, _ in _RAIL.findall(line) if not rail.startswith(("RAM", "SWAP", "IRAM", "LFB"))}


def board_power_mw(rails: dict[str, float]) -> tuple[str, float] | None:
    """(rail, mW): the module input rail, else the sum of all rails (AGX Orin / Xavier list no input rail)."""
    for rail in BOARD_RAILS:
        if rail in rails:
            return rail, rails[rail]
    if rails:
        return "sum:" + "+".join(sorted(rails)), sum(rails.values())
    return None


def is_jetson() -> bool:
    model = read_device_tree_model() or ""
    return Path(NV_TEGRA_RELEASE).exists() or "jetson" in model.lower()


def board_state() -> dict:
    """Power mode, clock state and board identity; `{"is_jetson": False, "note": ...}` elsewhere."""
    if not is_jetson():
        return {"is_jetson": False, "note": "not a Jetson", "power_mode": None, "clocks": None}

    state: dict = {"is_jetson": True, "model": read_device_tree_model(), "l4t": read_l4t_release(), "notes": []}
    text, error = _run(["nvpmodel", "-q"])
    state["power_mode"] = parse_nvpmodel(text) if text else None
    if error:
        state["notes"].append(error)
    text, error = _run(["jetson_clocks", "--show"])
    state["clocks"] = parse_jetson_clocks(text) if text else None
    if error:
        state["notes"].append(error + " (jetson_clocks --show usually needs sudo)")
    state["tegrastats"] = shutil.which("tegrastats") is not None
    return state


def power_mode_label(board: dict | None) -> str:
    if not board or not board.get("is_jetson"):
        return "not a Jetson"
    mode = board.get("power_mode") or {}
    return str(mode.get("name") or mode.get("id") or "unknown")


def same_power_mode(old_board: dict | None, new_board: dict | None) -> str | None:
    """None when the two runs may be compared, else the sentence that says why not."""
    old_label, new_label = power_mode_label(old_board), power_mode_label(new_board)
    if old_label != new_label:
        return (f"power mode differs: old run '{old_label}', this run '{new_label}'; set the same mode "
                f"(sudo nvpmodel -m <id>) and re-run")
    return None


class TegrastatsSampler:
    """Runs `tegrastats --interval N` in the background while a block runs; mean board power afterwards."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[tuple[str, float]] = []
        self.process = None
        self.thread = None

    def __enter__(self):
        self.process = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            power = board_power_mw(parse_tegrastats_line(line))
            if power is not None:
                self.samples.append(power)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.process.terminate()  # the one process this sampler started
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.thread.join(timeout=5)

    def summary(self, frames: int) -> dict:
        if not self.samples:
            return {"samples": 0, "note": "tegrastats printed no board power rail"}
        rail = self.samples[0][0]
        mean_mw = sum(value for _, value in self.samples) / len(self.samples)
        return {"rail": rail, "samples": len(self.samples), "mean_power_w": mean_mw / 1e3, "seconds": self.seconds,
                "frames": frames, "energy_per_frame_mj": mean_mw * self.seconds / frames if frames else None}


def measure_power(call, frames_per_call: int, seconds: float = 3.0, interval_ms: int = 100) -> dict:
    """Run `call` back to back for `seconds` under tegrastats; mean power and energy per frame."""
    if shutil.which("tegrastats") is None:
        return {"note": "tegrastats not found"}
    frames = 0
    with TegrastatsSampler(interval_ms) as sampler:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            call()
            frames += frames_per_call
    return sampler.summary(frames)
