import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import ghost_deploy
from ghost_deploy.checkpoint import load_checkpoint, load_model_state, read_meta, save_checkpoint
from ghost_deploy.errors import UserError

META = {"model": "ghost-n", "nc": 3, "names": ["a", "b", "c"], "input_mode": "rgb+ir", "img_size": 64}


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = ghost_deploy.build_model("ghost-n", nc=3)
    path = save_checkpoint(tmp_path / "m.safetensors", model, META)
    ckpt = load_checkpoint(path)
    assert read_meta(path).names == ["a", "b", "c"]
    clone = ghost_deploy.build_model("ghost-n", nc=3)
    load_model_state(clone, ckpt.model_state, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, clone.state_dict()[key])
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_missing_and_extra_tensors_are_one_line_errors(tmp_path):
    model = ghost_deploy.build_model("ghost-n", nc=3)
    path = save_checkpoint(tmp_path / "m.safetensors", model, META)
    other = ghost_deploy.build_model("ghost-n-vedai", nc=3)
    with pytest.raises(UserError, match="does not match the model") as info:
        load_model_state(other, load_checkpoint(path).model_state, path)
    assert "\n" not in str(info.value) and "m.safetensors" in str(info.value)


def test_non_finite_values_are_refused(tmp_path):
    model = ghost_deploy.build_model("ghost-n", nc=3)
    with torch.no_grad():
        model.model[0].conv.weight[0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "m.safetensors", model, META)
    with pytest.raises(UserError, match="non-finite"):
        load_checkpoint(path)


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="no ghost-deploy metadata"):
        load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="corrupt.safetensors"):
        load_checkpoint(corrupt)
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "legacy.pt"
    with open(planted, "wb") as handle:
        pickle.dump({"model": _Exploit(marker)}, handle)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(planted)
    assert not marker.exists()
