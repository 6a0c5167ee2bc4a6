"""Everything only a GPU shows, in one call: what the device is, how fast and how big training is, and whether the
CUDA path gives the numbers the export relies on. `--device cpu --quick` runs the same code small (CI does).

1. The device's name (and torch, CUDA versions).
2. Teacher and GHOST training steps per second, as images a second, and peak device memory, for ghost-s-vedai at
   512 and 1024 px, batch 8 and 16, with AMP off and on (`--quick`: ghost-p at 64 px, batch 2). A GHOST step is
   the student's QAT forward and backward with the frozen teacher's forward and the OST distance, as training runs it.
3. Integer codes: after a few training steps on the device, every quantized layer's weight codes and every
   activation quantizer's codes (on the same inputs) computed on the device equal those computed on the CPU from
   the same weights. The export reads codes on the CPU; a device that rounds otherwise would break parity.
4. The device-trained GHOST model, saved as a checkpoint, exports and passes its parity gate (exact arithmetic).
5. DDP: `torchrun --nproc_per_node 1 -m ghost_deploy train` on a tiny recipe (NCCL on CUDA, gloo on the CPU).

Prints one table; exits 1 when a check fails. Run it by hand, or on a lent GPU:

    python benchmarks/gpu_check.py --device cuda          # about 10 minutes on a large GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the CI smoke version, about a minute
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ghost_deploy.data import ensure_synthetic_dataset
from ghost_deploy.export import export_onnx
from ghost_deploy.export.sample import build_sample_model, save_sample_checkpoint
from ghost_deploy.model import build_model
from ghost_deploy.quant import act_quantizers, quant_layers
from ghost_deploy.recipe import DEFAULTS
from ghost_deploy.train.distill import ost_distance
from ghost_deploy.train.loop import amp_mode
from ghost_deploy.train.loss import DetectionLoss

TINY_RECIPE = """
name: gpu-check-ddp
model: ghost-p
input_mode: rgb+ir
img_size: 64
seed: 0
teacher: {epochs: 1, batch_size: 4, nominal_batch: 4, optimizer: adamw, lr0: 0.003, warmup_epochs: 0}
"""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def synthetic_batch(batch: int, size: int, device: torch.device, generator: torch.Generator):
    rgb = torch.rand(batch, 3, size, size, generator=generator)
    ir = torch.rand(batch, 1, size, size, generator=generator)
    boxes = torch.rand(batch * 4, 4, generator=generator) * 0.5 + 0.25
    targets = torch.cat([torch.arange(batch).repeat_interleave(4)[:, None].float(),
                         torch.randint(0, 8, (batch * 4, 1), generator=generator).float(), boxes[:, :2],
                         boxes[:, 2:] * 0.2], dim=1)
    return rgb.to(device), ir.to(device), targets.to(device)


def training_step(student, teacher, loss_fn, optimizer, scaler, inputs, targets, dtype):
    with torch.autocast(inputs[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        heads, student_features = student.forward_features(*inputs)
        loss, _ = loss_fn(heads, targets)
        if teacher is not None:  # GHOST: the frozen teacher's features and the OST distance
            with torch.no_grad():
                _, teacher_features = teacher.forward_features(*inputs)
            loss = loss + ost_distance(teacher_features, student_features).mean(dim=0).sum()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def models(stage: str, name: str, size: int, device: torch.device):
    if stage == "teacher":
        return build_model(name, nc=8).to(device).train(), None
    student, _ = build_sample_model(name, nc=8, img_size=size, weight_bits=(3, 8), seed=0, exact_grid=False)
    teacher = build_model(name, nc=8).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return student.to(device).train(), teacher


def throughput(stage: str, name: str, size: int, batch: int, amp: str, device: torch.device, steps: int) -> dict:
    dtype = amp_mode(amp, device)
    student, teacher = models(stage, name, size, device)
    loss_fn = DetectionLoss(student.detect, DEFAULTS["hyp"], img_size=size)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    rgb, ir, targets = synthetic_batch(batch, size, device, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    training_step(student, teacher, loss_fn, optimizer, scaler, (rgb, ir), targets, dtype)  # warm-up (cuDNN)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(student, teacher, loss_fn, optimizer, scaler, (rgb, ir), targets, dtype)
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": batch / seconds, "peak_gib": memory, "student": student}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def codes_agree(student, device: torch.device, size: int) -> tuple[bool, str]:
    """Weight and activation codes of the device-trained student, on the device and on the CPU, equal."""
    on_cpu, _ = build_sample_model(student.config.name, nc=8, img_size=size, weight_bits=(3, 8), seed=0,
                                   exact_grid=False)
    on_cpu.load_state_dict({k: v.detach().cpu() for k, v in student.state_dict().items()})
    student, on_cpu = student.eval(), on_cpu.eval()
    layers = dict(quant_layers(on_cpu))
    weights_equal = all(torch.equal(module.weight_codes().cpu(), layers[name].weight_codes())
                        for name, module in quant_layers(student) if module.weight_quantizer is not None)
    captured = {}

    def capture(key):
        def hook(module, args):
            captured.setdefault(key, args[0].detach().clone())  # returns None: the input is left as it is
        return hook

    hooks = [q.register_forward_pre_hook(capture(key)) for key, q in act_quantizers(on_cpu).items()]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        on_cpu(*synthetic_batch(2, size, torch.device("cpu"), generator)[:2])
    for hook in hooks:
        hook.remove()
    device_quantizers = act_quantizers(student)
    acts_equal = True
    with torch.no_grad():
        for key, quantizer in act_quantizers(on_cpu).items():
            x = captured[key]
            scale = quantizer.scale.detach().clamp_min(1e-8)
            cpu_codes = torch.round(quantizer(x) / scale)
            device_codes = torch.round(device_quantizers[key](x.to(device)) / scale.to(device)).cpu()
            acts_equal &= torch.equal(cpu_codes, device_codes)
    return weights_equal and acts_equal, (f"{len(layers)} weight layers, {len(captured)} activation quantizers: "
                                          f"{'equal' if weights_equal and acts_equal else 'DIFFER'}")


def export_passes(student, name: str, size: int, folder: Path) -> tuple[bool, str]:
    student = student.cpu().eval()
    plan_model, plan = build_sample_model(name, nc=8, img_size=size, weight_bits=(3, 8), seed=0, exact_grid=False)
    checkpoint = save_sample_checkpoint(folder / "device-trained.safetensors", model_name=name, nc=8, img_size=size,
                                        model=student, plan=plan, parity={"images": 2, "arithmetic": "exact"})
    images = folder / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image  # noqa: E402  (only this check writes images)

    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{index:04d}_co.png")
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(images / f"{index:04d}_ir.png")
    result = export_onnx(checkpoint, folder / "device-trained.onnx", parity_images=images, progress=False)
    return result.passed, f"exact arithmetic {'bit-identical' if result.exact.bit_identical else 'differs'}"


def ddp_runs(device: torch.device, folder: Path) -> tuple[bool, str]:
    recipe = folder / "ddp.yaml"
    recipe.write_text(TINY_RECIPE)
    data = ensure_synthetic_dataset(root=folder / "synth", n_train=8, n_val=4, n_test=2, img_size=64)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", "-m",
               "ghost_deploy", "train", "--stage", "teacher", "--recipe", str(recipe), "--data", str(data),
               "--out", str(folder / "ddp"), "--device", device.type, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    ok = done.returncode == 0 and (folder / "ddp" / "teacher" / "weights" / "best.safetensors").is_file()
    return ok, "torchrun, 1 process" + ("" if ok else f": FAILED ({(done.stderr or done.stdout)[-300:]})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="ghost-p at 64 px, batch 2, 2 steps: the CI smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing GPU-only can be measured (run with --device cpu --quick)")
        return 2
    name, sizes, batches, steps = ("ghost-p", [64], [2], 2) if args.quick else ("ghost-s-vedai", [512, 1024], [8, 16], 10)
    amps = ["off", "bf16"] if device.type == "cpu" else ["off", "fp16", "bf16"]
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    print(f"device: {device_name(device)}")
    print(f"{'stage':<8} {'model':<14} {'px':>5} {'batch':>5} {'amp':>5} {'images/s':>9} {'peak GiB':>9}")
    trained = None
    for stage in ("teacher", "ghost"):
        for size in sizes:
            for batch in batches:
                for amp in amps:
                    row = throughput(stage, name, size, batch, amp, device, steps)
                    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
                    print(f"{stage:<8} {name:<14} {size:>5} {batch:>5} {amp:>5} {row['images_per_s']:>9.1f} {peak:>9}")
                    if stage == "ghost" and trained is None:
                        trained = row["student"]
    checks = {"integer codes device == CPU": codes_agree(trained, device, sizes[0]),
              "export of the device-trained model": export_passes(trained, name, sizes[0], folder),
              "DDP": ddp_runs(device, folder)}
    for check, (ok, detail) in checks.items():
        print(f"{check:<36} {'PASS' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
