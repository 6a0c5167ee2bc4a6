"""One real end-to-end run of `ghost-deploy pipeline` on a tiny synthetic set: every stage, every verdict."""
import json
import os
import subprocess
import sys

import pytest

from ghost_deploy.data import ensure_synthetic_dataset

RECIPE = """
name: tiny-e2e
model: ghost-p
input_mode: rgb+ir
img_size: 64
seed: 1
teacher: {epochs: 2, batch_size: 8, nominal_batch: 8, optimizer: adamw, lr0: 0.003, warmup_epochs: 0}
ghost:
  epochs: 1
  batch_size: 8
  nominal_batch: 8
  optimizer: adamw
  lr0: 0.0003
  calib_batches: 2
  plan: {threshold: 5.0}
  distill: {layer_norm: mean, ost_weight: 1.0}
parity: {images: 4}
"""


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_skips_unchanged_ones(tmp_path):
    data = ensure_synthetic_dataset(root=tmp_path / "synth", n_train=16, n_val=8, n_test=4, img_size=64)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ghost_deploy", "pipeline", "--recipe", str(recipe), "--data", str(data),
               "--out", str(run), "--bench-iterations", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "ghost-deploy pipeline summary" in out
    for name in ("ghost", "ghost-int4", "ghost-cpu", "teacher-fp32"):
        assert (run / "export" / f"{name}.onnx").exists()
        assert (run / "export" / f"{name}.parity.npz").exists()
    assert "NO ENGINE WAS BUILT" in out  # no TensorRT here: a deployment bundle instead
    ledger = json.loads((run / "pipeline.json").read_text())
    assert set(ledger) == {"teacher", "ghost", "export", "engine", "bench"}
    assert all(info["verdict"] == "passed" for info in ledger["export"]["summary"]["onnx"].values())
    bundle = ledger["engine"]["summary"]["bundle"]
    assert os.path.isdir(bundle) and os.path.exists(os.path.join(bundle, "build_on_device.sh"))
    openvino = ledger["engine"]["summary"]["openvino"]  # a real engine, compiled and parity-checked here
    receipt = json.loads(open(openvino["receipt"]).read())
    assert receipt["runtime"] == "openvino" and receipt["built"] and receipt["parity"]["passed"]
    bench = json.loads((run / "bench" / "bench.json").read_text())
    names = {b["name"] for b in bench["backends"]}
    assert names >= {"torch-fp32", "torch-ghost", "ort-ghost", "ort-ghost-int4", "ort-ghost-cpu", "ort-teacher-fp32",
                     "ov-ghost-cpu", "ov-engine-ghost-cpu-openvino-cpu"}, names
    assert all(b["accuracy"] is not None for b in bench["backends"] if b["status"] == "ok"), "mAP missing for a backend"
    assert (run / "bench" / "report.md").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    for stage in ("teacher", "ghost", "export", "engine", "bench"):
        assert f"[{stage}] unchanged since the last run: skipped" in second.stdout
