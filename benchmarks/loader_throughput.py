"""Data-loader throughput: training images a second for one worker, with the VEDAI recipe's augmentations.

Reads the real VEDAI pairs in ../shared/data/vedai-real (VEDAI at 512 px, VEDAI_1024 at 1024 px), builds the
training Dataset exactly as `ghost-deploy train` does (mosaic, affine, HSV, flips on both sensors alike, with
the VEDAI recipe's hyp), and times `dataset[i]` in one process: that is what one DataLoader worker does per image
(collate and the transfer to the GPU run in the main process). Then times each step alone (decode, mosaic /
affine, colour, flips, tensor conversion) from a profile of the same run, to name what bounds it.
Not a test: run it by hand.

    python benchmarks/loader_throughput.py [--sizes 512 1024] [--seconds 20] [--data ../shared/data/vedai-real]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from ghost_deploy.data.dataset import Dataset
from ghost_deploy.data.spec import load_dataset_yaml
from ghost_deploy.recipe import load_recipe

FOLDERS = {512: "VEDAI", 1024: "VEDAI_1024"}
STEPS = {"decode (PNG read)": ("decode", "pngimageplugin", "imagefile.py"), "cache read": ("fromfile", "npyio"),
         "affine warp (PIL transform)": ("transform",), "colour (HSV round trip)": ("convert", "point", "hsv"),
         "mosaic canvas": ("mosaic", "fill", "full"), "to tensor": ("_to_tensor", "from_numpy", "ascontiguousarray")}


def dataset_yaml(root: Path, size: int, folder: Path) -> Path:
    images = sorted((root / FOLDERS[size] / "images").glob("*_co.png"))
    ids = folder / f"ids-{size}.txt"
    ids.write_text("\n".join(p.name[: -len("_co.png")] for p in images) + "\n")
    names = (root / "names.txt").read_text().split()
    yaml_path = folder / f"vedai-{size}.yaml"
    yaml_path.write_text(f"path: {root / FOLDERS[size]}\ntrain: {ids}\nval: {ids}\nmodalities: [rgb, ir]\n"
                         f"nc: {len(names)}\nnames: {names}\n")
    return yaml_path


def measure(dataset: Dataset, seconds: float) -> tuple[float, int]:
    count, started, index = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        dataset[index % len(dataset)]
        index += 1
        count += 1
    return count / (time.perf_counter() - started), count


def profile_steps(dataset: Dataset, images: int) -> dict[str, float]:
    profiler = cProfile.Profile()
    profiler.enable()
    for index in range(images):
        dataset[index % len(dataset)]
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(entry[2] for entry in stats.values())  # tottime of every function
    shares = {}
    for step, keys in STEPS.items():
        shares[step] = sum(entry[2] for (file, _, name), entry in stats.items()
                           if any(k in name.lower() or k in Path(file).name.lower() for k in keys)) / total
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/vedai-real")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe("vedai")
    folder = Path(tempfile.mkdtemp(prefix="loader-"))
    print(f"hyp (VEDAI recipe): { {k: recipe['hyp'][k] for k in sorted(recipe['hyp'])} }")
    for size in args.sizes:
        spec = load_dataset_yaml(dataset_yaml(args.data, size, folder))
        for cache in ("off", "disk"):
            dataset = Dataset(spec, "train", size, augment=True, hyp=recipe["hyp"], cache=cache)
            dataset.set_epoch(0)
            if cache == "disk":
                for index in range(len(dataset)):  # the first epoch decodes and writes the cache
                    dataset[index]
            rate, count = measure(dataset, args.seconds)
            shares = profile_steps(dataset, max(4, count // 4))
            print(f"{size} px, cache {cache}: {rate:.1f} images/s for one worker ({count} images, {len(dataset)} "
                  "pairs); time share: " + ", ".join(f"{step} {share:.0%}" for step, share in shares.items()))


if __name__ == "__main__":
    main()
