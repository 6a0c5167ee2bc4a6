"""Quantizers deploy exactly: integer grids, STE gradients, one shared quantizer per tensor, exact BN folding."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghost_deploy
from ghost_deploy.errors import UserError
from ghost_deploy.model.blocks import Bottleneck
from ghost_deploy.quant import (ActQuantizer, QuantConv2d, WeightQuantizer, act_quantizers, calibrate_activations,
                                fold_bn, quant_layers, quantize_model, uniform_plan)
from ghost_deploy.quant.quantizers import qrange

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def images(batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator), torch.rand(batch, 1, size, size, generator=generator)


@pytest.fixture(scope="module")
def tiny_plan():
    model = ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir")
    return uniform_plan(model, weight_bits=4, act_bits=8, image_size=64)


def quantized_tiny(plan, calibrate=True):
    torch.manual_seed(0)
    model = ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir")
    return quantize_model(model, plan, calib_batches=[images()] if calibrate else None)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weights_lie_exactly_on_their_grid(bits):
    torch.manual_seed(bits)
    weight = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    quantizer = WeightQuantizer(16, bits)
    quantizer.init_scale(weight)
    codes = quantizer.codes(weight)
    qmin, qmax = qrange(bits)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax == 2 ** (bits - 1) - 1
    expected = codes.float() * quantizer.scale.detach().view(-1, 1, 1, 1)
    for mode in (True, False):
        quantizer.train(mode)
        assert torch.equal(quantizer(weight), expected)
    # More than half the grid is used: the MSE scale is not degenerate.
    assert codes.unique().numel() > (qmax - qmin + 1) // 2


def test_weight_scale_init_mse_beats_max_at_low_bits():
    torch.manual_seed(0)
    weight = torch.randn(8, 64, 3, 3)
    errors = {}
    for method in ("mse", "max"):
        quantizer = WeightQuantizer(8, 3)
        quantizer.init_scale(weight, method)
        errors[method] = float((quantizer(weight) - weight).detach().pow(2).mean())
    assert errors["mse"] < errors["max"]


def test_ste_gradients_reach_weights_scales_and_input():
    torch.manual_seed(0)
    conv = QuantConv2d(nn.Conv2d(4, 6, 3, padding=1), weight_bits=4, act_bits=8)
    conv.input_quantizer.scale.data.fill_(0.01)
    x = torch.rand(2, 4, 8, 8, requires_grad=True)
    conv(x).pow(2).sum().backward()
    for name, grad in [("weight", conv.weight.grad), ("bias", conv.bias.grad), ("x", x.grad),
                       ("weight scale", conv.weight_quantizer.scale.grad), ("input scale", conv.input_quantizer.scale.grad)]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_activation_quantizer_train_and_eval_paths_agree_and_stay_on_grid():
    torch.manual_seed(0)
    quantizer = ActQuantizer(8)
    quantizer.scale.data.fill_(0.0173)
    x = torch.randn(4, 3, 16, 16).relu() * 3
    quantizer.train()
    trained = quantizer(x)
    quantizer.eval()
    evaluated = quantizer(x)  # torch.fake_quantize_per_tensor_affine: what a traced export emits
    assert torch.equal(trained, evaluated)
    codes = evaluated / quantizer.scale.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().max() == 127 and codes.round().min() >= -128
    with pytest.raises(ValueError):
        ActQuantizer(8, unsigned=True)


def test_calibration_observes_then_sets_the_scale():
    quantizer = ActQuantizer(8)
    x = torch.linspace(0, 5, 10001)
    quantizer.observing = True
    assert quantizer(x) is x  # observing passes the input through
    quantizer.finish_observation("max")
    assert quantizer.scale.item() == pytest.approx(5 / 127)
    quantizer.observing = True
    quantizer(x)
    quantizer.finish_observation("mse")
    assert 0.5 * 5 / 127 < quantizer.scale.item() <= 5 / 127 * 1.0001
    assert not quantizer.observing


def test_every_conv_is_quantized_including_stem_and_detect(tiny_plan):
    model = quantized_tiny(tiny_plan)
    layers = dict(quant_layers(model))
    assert list(layers) == list(tiny_plan.layers)
    assert len(layers) == 62 and all(q.weight_bits == 4 and q.act_bits == 8 for q in layers.values())
    assert layers["model.0.conv"].input_quantizer is model.act_quantizers["input"]
    assert all(f"model.24.m.{i}" in layers for i in range(3))
    stem = layers["model.0.conv"]
    assert stem.weight_codes().dtype == torch.int8 and stem.weight_scale().shape == (stem.out_channels,)
    assert stem.input_scale().ndim == 0
    # Calibrated: the fused RGB+IR image in [0, 1] clips near 1.
    assert 0.5 / 127 < stem.input_scale().item() <= 1.0 / 127 * 1.0001


def test_readers_of_one_tensor_share_one_quantizer_saved_once(tiny_plan, tmp_path):
    model = quantized_tiny(tiny_plan)
    layers = dict(quant_layers(model))
    shared = layers["model.2.cv1.conv"].input_quantizer
    assert shared is layers["model.2.cv2.conv"].input_quantizer is model.act_quantizers["model_1"]
    # The P/4 neck output feeds both the Detect conv and the next stride-2 conv.
    assert layers["model.24.m.0"].input_quantizer is layers["model.18.conv"].input_quantizer
    assert layers["model.24.m.0"].input_quantizer is model.act_quantizers["model_17"]
    state = model.state_dict()
    scale_keys = [k for k in state if k.endswith(".scale") and "weight_quantizer" not in k]
    assert scale_keys == [f"act_quantizers.{name}.scale" for name in model.act_quantizers]
    assert len({id(q) for q in act_quantizers(model).values()}) == len(model.act_quantizers)
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "q.safetensors")  # fails on shared tensors
    assert torch.equal(load_file(tmp_path / "q.safetensors")["act_quantizers.model_1.scale"], shared.scale.detach())


def test_a_neck_concat_and_its_inputs_share_one_scale(tiny_plan):
    model = quantized_tiny(tiny_plan)
    layers = dict(quant_layers(model))
    # model_4 feeds model.5 and the Concat of layer 16 (read by model.17), whose other input comes from
    # model_14, which is also concatenated into layer 19 (read by model.20): one scale for all of them.
    assert tiny_plan.layers["model.17.cv1.conv"].input_tensor == "model_16"
    for name in ("model.5.conv", "model.17.cv1.conv", "model.17.cv2.conv", "model.20.cv1.conv"):
        assert tiny_plan.layers[name].act_quantizer == "model_4"
        assert layers[name].input_quantizer is model.act_quantizers["model_4"]
    for name in ("model.7.conv", "model.13.cv1.conv", "model.23.cv2.conv"):
        assert layers[name].input_quantizer is model.act_quantizers["model_6"]
    assert "model_12" not in model.act_quantizers and "model_16" not in model.act_quantizers
    # so quantizing the Concat is quantizing its inputs: model.4's output has one exact quantizer
    model.eval()
    features = model.forward_features(*images())[1]
    quantizer = model.act_quantizers["model_4"]
    concat = torch.cat([features[15], features[4]], dim=1)
    assert torch.equal(quantizer(concat), torch.cat([quantizer(features[15]), quantizer(features[4])], dim=1))


def test_plans_without_scale_groups_keep_one_quantizer_per_tensor(tiny_plan):
    """Checkpoints written before scale groups load as they were trained: one scale per tensor."""
    from ghost_deploy.quant import BitPlan

    data = tiny_plan.to_dict()
    for entry in data["layers"].values():
        del entry["act_quantizer"]
    old_plan = BitPlan.from_dict(data)
    torch.manual_seed(0)
    model = quantize_model(ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir"), old_plan)
    assert {"model_4", "model_16", "model_19", "model_6", "model_12", "model_22"} <= set(model.act_quantizers)
    layers = dict(quant_layers(model))
    assert layers["model.17.cv1.conv"].input_quantizer is model.act_quantizers["model_16"]
    assert layers["model.5.conv"].input_quantizer is not layers["model.17.cv1.conv"].input_quantizer


def test_readers_of_one_tensor_cannot_be_split_across_quantizers(tiny_plan):
    from ghost_deploy.quant import BitPlan

    data = tiny_plan.to_dict()
    data["layers"]["model.2.cv2.conv"]["act_quantizer"] = "elsewhere"
    with pytest.raises(UserError, match=r"'model\.2\.cv2\.conv'.*act_quantizer 'elsewhere'.*same tensor 'model_1'"):
        BitPlan.from_dict(data)


def test_copies_keep_sharing_inside_the_copy(tiny_plan):
    model = quantized_tiny(tiny_plan, calibrate=False)
    clone = copy.deepcopy(model)
    layers = dict(quant_layers(clone))
    assert layers["model.2.cv1.conv"].input_quantizer is clone.act_quantizers["model_1"]
    assert clone.act_quantizers["model_1"] is not model.act_quantizers["model_1"]
    x = images()
    model.eval(), clone.eval()
    assert all(torch.equal(a, b) for a, b in zip(model(*x), clone(*x)))


def test_residual_add_reads_the_same_quantized_tensor_as_cv1(tiny_plan):
    model = quantized_tiny(tiny_plan).eval()
    block = model.model[2].m[0]
    assert isinstance(block, Bottleneck) and block.add
    quantizer = model.act_quantizers["model_2_cv1"]
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0])),  # runs after the quantizing hook
        block.cv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("cv1_in", a[0])),
        block.cv2.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out)),
        block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)),
    ]
    with torch.no_grad():
        model(*images())
    for hook in hooks:
        hook.remove()
    codes = seen["cv1_in"] / quantizer.scale.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # cv1 reads a tensor on the quantizer's grid
    assert seen["raw"] is seen["cv1_in"]
    assert torch.equal(seen["out"], seen["cv1_in"] + seen["y"])  # ... and the skip adds that same tensor
    assert not block.cv1.conv.quantizes_input  # quantized once, by the block


def test_float_plan_entries_stay_float(tiny_plan):
    plan = copy.deepcopy(tiny_plan)
    plan.layers["model.24.m.2"].weight_bits = 32
    plan.layers["model.24.m.2"].act_bits = 32
    plan.layers["model.24.m.1"].weight_bits = 32
    model = quantized_tiny(plan, calibrate=False)
    assert type(model.model[24].m[2]) is nn.Conv2d
    head = model.model[24].m[1]
    assert isinstance(head, QuantConv2d) and head.weight_bits is None and head.act_bits == 8
    with pytest.raises(ValueError):
        head.weight_codes()


def test_plan_must_match_the_model(tiny_plan):
    plan = copy.deepcopy(tiny_plan)
    plan.source = "plan.json"
    del plan.layers["model.3.conv"]
    with pytest.raises(UserError, match=r"plan.json.*model\.3\.conv.*missing"):
        quantized_tiny(plan, calibrate=False)
    plan = copy.deepcopy(tiny_plan)
    plan.layers["model.2.cv2.conv"].act_bits = 6  # shares its input with model.2.cv1.conv (8 bits)
    with pytest.raises(UserError, match="model_1"):
        quantized_tiny(plan, calibrate=False)


def randomise_bn(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            module.weight.data.copy_(torch.randn(n, generator=generator))  # about half negative gammas
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)


def test_bn_folding_is_exact_and_keeps_codes(tiny_plan):
    model = quantized_tiny(tiny_plan, calibrate=False)
    randomise_bn(model)
    calibrate_activations(model, [images()])
    model.eval()
    before = {name: (q.weight_codes(), q.weight_scale()) for name, q in quant_layers(model)}
    folded = fold_bn(model)
    assert all(isinstance(m.bn, nn.Identity) for m in folded.modules() if hasattr(m, "bn"))
    assert any(isinstance(m.bn, nn.BatchNorm2d) for m in model.modules() if hasattr(m, "bn"))  # original untouched
    negated = 0
    for name, qconv in quant_layers(folded):
        codes, scale = before[name]
        parent = model.get_submodule(name.rpartition(".")[0])
        bn = getattr(parent, "bn", None)
        if bn is None:  # Detect convs have no BN
            assert torch.equal(qconv.weight_codes(), codes)
            continue
        sign = torch.where(bn.weight.detach() < 0, -1, 1).to(torch.int8).view(-1, 1, 1, 1)
        assert torch.equal(qconv.weight_codes(), codes * sign), name
        assert torch.all(qconv.weight_scale() > 0)
        negated += int((sign < 0).sum())
    assert negated > 0
    # Per block, on the same input: the folded quantized conv equals quantized conv + BN, to float rounding.
    from ghost_deploy.model.blocks import Conv

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv)]
    for name, block in blocks:
        x = torch.rand(2, block.conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            expected = block.bn(block.conv(x))
            got = folded.get_submodule(name).conv(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), name
    # Whole network: rounding-level differences flip an occasional activation code (1 LSB), which then
    # propagates; the outputs still agree closely on average.
    with torch.no_grad():
        for a, b in zip(model(*images(seed=1)), folded(*images(seed=1))):
            assert (a - b).abs().mean() < 0.01 * a.abs().mean()


def test_float_bn_folding_matches():
    torch.manual_seed(0)
    model = ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir")
    randomise_bn(model, seed=3)
    model.eval()
    folded = fold_bn(model)
    x = images()
    with torch.no_grad():
        for a, b in zip(model(*x), folded(*x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert folded.model[0].conv.bias is not None


def test_eval_activation_quantizers_trace_to_one_qdq_pair_per_tensor(tiny_plan, tmp_path):
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort

    model = quantized_tiny(tiny_plan).eval()
    x = images()
    path = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), opset_version=13, dynamo=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # One QuantizeLinear per quantized tensor: shared readers (C3, Bottleneck skip, Detect + stride-2 conv) reuse it;
    # the tensors of one scale group (a neck Concat and its inputs) each get their own pair, on one quantizer.
    tensors = {layer.input_tensor for layer in tiny_plan.layers.values() if layer.act_bits != 32}
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == len(tensors) > len(model.act_quantizers)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), x)})
    with torch.no_grad():
        expected = model(*x)
    for got, want in zip(outputs, expected):
        assert np.allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
