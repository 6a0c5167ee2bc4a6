import pytest
import torch

import ghost_deploy


def count_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("ghost-s", 7_080_117), ("ghost-s-vedai", 4_832_871)])
def test_parameter_counts_match_the_paper(name, expected):
    # 4-channel input (RGB+IR early fusion), before BN fusion, nc=8 (ghost-algorithm.md 1.1 and 1.2).
    model = ghost_deploy.build_model(name, nc=8, input_mode="rgb+ir")
    assert count_params(model) == expected


def test_three_channel_counts():
    assert count_params(ghost_deploy.build_model("ghost-s", nc=8, input_mode="rgb")) == 7_079_829
    assert count_params(ghost_deploy.build_model("ghost-s-vedai", nc=8, input_mode="rgb")) == 4_832_583


def test_conv_and_relu_counts():
    model = ghost_deploy.build_model("ghost-s", nc=8)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 62
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 59
    small = ghost_deploy.build_model("ghost-s-vedai", nc=8)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in small.modules()) == 48


@pytest.mark.parametrize("name,strides", [("ghost-n", [4, 8, 16]), ("ghost-n-vedai", [4])])
def test_output_shapes_and_strides(name, strides):
    model = ghost_deploy.build_model(name, nc=5, input_mode="rgb+ir").eval()
    rgb, ir = torch.rand(2, 3, 64, 96), torch.rand(2, 1, 64, 96)
    heads = model(rgb, ir)
    assert model.detect.stride.tolist() == strides
    assert [tuple(h.shape) for h in heads] == [(2, 3 * 10, 64 // s, 96 // s) for s in strides]


def test_input_modes_take_named_sensors():
    assert ghost_deploy.build_model("ghost-n", nc=3, input_mode="rgb+ir").input_names == ("rgb", "ir")
    ir_model = ghost_deploy.build_model("ghost-n", nc=3, input_mode="ir")
    assert ir_model.input_names == ("ir",)
    assert ir_model.model[0].conv.in_channels == 1
    with pytest.raises(ValueError):
        ghost_deploy.build_model("ghost-n", nc=3, input_mode="rgb+ir")(torch.rand(1, 3, 64, 64))


def test_ir_changes_the_output_of_a_fused_model():
    model = ghost_deploy.build_model("ghost-n", nc=3, input_mode="rgb+ir").eval()
    rgb = torch.rand(1, 3, 64, 64)
    a = model(rgb, torch.zeros(1, 1, 64, 64))[0]
    b = model(rgb, torch.ones(1, 1, 64, 64))[0]
    assert not torch.allclose(a, b)


def test_sr_branch_is_a_separate_submodule_and_doubles_resolution():
    model = ghost_deploy.build_model("ghost-n", nc=3, input_mode="rgb+ir", sr=True)
    assert isinstance(model.sr, torch.nn.Module)
    heads, features = model.forward_features(torch.rand(1, 3, 64, 64), torch.rand(1, 1, 64, 64))
    assert model.forward_sr(features).shape == (1, 4, 128, 128)
    assert not any(k.startswith("sr.") for k in model.detector_state_dict())
    assert len(features) == 24


def test_unknown_model_is_a_user_error():
    from ghost_deploy.errors import UserError

    with pytest.raises(UserError, match="unknown model"):
        ghost_deploy.build_model("yolov99")
