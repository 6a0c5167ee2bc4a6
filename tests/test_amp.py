"""Mixed precision: bf16 autocast trains on the CPU; quantizers, scales and losses stay float32 inside it."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from ghost_deploy.checkpoint import read_meta
from ghost_deploy.cli.train import train as train_command
from ghost_deploy.data import ensure_synthetic_dataset
from ghost_deploy.errors import UserError
from ghost_deploy.export.sample import build_sample_model
from ghost_deploy.quant import act_quantizers, quant_layers
from ghost_deploy.train.loop import amp_mode
from ghost_deploy.train.loss import DetectionLoss
from ghost_deploy.recipe import DEFAULTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """
name: tiny-amp
model: ghost-p
input_mode: rgb+ir
img_size: 64
seed: 1
teacher: {epochs: 1, batch_size: 8, nominal_batch: 8, optimizer: adamw, lr0: 0.003, warmup_epochs: 0}
ghost: {epochs: 1, batch_size: 8, nominal_batch: 8, optimizer: adamw, lr0: 0.0003, calib_batches: 1,
        plan: {threshold: 5.0}}
"""


def test_amp_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_mode("auto", cpu) is None and amp_mode("auto", cuda) is torch.float16
    assert amp_mode("bf16", cpu) is torch.bfloat16 and amp_mode("off", cuda) is None
    with pytest.raises(UserError, match="fp16 autocast needs a CUDA device"):
        amp_mode("fp16", cpu)
    with pytest.raises(UserError, match="must be one of"):
        amp_mode("int8", cpu)


def test_train_with_bf16_autocast_on_the_cpu(tmp_path):
    data = ensure_synthetic_dataset(root=tmp_path / "synth", n_train=8, n_val=4, n_test=2, img_size=64)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    result = CliRunner().invoke(train_command, ["--recipe", str(recipe), "--data", str(data), "--out",
                                                str(tmp_path / "run"), "--amp", "bf16", "--device", "cpu",
                                                "--no-progress"])
    assert result.exit_code == 0, result.output
    for stage in ("teacher", "ghost"):
        header = read_meta(tmp_path / "run" / stage / "weights" / "best.safetensors")
        assert header.recipe["amp"] == "bf16" and math.isfinite(header.get("metrics")["mAP50"])
    assert read_meta(tmp_path / "run" / "ghost" / "weights" / "best.safetensors").bit_plan is not None


def test_quantizers_and_loss_are_float32_under_autocast():
    """Inside bf16 autocast the quantizers make the float32 codes (bf16 cannot tell x / s = 126.5 from 127) and the
    detection loss is float32; only the convolutions run in bf16."""
    model, _ = build_sample_model("ghost-n", img_size=64, weight_bits=(3, 8), seed=0, exact_grid=False)
    model.train()
    quantizers = [q for q in act_quantizers(model).values()][:3]
    convs = [module for _, module in quant_layers(model)][:3]
    x = torch.randn(2, 16, 8, 8) * 3
    for quantizer, conv in zip(quantizers, convs):
        plain = quantizer(x)
        weight = conv.quantized_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(quantizer(x), plain) and torch.equal(conv.quantized_weight(), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads = model(torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64))
        assert heads[0].dtype == torch.bfloat16
        loss, _ = DetectionLoss(model.detect, DEFAULTS["hyp"], img_size=64)(heads, torch.zeros(0, 6))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
