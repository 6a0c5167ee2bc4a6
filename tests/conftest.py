"""Shared test fixtures."""
import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs: on a shared 2-core machine OpenMP's spinning threads fight
    other processes, and a 10 s module takes a minute."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_image_pairs(folder, count=2, seed=0, height=64, width=64, digits=4):
    """Random RGB + IR pairs in VEDAI naming (`<id>_co.png`, `<id>_ir.png`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        stem = f"{index:0{digits}d}"
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / f"{stem}_co.png")
        Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8)).save(folder / f"{stem}_ir.png")
    return folder


@pytest.fixture(scope="session")
def write_image_pairs():
    return _write_image_pairs
