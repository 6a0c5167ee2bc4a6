"""ONNX file size: the `--int4-weights` export against the INT8-container export of the same checkpoint.

Exports the checkpoint both ways, each with its parity gate (the default parity images of the checkpoint's
recipe), and prints both sizes, their ratio (goal: <= 0.6 for a plan averaging <= 5 bits), the plan's
param-weighted average bits and the share of weights in layers at <= 4 bits (only those can be INT4).
Without --checkpoint it uses a sample checkpoint (random weights, see ghost_deploy.export.sample) of the demo
architecture with every layer at 4 bits, the plan INT4 storage helps most. Not a test: run it by hand.

    python benchmarks/int4_size.py [--checkpoint CKPT] [--model ghost-p] [--out DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--model", default=None, help="architecture of the sample checkpoint (default: the demo's)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here")
    args = parser.parse_args()

    from ghost_deploy.checkpoint import read_meta
    from ghost_deploy.export import export_onnx
    from ghost_deploy.quant import BitPlan, average_weight_bits

    with tempfile.TemporaryDirectory(prefix="ghost-int4size-") as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint, parity = args.checkpoint, {}
        if checkpoint is None:
            from ghost_deploy.export.sample import save_sample_checkpoint
            from ghost_deploy.recipe import load_recipe

            demo = load_recipe("demo")
            checkpoint = save_sample_checkpoint(folder / "sample-4bit.safetensors", args.model or demo["model"],
                                                img_size=demo["img_size"], weight_bits=4)
            parity = {"parity": False}  # random weights detect nothing; the graphs are what is measured
        int8 = export_onnx(checkpoint, folder / "int8.onnx", progress=False, **parity)
        int4 = export_onnx(checkpoint, folder / "int4.onnx", int4_weights=True, progress=False, **parity)
        plan = BitPlan.from_dict(read_meta(checkpoint)["bit_plan"])
        size8, size4 = int8.onnx_path.stat().st_size, int4.onnx_path.stat().st_size
    params = {name: layer.params for name, layer in plan.layers.items()}
    low = sum(p for name, p in params.items() if (plan.layers[name].weight_bits or 32) <= 4)
    print(f"checkpoint {checkpoint}: {average_weight_bits(plan)['param_weighted']:.2f} avg weight bits "
          f"(param-weighted), {100 * low / sum(params.values()):.1f}% of weights in layers at <= 4 bits")
    gate = "" if parity else f", parity {'passed' if int8.passed and int4.passed else 'FAILED'} (both)"
    print(f"INT8 containers {size8:,} bytes, INT4 weights {size4:,} bytes{gate}")
    ratio = size4 / size8
    print(f"ratio INT4 / INT8 = {ratio:.3f} (goal <= 0.6): {'OK' if ratio <= 0.6 else 'NOT MET'}")


if __name__ == "__main__":
    main()
