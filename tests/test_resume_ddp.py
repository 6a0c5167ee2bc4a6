"""Crash and resume, and multi-process training: real CLI runs on a tiny synthetic set."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ghost_deploy.checkpoint import load_checkpoint
from ghost_deploy.data import ensure_synthetic_dataset

RECIPE = """
name: tiny
model: ghost-p
input_mode: rgb+ir
img_size: 64
seed: 3
hyp: {mosaic: 1.0}
teacher: {epochs: EPOCHS, batch_size: 4, nominal_batch: 8, optimizer: adamw, lr0: 0.002, warmup_epochs: 1}
ghost: {epochs: 1, batch_size: 4, nominal_batch: 4}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = ensure_synthetic_dataset(root=root / "synth", n_train=24, n_val=4, n_test=4, img_size=64)
    return root, data


def _recipe(root: Path, epochs: int) -> Path:
    path = root / f"tiny{epochs}.yaml"
    path.write_text(RECIPE.replace("EPOCHS", str(epochs)))
    return path


def _train(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ghost_deploy", "train", "--stage", "teacher", "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _final_model(run: Path) -> dict:
    return load_checkpoint(run / "teacher" / "train_state.safetensors").tensors


def test_killed_run_resumes_to_the_same_weights(tiny):
    root, data = tiny
    recipe = _recipe(root, 4)
    straight = root / "straight"
    done = _train(["--recipe", str(recipe), "--data", str(data), "--out", str(straight)])
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output

    killed = root / "killed"
    proc = _train(["--recipe", str(recipe), "--data", str(data), "--out", str(killed)])
    csv = killed / "teacher" / "results.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (csv.exists() and len(csv.read_text().splitlines()) >= 3):
        time.sleep(0.05)  # wait for epoch 2 to be saved, then kill inside epoch 3
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = load_checkpoint(killed / "teacher" / "train_state.safetensors").meta.get("resume")["epoch"]
    assert resumed_from < 4, "the run finished before it was killed; the test proved nothing"

    resume = _train(["--recipe", str(recipe), "--data", str(data), "--out", str(killed), "--resume"])
    output = resume.communicate(timeout=600)[0]
    assert resume.returncode == 0, output
    assert f"at epoch {resumed_from}/4" in output
    expected, actual = _final_model(straight), _final_model(killed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_two_process_ddp_ends_with_identical_weights(tiny):
    root, data = tiny
    out = root / "ddp"
    proc = _train(["--recipe", str(_recipe(root, 1)), "--data", str(data), "--out", str(out), "--nproc", "2"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    agreement = json.loads((out / "ddp.json").read_text())
    assert agreement["world_size"] == 2
    assert agreement["identical"] is True
    assert len(set(agreement["digests"])) == 1
    assert (out / "teacher" / "weights" / "best.safetensors").exists()
