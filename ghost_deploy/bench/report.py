"""Bench output: the terminal table, bench.json (docs/bench-schema.json), report.md and its PNG plots."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from ghost_deploy.bench.jetson import power_mode_label
from ghost_deploy.io import atomic_path, write_json_atomic, write_text_atomic

JSON_NAME = "bench.json"
REPORT_NAME = "report.md"
PLOTS = {"latency": "latency_distribution.png", "map_vs_size": "map_vs_size.png", "bits": "bits_per_layer.png"}


def _fmt(value, digits: int = 2, missing: str = "-") -> str:
    if value is None:
        return missing
    return f"{value:.{digits}f}"


def latency_rows(result: dict) -> list[dict]:
    """One row per (backend, batch): what the terminal table and the Markdown table show."""
    rows = []
    for record in result["backends"]:
        accuracy = record.get("accuracy") or {}
        base = {"backend": record["name"], "precision": record["precision"], "size_mb": record.get("size_mb"),
                "mAP50": accuracy.get("mAP50"), "mAP50_95": accuracy.get("mAP50_95"),
                "peak_rss_mb": (record.get("memory") or {}).get("peak_rss_mb")}
        if record["status"] != "ok":
            rows.append({**base, "batch": None, "note": f"{record['status']}: {record['reason']}"})
            continue
        for entry in record["latency"]:
            if "skipped" in entry:
                rows.append({**base, "batch": entry["batch"], "note": f"skipped: {entry['skipped']}"})
                continue
            infer, e2e = entry["infer"], entry["end_to_end"]
            rows.append({**base, "batch": entry["batch"], "p50": infer["p50_ms"], "p90": infer["p90_ms"],
                         "p99": infer["p99_ms"], "max": infer["max_ms"], "ips": infer["throughput_ips"],
                         "pre": e2e["preprocess"]["p50_ms"], "post": e2e["postprocess"]["p50_ms"],
                         "e2e": e2e["total"]["p50_ms"], "e2e_p99": e2e["total"]["p99_ms"], "note": ""})
    return rows


COLUMNS = (("backend", "backend", None), ("precision", "precision", None), ("batch", "b", None),
           ("p50", "p50 ms", 2), ("p90", "p90 ms", 2), ("p99", "p99 ms", 2), ("max", "max ms", 2),
           ("ips", "img/s", 1), ("pre", "pre ms", 2), ("post", "post ms", 2), ("e2e", "e2e p50", 2),
           ("size_mb", "size MB", 3), ("mAP50", "mAP50", 4), ("mAP50_95", "mAP50:95", 4), ("peak_rss_mb", "peak RSS MB", 0))


def _cell(row: dict, key: str, digits) -> str:
    value = row.get(key)
    if digits is None:
        return "-" if value is None else str(value)
    return _fmt(value, digits)


def format_table(result: dict) -> str:
    """The terminal table: one line per backend and batch size, skipped backends with their reason."""
    rows = latency_rows(result)
    cells = [[title for _, title, _ in COLUMNS]] + [[_cell(row, key, digits) for key, _, digits in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for index, line in enumerate(cells):
        text = "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(line))
        note = rows[index - 1]["note"] if index else ""
        lines.append(text + (f"  {note}" if note else ""))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """Table, then the board state, sizes of the bit plan and notes: what `ghost-deploy bench` prints."""
    settings = result["settings"]
    lines = [format_table(result), ""]
    board = result["board"]

    lines.append(f"machine: {result['machine']['cpu'] or result['machine']['platform']}, "
                 f"{result['machine']['threads']} threads; board: {power_mode_label(board)}"
                 + (f", clocks pinned: {(board.get('clocks') or {}).get('clocks_pinned')}" if board.get("is_jetson") else ""))
    lines.append(f"timing: {settings['iterations']} interleaved runs per backend and batch after warm-up; "
                 f"e2e = {settings['frames']} uint8 frames {settings['frame_shape']} -> letterbox -> infer -> decode + NMS")
    plan = result["sizes"].get("bit_plan")
    if plan:
        at_size = f" at {plan['image_size']} px" if plan.get("image_size") else ""
        lines.append(f"bit plan: {plan['size_mb']:.3f} MB deployable, {plan['bops_g']:.2f} GBOPs{at_size}, "
                     f"{plan['avg_weight_bits']:.2f} avg weight bits ({len(plan['layers'])} layers)")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ Markdown
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _latency_section(result: dict, plots: dict[str, str | None]) -> list[str]:
    lines = []
    lines += ["## Latency", ""]
    header = ["backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "max ms", "img/s", "warm-up runs"]
    rows = []
    for record in result["backends"]:
        if record["status"] != "ok":
            rows.append([record["name"], record["precision"], "-", *["-"] * 5, f"{record['status']}: {record['reason']}"])
            continue
        for entry in record["latency"]:
            if "skipped" in entry:
                rows.append([record["name"], record["precision"], str(entry["batch"]), *["-"] * 5, entry["skipped"]])
                continue
            infer, warm = entry["infer"], entry["warmup"]
            rows.append([record["name"], record["precision"], str(entry["batch"]), _fmt(infer["p50_ms"]),
                         _fmt(infer["p90_ms"]), _fmt(infer["p99_ms"]), _fmt(infer["max_ms"]),
                         _fmt(infer["throughput_ips"], 1),
                         f"{warm['iterations']}" + ("" if warm["settled"] else " (not settled)")])
    lines += _md_table(header, rows) + [""]
    if plots.get("latency"):
        lines += [f"![Latency distribution per backend]({plots['latency']})", ""]
    return lines


def _size_and_accuracy_sections(result: dict, plots: dict[str, str | None]) -> list[str]:
    settings = result["settings"]
    lines = []
    lines += ["## Size", ""]
    rows = [[entry["role"], f"`{entry['path']}`", entry.get("precision", "-"), _fmt(entry["mb"], 3)]
            for entry in result["sizes"]["files"]]
    lines += _md_table(["artifact", "file", "precision", "MB"], rows) + [""]
    plan = result["sizes"].get("bit_plan")
    if plan:
        at_size = f" at {plan['image_size']} px" if plan.get("image_size") else ""
        lines += [f"Bit plan ({plan['method']}, from `{plan['source']}`): {plan['size_mb']:.3f} MB deployable "
                  f"({plan['conv_weights_mb']:.3f} MB conv weights only), {plan['bops_g']:.2f} GBOPs per image{at_size}, "
                  f"{plan['avg_weight_bits']:.2f} weight bits on average (param-weighted). File sizes differ: an INT8 "
                  "ONNX or engine stores every weight of 8 bits or fewer in a byte.", ""]
        if plots.get("bits"):
            lines += [f"![Bits per layer]({plots['bits']})", ""]

    lines += ["## Accuracy", ""]
    scored = [r for r in result["backends"] if r.get("accuracy")]
    if scored:
        lines += [f"Split `{settings['split']}` of `{settings['data']}`, {scored[0]['accuracy']['images']} images, "
                  f"NMS conf {settings['eval_nms']['conf_thres']}, IoU {settings['eval_nms']['iou_thres']}.", ""]
        rows = [[r["name"], _fmt(r["accuracy"]["mAP50"], 4), _fmt(r["accuracy"]["mAP50_95"], 4),
                 _fmt(r.get("size_mb"), 3)] for r in scored]
        lines += _md_table(["backend", "mAP50", "mAP50:95", "size MB"], rows) + [""]
        names = [c["name"] for c in scored[0]["accuracy"]["per_class"]]
        rows = []
        for index, name in enumerate(names):
            labels = scored[0]["accuracy"]["per_class"][index]["labels"]
            rows.append([name, str(labels)] + [f"{_fmt(r['accuracy']['per_class'][index]['ap50'], 3)} / "
                                               f"{_fmt(r['accuracy']['per_class'][index]['ap50_95'], 3)}" for r in scored])
        lines += ["Per class, AP50 / AP50:95:", ""]
        lines += _md_table(["class", "labels"] + [r["name"] for r in scored], rows) + [""]
        if plots.get("map_vs_size"):
            lines += [f"![mAP vs size]({plots['map_vs_size']})", ""]
    else:
        lines += ["Not measured (no dataset given).", ""]
    return lines


def markdown_report(result: dict, plots: dict[str, str | None]) -> str:
    """report.md: settings, latency, end to end, sizes, accuracy, memory, power, with the plots inline."""
    machine, settings, board = result["machine"], result["settings"], result["board"]
    lines = ["# Bench report", "", f"Created {result['created']} on {machine['cpu'] or machine['platform']} "
             f"({machine['cpu_count']} CPUs, {machine['threads']} threads, device {machine['device']}); "
             f"board: {power_mode_label(board)}.", ""]
    lines += [f"Model: {len(result['model']['names'])} classes, inputs {result['model']['input_names']} at "
              f"{result['model']['img_size']} px (decoding from `{result['model']['source']}`).", ""]
    lines += ["Protocol: each backend is loaded and warmed up alone until the coefficient of variation of its last "
              f"{settings['warmup']['window']} runs is at most {settings['warmup']['cv_target']}; then "
              f"{settings['iterations']} timed runs per backend and batch size, backends interleaved round-robin "
              "(the first backend rotates each round). End to end = uint8 "
              f"{settings['frames']} frames of shape {settings['frame_shape']} -> resize + letterbox + packing -> "
              f"inference -> decode + NMS (conf {settings['deploy_nms']['conf_thres']}, IoU "
              f"{settings['deploy_nms']['iou_thres']}).", ""]

    lines += _latency_section(result, plots)
    lines += ["## End to end (p50 / p99 ms)", ""]
    rows = []
    for record in result["backends"]:
        for entry in record.get("latency", []):
            if "end_to_end" not in entry:
                continue
            e2e = entry["end_to_end"]
            rows.append([record["name"], str(entry["batch"])] +
                        [f"{_fmt(e2e[s]['p50_ms'])} / {_fmt(e2e[s]['p99_ms'])}" for s in ("preprocess", "infer", "postprocess", "total")]
                        + [_fmt(e2e["total"]["throughput_ips"], 1)])
    lines += _md_table(["backend", "batch", "pre-process", "inference", "decode + NMS", "total", "img/s"], rows) + [""]
    decode = result["frames"].get("decode")
    if decode:
        lines += [f"Reading and decoding the image files of one frame (all sensors): p50 {_fmt(decode['p50_ms'])} ms, "
                  f"p99 {_fmt(decode['p99_ms'])} ms (not part of the end-to-end figures).", ""]

    lines += _size_and_accuracy_sections(result, plots)
    lines += ["## Memory", "", "Host peak RSS is a process-wide figure: it is reset before each backend is loaded "
              "(Linux `clear_refs`), so each row is the high-water mark of that backend's load and warm-up, which "
              "still includes what the backends loaded before it hold; the delta is that backend's own growth.", ""]
    rows = []
    for record in result["backends"]:
        memory = record.get("memory") or {}
        rows.append([record["name"], _fmt(memory.get("rss_before_mb"), 1), _fmt(memory.get("peak_rss_mb"), 1),
                     _fmt(memory.get("peak_delta_mb"), 1), _fmt(memory.get("device_peak_mb"), 1),
                     str(memory.get("peak_method", "-"))])
    lines += _md_table(["backend", "RSS before MB", "peak RSS MB", "delta MB", "device peak MB", "method"], rows) + [""]

    powered = [r for r in result["backends"] if r.get("power")]
    if powered:
        lines += ["## Power", ""]
        rows = [[r["name"], _fmt(r["power"].get("mean_power_w"), 2), _fmt(r["power"].get("energy_per_frame_mj"), 2),
                 str(r["power"].get("rail", r["power"].get("note", "-")))] for r in powered]
        lines += _md_table(["backend", "mean power W", "energy / frame mJ", "rail"], rows) + [""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def _save_figure(figure, path: Path) -> None:
    # A bare matplotlib Figure renders with Agg: no pyplot, no window, no global backend switch.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _horizontal(axis) -> dict:
    # matplotlib >= 3.10 takes orientation=, older ones only vert= (deprecated since 3.11)

    return {"orientation": "horizontal"} if "orientation" in inspect.signature(axis.boxplot).parameters else {"vert": False}


def plot_latency(result: dict, path: Path) -> bool:
    """Box plot of the timed inference runs per backend, one panel per batch size."""
    from matplotlib.figure import Figure

    batches = result["settings"]["batch_sizes"]
    series = {batch: [(r["name"], e["samples_ms"]) for r in result["backends"] for e in r.get("latency", [])
                      if e["batch"] == batch and "samples_ms" in e] for batch in batches}
    series = {batch: data for batch, data in series.items() if data}
    if not series:
        return False
    figure = Figure(figsize=(6 * len(series), 0.6 * max(len(d) for d in series.values()) + 2))
    axes = figure.subplots(1, len(series), squeeze=False)
    for axis, (batch, data) in zip(axes[0], series.items()):
        axis.boxplot([samples for _, samples in data], whis=(1, 99), showmeans=True, flierprops={"markersize": 2},
                     **_horizontal(axis))
        axis.set_yticks(range(1, len(data) + 1), [name for name, _ in data])
        axis.invert_yaxis()  # first backend on top, as in the tables
        values = np.concatenate([np.asarray(samples, dtype=float) for _, samples in data])
        log_scale = values.min() > 0 and values.max() / values.min() > 20
        if log_scale:  # backends 10x apart: a linear axis would flatten the fast ones
            axis.set_xscale("log")
        axis.set_xlabel("inference latency (ms)" + (", log scale" if log_scale else ""))
        axis.set_title(f"batch {batch}: box p25-p75, whiskers p1-p99, triangle mean")
        axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def plot_map_vs_size(result: dict, path: Path) -> bool:
    """mAP50:95 (filled) and mAP50 (hollow) of each backend against the size of the file it ran; a fake-quant
    backend is also drawn (x) at the bit plan's analytic deployable size."""
    from matplotlib.figure import Figure

    points = [(r["name"], r["size_mb"], r["accuracy"], r["precision"]) for r in result["backends"]
              if r.get("accuracy") and r.get("size_mb")]
    if not points:
        return False
    plan = result["sizes"].get("bit_plan")
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    top = 0.0
    for index, (name, size, accuracy, precision) in enumerate(points):
        # points often sit on top of each other: named in the legend (colour + marker), not annotated
        color, marker = f"C{index % 10}", "osD^v"[index // 10 % 5]
        axis.scatter([size], [accuracy["mAP50_95"]], color=color, marker=marker, label=name, zorder=3)
        axis.scatter([size], [accuracy["mAP50"]], facecolors="none", edgecolors=color, marker=marker, zorder=3)
        if plan and precision == "fake-quant":
            axis.scatter([plan["size_mb"]], [accuracy["mAP50_95"]], marker="x", color=color, zorder=3,
                         label=f"{name} at bit-plan size")
        top = max(top, accuracy["mAP50"], accuracy["mAP50_95"])
    axis.set_xlim(left=0)
    axis.set_ylim(0, max(0.05, top * 1.15))
    axis.set_xlabel("size (MB): file that ran; x = analytic size of the bit plan")
    axis.set_ylabel("mAP (filled: 50:95, hollow: 50)")
    axis.set_title("mAP vs size")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def plot_bits(result: dict, path: Path) -> bool:
    """Weight bits (bars; float layers grey, hatched) and input activation bits (dots) per conv of the plan."""
    from matplotlib.figure import Figure

    plan = result["sizes"].get("bit_plan")
    if not plan or not plan["layers"]:
        return False
    layers = plan["layers"]
    positions = range(len(layers))
    float_height = 9
    heights = [layer["weight_bits"] if layer["weight_bits"] is not None else float_height for layer in layers]
    colors = ["C0" if layer["weight_bits"] is not None else "0.75" for layer in layers]
    figure = Figure(figsize=(max(8, 0.22 * len(layers) + 2), 4.5))
    axis = figure.subplots()
    bars = axis.bar(positions, heights, color=colors, label="weight bits")
    for bar, layer in zip(bars, layers):
        if layer["weight_bits"] is None:
            bar.set_hatch("//")
    act = [(i, layer["act_bits"]) for i, layer in enumerate(layers) if layer["act_bits"] is not None]
    if act:
        axis.plot([i for i, _ in act], [b for _, b in act], "o", color="C3", markersize=3, label="input activation bits")
    axis.set_xticks(list(positions), [layer["name"].removeprefix("model.").removesuffix(".conv") for layer in layers],
                    rotation=90, fontsize=6)
    axis.set_yticks(list(range(0, 9)) + [float_height], [str(b) for b in range(0, 9)] + ["FP"])
    axis.set_ylim(0, float_height + 1.6)  # room for the legend above the bars
    axis.set_ylabel("bits")
    axis.set_title(f"bits per layer ({plan['method']}): {plan['size_mb']:.3f} MB, {plan['bops_g']:.2f} GBOPs")
    from matplotlib.patches import Patch

    handles, labels = axis.get_legend_handles_labels()
    handles.append(Patch(facecolor="0.75", hatch="//", label="float weights"))
    axis.legend(handles=handles, fontsize=8, loc="upper left", ncol=3)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def write_reports(result: dict, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """bench.json, report.md and the plots that have data; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    drawn: dict[str, str | None] = {}
    if plots:
        for key, draw in (("latency", plot_latency), ("map_vs_size", plot_map_vs_size), ("bits", plot_bits)):
            path = out / PLOTS[key]
            drawn[key] = PLOTS[key] if draw(result, path) else None
            if drawn[key]:
                written[key] = path
    write_json_atomic(out / JSON_NAME, result)
    written["json"] = out / JSON_NAME
    write_text_atomic(out / REPORT_NAME, markdown_report(result, drawn))
    written["report"] = out / REPORT_NAME
    return written
