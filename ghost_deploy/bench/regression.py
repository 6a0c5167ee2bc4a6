"""`bench --compare OLD.json`: deltas between two bench results, and a regression gate.

Rows are matched by backend name and batch size. The gate fails when a backend's p50 inference latency
grew by more than `max_regression` (relative, 0.10 = 10 %) or its mAP50 or mAP50:95 fell by more than
`max_map_drop` (absolute). p99, throughput and size deltas are shown, not gated (p99 of a short run is
noisy). Two runs made in different Jetson power modes (or one on a Jetson, one off) are refused: their
latencies say nothing about the model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ghost_deploy.bench.jetson import same_power_mode
from ghost_deploy.errors import UserError
from ghost_deploy.io import read_user_json

FORMAT_PREFIX = "ghost-deploy/bench/"


def load_result(path: str | os.PathLike) -> dict:
    """A bench.json, checked wherever `compare_results` reads it: a bad file is one line naming it and the key."""
    path = Path(path)
    data = read_user_json(path, "bench result")
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith(FORMAT_PREFIX):
        raise UserError(path, "not a ghost-deploy bench result (no 'format': 'ghost-deploy/bench/...')")
    if data["format"] != "ghost-deploy/bench/v1":
        raise UserError(path, f"bench result format {data['format']!r} is not one this version reads (v1)")
    _check_result(data, path)
    return data


# What compare_results reads from a result, each key with the kind it must have ("?" allows null) and whether it
# must be there; a number is finite and never a bool.
_KINDS = {"number": (int, float), "integer": (int,), "string": (str,), "object": (dict,), "list": (list,)}
_SECTION_KEYS = (("machine", "object", False), ("settings", "object", False), ("model", "object", False),
                 ("board", "object?", False), ("backends", "list", True))
_BACKEND_KEYS = (("name", "string", True), ("latency", "list", True), ("size_mb", "number?", False),
                 ("accuracy", "object?", False))
_LATENCY_KEYS = (("batch", "integer", True), ("infer", "object", False))
_INFER_KEYS = (("p50_ms", "number", True), ("p99_ms", "number", True), ("throughput_ips", "number?", False))
_ACCURACY_KEYS = (("mAP50", "number", True), ("mAP50_95", "number", True))


def _fits(value, kind: str) -> bool:
    if value is None:
        return kind.endswith("?")
    if isinstance(value, bool) or not isinstance(value, _KINDS[kind.rstrip("?")]):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _check_keys(container, where: str, keys, path) -> None:
    if not isinstance(container, dict):
        raise UserError(path, f"{where.rstrip('.') or 'the result'} must be an object, got {json.dumps(container)[:40]}")
    for key, kind, required in keys:
        if key not in container:
            if required:
                raise UserError(path, f"{where}{key} is missing (not a complete bench result)")
        elif not _fits(container[key], kind):
            wanted = kind.rstrip("?") + (" or null" if kind.endswith("?") else "")
            raise UserError(path, f"{where}{key} must be {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}, "
                                  f"got {json.dumps(container[key])[:40]}")


def _check_result(data: dict, path) -> None:
    _check_keys(data, "", _SECTION_KEYS, path)
    for index, record in enumerate(data["backends"]):
        where = f"backends[{index}]"
        _check_keys(record, f"{where}.", _BACKEND_KEYS, path)
        if record.get("accuracy") is not None:
            _check_keys(record["accuracy"], f"{where}.accuracy.", _ACCURACY_KEYS, path)
        for position, entry in enumerate(record["latency"]):
            _check_keys(entry, f"{where}.latency[{position}].", _LATENCY_KEYS, path)
            if "infer" in entry:
                _check_keys(entry["infer"], f"{where}.latency[{position}].infer.", _INFER_KEYS, path)


def _relative(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return (new - old) / old


def _entries(result: dict) -> dict[tuple[str, int], dict]:
    entries = {}
    for record in result["backends"]:
        for entry in record.get("latency", []):
            if "infer" in entry:
                entries[(record["name"], entry["batch"])] = {"record": record, "latency": entry}
    return entries


def compare_results(old: dict, new: dict, max_regression: float = 0.10, max_map_drop: float = 0.01,
                    old_path: str | None = None) -> dict:
    """{"rows", "regressions", "warnings", "only_old", "only_new", "passed"}; UserError across power modes."""
    refusal = same_power_mode(old.get("board"), new.get("board"))
    if refusal:
        raise UserError(old_path, f"refusing to compare: {refusal}")
    old_entries, new_entries = _entries(old), _entries(new)
    if not set(old_entries) & set(new_entries):
        raise UserError(old_path, "no backend and batch size in common with this run: nothing to compare "
                        f"(old: {sorted({n for n, _ in old_entries})}, new: {sorted({n for n, _ in new_entries})})")
    rows, regressions = [], []
    for key in sorted(set(old_entries) & set(new_entries)):
        name, batch = key
        before, after = old_entries[key], new_entries[key]
        old_infer, new_infer = before["latency"]["infer"], after["latency"]["infer"]
        row = {"backend": name, "batch": batch,
               "p50_old": old_infer["p50_ms"], "p50_new": new_infer["p50_ms"],
               "p50_delta": _relative(new_infer["p50_ms"], old_infer["p50_ms"]),
               "p99_delta": _relative(new_infer["p99_ms"], old_infer["p99_ms"]),
               "throughput_delta": _relative(new_infer["throughput_ips"], old_infer["throughput_ips"]),
               "size_delta": _relative(after["record"].get("size_mb"), before["record"].get("size_mb"))}
        if row["p50_delta"] is not None and row["p50_delta"] > max_regression:
            regressions.append(f"{name} batch {batch}: p50 {old_infer['p50_ms']:.3f} -> {new_infer['p50_ms']:.3f} ms "
                               f"(+{100 * row['p50_delta']:.1f} % > {100 * max_regression:.1f} %)")
        old_acc, new_acc = before["record"].get("accuracy"), after["record"].get("accuracy")
        for metric in ("mAP50", "mAP50_95"):
            if old_acc and new_acc:
                row[f"{metric}_old"], row[f"{metric}_new"] = old_acc[metric], new_acc[metric]
                drop = old_acc[metric] - new_acc[metric]
                if drop > max_map_drop and batch == min(b for n, b in new_entries if n == name):
                    regressions.append(f"{name}: {metric} {old_acc[metric]:.4f} -> {new_acc[metric]:.4f} "
                                       f"(-{drop:.4f} > {max_map_drop})")
        rows.append(row)
    return {"rows": rows, "regressions": regressions, "warnings": _context_warnings(old, new),
            "only_old": sorted(f"{n} b{b}" for n, b in set(old_entries) - set(new_entries)),
            "only_new": sorted(f"{n} b{b}" for n, b in set(new_entries) - set(old_entries)),
            "passed": not regressions, "max_regression": max_regression, "max_map_drop": max_map_drop}


def _context_warnings(old: dict, new: dict) -> list[str]:
    """Differences that make the deltas less meaningful without forbidding the comparison."""
    warnings = []
    for section, keys in (("machine", ("cpu", "threads", "device", "onnxruntime", "torch", "tensorrt")),
                          ("settings", ("iterations", "frames", "frame_shape", "data", "split", "max_images")),
                          ("model", ("img_size", "input_names", "nc"))):
        for key in keys:
            before, after = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if before != after:
                warnings.append(f"{section}.{key} differs: {before!r} -> {after!r}")
    old_clocks = (old.get("board") or {}).get("clocks") or {}
    new_clocks = (new.get("board") or {}).get("clocks") or {}
    if old_clocks.get("clocks_pinned") != new_clocks.get("clocks_pinned"):
        warnings.append(f"jetson_clocks state differs: pinned {old_clocks.get('clocks_pinned')} -> "
                        f"{new_clocks.get('clocks_pinned')}")
    return warnings


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def format_comparison(comparison: dict) -> str:
    header = f"{'backend':<20} {'b':>3} {'p50 old':>9} {'p50 new':>9} {'p50':>8} {'p99':>8} {'img/s':>8} {'size':>7} {'mAP50:95':>17}"
    lines = [header, "-" * len(header)]
    for row in comparison["rows"]:
        accuracy = "-"
        if "mAP50_95_old" in row:
            accuracy = f"{row['mAP50_95_old']:.4f}->{row['mAP50_95_new']:.4f}"
        lines.append(f"{row['backend']:<20} {row['batch']:>3} {row['p50_old']:>9.3f} {row['p50_new']:>9.3f} "
                     f"{_percent(row['p50_delta']):>8} {_percent(row['p99_delta']):>8} "
                     f"{_percent(row['throughput_delta']):>8} {_percent(row['size_delta']):>7} {accuracy:>17}")
    for label, key in (("only in the old run", "only_old"), ("only in this run", "only_new")):
        if comparison[key]:
            lines.append(f"{label}: {', '.join(comparison[key])}")
    lines += [f"warning: {warning}" for warning in comparison["warnings"]]
    if comparison["passed"]:
        lines.append(f"no regression (p50 within +{100 * comparison['max_regression']:.1f} %, "
                     f"mAP within -{comparison['max_map_drop']})")
    else:
        lines += [f"REGRESSION: {item}" for item in comparison["regressions"]]
    return "\n".join(lines)
