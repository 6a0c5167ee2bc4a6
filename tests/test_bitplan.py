"""The bit plan: JSON round trip, a loader that names the file and the layer, and a hand-checked cost model."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ghost_deploy
from ghost_deploy.errors import UserError
from ghost_deploy.quant import (BitPlan, check_plan_against_model, average_weight_bits, bops, format_plan_table, plan_from_bits, profile_model,
                                quantize_model, size_mb, uniform_plan)

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def tiny():
    return ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir")


@pytest.fixture(scope="module")
def mixed_plan(tiny):
    names = [n for n, m in tiny.named_modules() if isinstance(m, nn.Conv2d)]
    bits = {name: 2 + index % 7 for index, name in enumerate(names)}
    bits["model.24.m.2"] = None
    return plan_from_bits(tiny, bits, act_bits=8, image_size=128, method="hq", threshold=0.1)


def toy():
    """Two convs: 3->8 3x3 (no bias, no BN), then 8->4 1x1 with bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_json_round_trip(mixed_plan, tmp_path):
    path = tmp_path / "plan.json"
    mixed_plan.save(path)
    loaded = BitPlan.load(path)
    assert loaded == mixed_plan
    assert loaded.source == str(path)
    assert BitPlan.from_json(mixed_plan.to_json()) == mixed_plan
    assert BitPlan.from_dict(mixed_plan.to_dict()) == mixed_plan
    data = json.loads(path.read_text())
    entry = data["layers"]["model.2.cv1.conv"]
    assert set(entry) >= {"weight_bits", "act_bits", "params", "macs", "criterion", "input_tensor"}
    assert data["layers"]["model.24.m.2"]["weight_bits"] == 32  # float
    assert loaded.layers["model.2.cv1.conv"].input_bits == 8


def test_hand_edited_plan_loads(mixed_plan, tmp_path, tiny):
    data = mixed_plan.to_dict()
    data["layers"]["model.3.conv"]["weight_bits"] = 5
    data["layers"]["model.24.m.1"] = {"weight_bits": None, "act_bits": None, "params": 1, "macs": 1}
    data.pop("summary")
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    plan = BitPlan.load(path)
    check_plan_against_model(plan, tiny)
    assert plan.layers["model.3.conv"].weight_bits == 5
    assert plan.layers["model.24.m.1"].weight_is_float and plan.layers["model.24.m.1"].input_bits == 32


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"].__setitem__("model.99.conv", {"weight_bits": 8}), r"unknown layer 'model\.99\.conv'"),
    (lambda d: d["layers"]["model.5.conv"].__setitem__("weight_bits", 9), r"'model\.5\.conv'.*weight_bits 9"),
    (lambda d: d["layers"]["model.5.conv"].__setitem__("weight_bits", 1), r"'model\.5\.conv'.*weight_bits 1"),
    (lambda d: d["layers"]["model.5.conv"].__setitem__("act_bits", 12), r"'model\.5\.conv'.*act_bits 12"),
    (lambda d: d["layers"]["model.5.conv"].__setitem__("weight_bits", 4.5), r"'model\.5\.conv'.*weight_bits 4\.5"),
    (lambda d: d["layers"].pop("model.7.conv"), r"'model\.7\.conv' is missing"),
    (lambda d: d["layers"]["model.2.cv2.conv"].__setitem__("act_bits", 4), r"'model\.2\.cv2\.conv'.*same tensor 'model_1'"),
    (lambda d: d["layers"]["model.5.conv"].__setitem__("wieght_bits", 4), r"'model\.5\.conv'.*unknown key 'wieght_bits'"),
    (lambda d: [d["layers"][name].__setitem__("act_bits", 6) for name in ("model.13.cv1.conv", "model.13.cv2.conv")],
     r"'model\.13\.cv1\.conv'.*act_bits 6.*'model\.7\.conv'.*activation quantizer 'model_6'"),
])
def test_loader_rejects_bad_plans_naming_file_and_layer(mixed_plan, tmp_path, tiny, edit, message):
    data = mixed_plan.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as info:
        check_plan_against_model(BitPlan.load(path), tiny)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_loader_rejects_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="bit plan not found"):
        BitPlan.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        BitPlan.load(broken)
    broken.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a bit plan"):
        BitPlan.load(broken)


def test_profile_counts_params_and_macs_by_hand():
    profile = profile_model(toy(), [(2, 3, 16, 16)])  # MACs are per image, whatever the batch
    assert profile == {"0": (3 * 8 * 9, 16 * 16 * 8 * 3 * 9), "2": (8 * 4, 16 * 16 * 4 * 8)}


def test_size_and_bops_by_hand():
    plan = plan_from_bits(toy(), {"0": 4, "2": 8}, act_bits=8, input_shapes=[(1, 3, 16, 16)])
    plan.layers["2"].act_bits = 6  # the tensor feeding conv "2" is 6-bit; conv "0" has 4-bit weights
    assert plan.layers["0"].input_tensor == "input" and plan.layers["2"].input_tensor == "1"
    # BOPs use the bits of the tensor that really feeds each layer (6), not the previous layer's (4): B10.
    assert bops(plan) == 55296 * 4 * 8 + 8192 * 8 * 6
    assert size_mb(plan, conv_weights_only=True) == pytest.approx((216 * 4 / 8 + 32 * 8 / 8) / 1e6)
    # Deployable: codes 108 + 32 B, per-channel scales 4*(8+4), bias 4*4 (conv "2" only), 2 activation scales.
    assert size_mb(plan) == pytest.approx((108 + 32 + 4 * 12 + 16 + 2 * 4) / 1e6)
    plan.layers["2"].weight_bits = 32  # float layer: 4 bytes per weight, 32-bit weights in BOPs
    assert bops(plan) == 55296 * 4 * 8 + 8192 * 32 * 6
    assert size_mb(plan, conv_weights_only=True) == pytest.approx((108 + 32 * 4) / 1e6)
    assert average_weight_bits(plan) == {"param_weighted": 4.0, "mean": 4.0}
    plan.layers["2"].weight_bits = 8
    assert average_weight_bits(plan) == {"param_weighted": pytest.approx((216 * 4 + 32 * 8) / 248), "mean": 6.0}


def test_vedai_size_matches_the_reference_table():
    """ghost-algorithm.md 6.4: small cfg, 4 input channels, conv weights only, Detect conv FP32."""
    model = ghost_deploy.build_model("ghost-s-vedai", nc=8, input_mode="rgb+ir")
    for bits, reference_mb, rounding in [(8, 4.834, 0.0005), (6, 3.63, 0.005), (4, 2.43, 0.005)]:
        plan = uniform_plan(model, bits, 8, image_size=512, float_layers=("model.18.m.0",))
        assert size_mb(plan, conv_weights_only=True) == pytest.approx(reference_mb, abs=rounding), bits
    plan = uniform_plan(model, 8, 8, image_size=512, float_layers=("model.18.m.0",))
    # The same MACs through the reference's own BOPs formula (image 32-bit, previous conv's bits, FP head)
    # give its 1201 G; ours counts the real 8-bit input of every layer.
    layers = list(plan.layers.values())
    reference = layers[0].macs * 8 * 32 + sum(l.macs * 8 * 8 for l in layers[1:-1]) + layers[-1].macs * 32 * 32
    assert reference / 1e9 == pytest.approx(1201, abs=1)
    assert bops(plan) == sum(l.macs * l.weight_bits * 8 for l in layers)


def test_plan_drives_quantize_model_and_prints(mixed_plan):
    model = quantize_model(ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir"), mixed_plan)
    from ghost_deploy.quant import quant_layers

    layers = dict(quant_layers(model))
    for name, layer in mixed_plan.layers.items():
        expected = None if layer.weight_is_float else layer.weight_bits
        assert layers[name].weight_bits == expected, name
    table = format_plan_table(mixed_plan)
    assert "model.24.m.2" in table and " FP " in table and "BOPs" in table and "MB" in table
    assert table == mixed_plan.summary()
