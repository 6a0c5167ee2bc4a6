"""Size (MB) and BOPs (G) of ghost-s and ghost-s-vedai in three conventions, and where the paper's bounds come from.

Conventions (`ghost_deploy.bench.conventions`, docs/size-bops.md): the GHOST reference's count as coded (bug
B10 included), the same count corrected, and what the project's exported model stores and computes. Uniform
plans only: HQ's bits depend on trained weights (a random model's HQ plan says nothing), and the research
notes do not list the paper's per-layer bits. Analytic, from a traced forward: no weights, no data, no GPU.

The "ceilings" table is the reference's as-coded all-8-bit count of the 3-head model for each dataset's class
count: a bound "< X" that every plan of <= 8 bits meets, which is what the abstract's "< 9.7 MB" is.

    python benchmarks/size_bops.py [--out docs/results/size-bops.json] [--models ...] [--sizes 512 1024]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMAT = "ghost-deploy/size-bops"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "size-bops.json"
COMMAND = "python benchmarks/size_bops.py"
# The input each model is trained on in GHOST's README: VEDAI is RGB+IR (4 channels), the others RGB.
INPUT_MODES = {"ghost-s": "rgb", "ghost-s-vedai": "rgb+ir"}
# Class counts of the datasets the 3-head model is trained on (ghost-algorithm.md §0), and VEDAI's.
DATASET_CLASSES = {"VEDAI's 8 classes": 8, "NWPU VHR-10": 10, "DOTA v1.0": 15, "DIOR": 20}
PAPER = {"size_mb_bound": 9.7, "bops_g_bound": 2158.0, "image_size": 512, "source": "arXiv 2301.00131 abstract",
         "not_checked_here": {"vedai_map50": 80.31, "why": "needs the full VEDAI set and the paper's checkpoint; "
                              "not in the abstract or the reference repo (ghost-algorithm.md §10)"}}


def model_rows(name: str, sizes, bits, nc: int = 8) -> list[dict]:
    """One row per (image size, uniform weight bits): the three conventions of the same plan."""
    import ghost_deploy
    from ghost_deploy.bench.conventions import all_conventions
    from ghost_deploy.quant.plans import model_sites, plan_from_bits

    model = ghost_deploy.build_model(name, nc=nc, input_mode=INPUT_MODES[name])
    rows = []
    for size in sizes:
        sites = model_sites(model, size)
        for weight_bits in bits:
            plan = plan_from_bits(model, weight_bits, 8, image_size=size, sites=sites)
            costs = all_conventions(plan)
            rows.append({"model": name, "input_mode": INPUT_MODES[name], "nc": nc, "image_size": size,
                         "weight_bits": weight_bits, "convs": len(plan.layers),
                         **{key: cost.to_dict() for key, cost in costs.items()}})
    return rows


def ceiling_rows(classes: dict[str, int] = DATASET_CLASSES) -> list[dict]:
    """The reference's as-coded all-8-bit size and BOPs of ghost-s (RGB, 512 px) for each class count."""
    rows = []
    for dataset, nc in classes.items():
        row = model_rows("ghost-s", (PAPER["image_size"],), (8,), nc=nc)[0]
        rows.append({"dataset": dataset, "nc": nc, **row["reference_as_coded"],
                     "below_size_bound": row["reference_as_coded"]["size_mb"] < PAPER["size_mb_bound"],
                     "below_bops_bound": row["reference_as_coded"]["bops_g"] < PAPER["bops_g_bound"]})
    return rows


def markdown(rows: list[dict], ceilings: list[dict]) -> str:
    lines = ["| model | input | px | W bits | as coded MB | as coded G | corrected MB | corrected G | "
             "deployable MB | deployable G |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["model"], f"{row['input_mode']} nc {row['nc']}", row["image_size"], row["weight_bits"]]
        for key in ("reference_as_coded", "corrected", "deployable"):
            cells += [f"{row[key]['size_mb']:.3f}", f"{row[key]['bops_g']:.1f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if ceilings:
        lines += ["", f"As-coded all-8-bit ceiling of ghost-s (RGB, {PAPER['image_size']} px) by class count; "
                  f"paper: < {PAPER['size_mb_bound']} MB, < {PAPER['bops_g_bound']:.0f} G", "",
                  "| dataset | nc | MB | G | < 9.7 MB | < 2158 G |", "|---|---|---|---|---|---|"]
        for row in ceilings:
            marks = ["yes" if row[key] else "no" for key in ("below_size_bound", "below_bops_bound")]
            lines.append(f"| {row['dataset']} | {row['nc']} | {row['size_mb']:.3f} | {row['bops_g']:.1f} | "
                         f"{marks[0]} | {marks[1]} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(INPUT_MODES), choices=list(INPUT_MODES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="input side in pixels")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4], help="uniform weight bits (2..8)")
    parser.add_argument("--nc", type=int, default=8, help="classes (VEDAI's 8, the research notes' counts)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the per-dataset ceiling table")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result ('-' to write none)")
    args = parser.parse_args(argv)

    from ghost_deploy.bench.conventions import CONVENTIONS

    rows = [row for name in args.models for row in model_rows(name, args.sizes, args.bits, args.nc)]
    ceilings = [] if args.no_ceilings else ceiling_rows()
    result = {"format": FORMAT, "version": 1, "command": COMMAND, "conventions": list(CONVENTIONS),
              "doc": "docs/size-bops.md", "paper": PAPER, "rows": rows, "ceilings": ceilings}
    print(markdown(rows, ceilings))
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
