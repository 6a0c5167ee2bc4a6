"""benchmarks/gpu_check.py runs the code a GPU run uses, small, on the CPU (`--device cpu --quick`)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_quick_on_the_cpu_prints_its_table_and_passes():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert out.startswith("device: CPU")
    for stage in ("teacher", "ghost"):
        for amp in ("off", "bf16"):
            assert any(line.split()[:1] == [stage] and amp in line.split() for line in out.splitlines()), out
    for check in ("integer codes device == CPU", "export of the device-trained model", "DDP"):
        assert any(line.startswith(check) and "PASS" in line for line in out.splitlines()), out


def test_gpu_check_says_plainly_when_there_is_no_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU message is not what it prints")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device here" in done.stdout
