"""PTQ baseline: FP32 checkpoint + calibration manifest -> a quantized checkpoint that exports and passes parity."""
import copy
import math

import numpy as np
import pytest
import torch

from ghost_deploy.data.calib import calib_batches, load_calib_set, make_calib_set
from ghost_deploy.quant.coverage import range_coverage
from ghost_deploy.checkpoint import read_meta, save_checkpoint
from ghost_deploy.data import ensure_synthetic_dataset, load_dataset_yaml
from ghost_deploy.data.dataset import Dataset
from ghost_deploy.errors import UserError
from ghost_deploy.model import build_model
from ghost_deploy.quant.ptq import calibrate, entropy_threshold, ptq_checkpoint
from ghost_deploy.quant import act_quantizers, plan_from_bits, quant_layers
from ghost_deploy.quant.quantizers import qrange
from ghost_deploy.quant.trace import conv_names
from ghost_deploy.recipe import DEFAULTS
from ghost_deploy.checkpoint import model_from_checkpoint
from ghost_deploy.train.loop import checkpoint_meta, make_loader

IMG = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptq")
    data_yaml = ensure_synthetic_dataset(root=root / "data", n_train=8, n_val=4, n_test=4, img_size=IMG)
    spec = load_dataset_yaml(data_yaml)
    torch.manual_seed(0)
    model = build_model("ghost-n", nc=spec.nc, input_mode="rgb+ir").eval()
    recipe = {**DEFAULTS, "model": "ghost-n", "img_size": IMG, "data": str(data_yaml),
              "parity": {**DEFAULTS["parity"], "images": 4}}
    teacher = save_checkpoint(root / "teacher.safetensors", model,
                              checkpoint_meta(recipe, spec, "teacher", str(data_yaml), model))
    manifest = make_calib_set(data_yaml, 4, name="tiny", out_dir=root / "calib")
    ptq = ptq_checkpoint(teacher, root / "ptq.safetensors", manifest, act_calibrator="entropy", weight_method="mse")
    loaded = model_from_checkpoint(ptq)
    return {"root": root, "data": data_yaml, "spec": spec, "teacher": teacher, "manifest": manifest, "ptq": ptq,
            "loaded": loaded}


def test_ptq_checkpoint_loads_with_codes_on_the_grid(setup):
    model, meta = setup["loaded"]
    assert meta.stage == "ptq"
    calib_set = load_calib_set(setup["manifest"])
    assert meta.get("ptq")["calib_set"]["sha256"] == calib_set.sha256 and meta.get("ptq")["calib_set"]["name"] == "tiny"
    assert meta.get("ptq")["act_calibrator"] == "entropy" and meta.get("ptq")["weight_method"] == "mse"
    assert meta.get("teacher")["path"] == str(setup["teacher"])
    layers = quant_layers(model)
    assert len(layers) == len(meta.bit_plan.layers) and {q.weight_bits for _, q in layers} == {8}
    for _, qconv in layers:
        codes = qconv.weight_codes()
        low, high = qrange(qconv.weight_bits)
        assert int(codes.min()) >= low and int(codes.max()) <= high
        deployed = codes.float() * qconv.weight_scale().view(-1, 1, 1, 1)
        torch.testing.assert_close(qconv.quantized_weight().detach(), deployed, rtol=0, atol=0)
    scales = [float(q.scale.detach()) for q in act_quantizers(model).values()]
    assert all(math.isfinite(s) and s > 0 for s in scales)
    assert len(set(scales)) > len(scales) // 2  # calibrated per tensor, not left at the 1/127 default


def test_each_calibrator_gives_positive_finite_scales_within_max(setup):
    model = copy.deepcopy(setup["loaded"][0])  # every calibrator overwrites all the scales
    batches = calib_batches(load_calib_set(setup["manifest"]), IMG, 2, model.input_names)
    scales = {method: calibrate(model, batches, method) for method in ("max", "percentile", "mse", "entropy")}
    for method, values in scales.items():
        assert values and all(math.isfinite(v) and v > 0 for v in values.values()), method
    for tensor, max_scale in scales["max"].items():
        for method in ("percentile", "mse", "entropy"):
            assert scales[method][tensor] <= max_scale * (1 + 1e-6), (method, tensor)
    assert any(scales["entropy"][t] < 0.99 * scales["max"][t] for t in scales["max"])  # it does clip somewhere


def _reference_entropy(histogram, top, levels):
    """The calibrator written as the plain per-candidate loop (TensorRT's algorithm as usually described)."""
    hist = np.array(histogram, dtype=float)
    hist[0] = hist[1]
    bins, best = len(hist), (math.inf, len(hist))
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        group = np.minimum((np.arange(i) * levels) // i, levels - 1)
        nonzero = hist[:i] > 0
        totals = np.bincount(group, weights=hist[:i], minlength=levels)
        filled = np.bincount(group, weights=nonzero.astype(float), minlength=levels)
        q = np.where(nonzero, np.divide(totals, filled, out=np.zeros(levels), where=filled > 0)[group], 0.0)
        if q.sum() <= 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        q = np.where(mask & (q <= 0), 1e-12, q)
        divergence = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if divergence < best[0]:
            best = (divergence, i)
    return best[1] * top / bins


@pytest.mark.parametrize("seed", range(6))
def test_entropy_threshold_matches_the_plain_loop(seed):
    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_t(2 + seed, 4000))
    values[: 400 * seed] = 0.0  # a spike of exact zeros
    bins = 256
    histogram, _ = np.histogram(values, bins=bins, range=(0, values.max()))
    if seed % 2:
        histogram[rng.integers(0, bins, 40)] = 0  # empty bins, including near the clip candidates
    threshold = entropy_threshold(histogram, float(values.max()), 16)
    assert threshold == pytest.approx(_reference_entropy(histogram, float(values.max()), 16), rel=1e-12)
    assert 0 < threshold <= values.max()


def test_ptq_at_a_mixed_plan_from_json_or_checkpoint(setup, tmp_path):
    model, _ = model_from_checkpoint(setup["teacher"], with_sr=False)
    names = conv_names(model)
    bits = {name: 4 + index % 5 for index, name in enumerate(names)}
    bits[names[-1]] = None  # a float head layer
    plan = plan_from_bits(model, bits, act_bits=8, image_size=IMG, method="edited")
    plan.save(tmp_path / "plan.json")
    from_json = ptq_checkpoint(setup["teacher"], tmp_path / "a.safetensors", setup["manifest"],
                               plan=tmp_path / "plan.json", weight_method="max", act_calibrator="max")
    # A quantized checkpoint's plan (as a GHOST run would give it) is read from its meta.
    from_ckpt = ptq_checkpoint(setup["teacher"], tmp_path / "b.safetensors", setup["manifest"], plan=from_json)
    for path in (from_json, from_ckpt):
        layers = read_meta(path).bit_plan.layers
        assert {name: layers[name].weight_bits for name in names} == {n: b or 32 for n, b in bits.items()}
    quantized, _ = model_from_checkpoint(from_ckpt)
    assert dict((n, q.weight_bits) for n, q in quant_layers(quantized)) == bits  # float weights, INT8 input


def test_ptq_refuses_bad_input(setup, tmp_path):
    with pytest.raises(UserError, match="already quantized"):
        ptq_checkpoint(setup["ptq"], tmp_path / "x.safetensors", setup["manifest"])
    with pytest.raises(UserError, match="calibrator"):
        ptq_checkpoint(setup["teacher"], tmp_path / "x.safetensors", setup["manifest"], act_calibrator="kl")
    with pytest.raises(UserError, match="no bit plan"):
        ptq_checkpoint(setup["teacher"], tmp_path / "x.safetensors", setup["manifest"], plan=setup["teacher"])
    assert not (tmp_path / "x.safetensors").exists()


def test_coverage_of_the_quantized_model(setup):
    model = setup["loaded"][0]
    scales = {name: float(q.scale.detach()) for name, q in act_quantizers(model).items()}
    split = make_loader(Dataset(setup["spec"], "train", IMG), 4, False, 0)
    coverage = range_coverage(model, load_calib_set(setup["manifest"]), split, img_size=IMG)
    assert set(coverage) == set(act_quantizers(model))
    assert all(0 < value <= 1 for value in coverage.values())
    assert all(not q.observing for q in act_quantizers(model).values())
    assert scales == {name: float(q.scale.detach()) for name, q in act_quantizers(model).items()}  # untouched


def test_ptq_checkpoint_exports_and_passes_the_parity_gate(setup):
    from ghost_deploy.export import export_onnx

    result = export_onnx(setup["ptq"], setup["root"] / "ptq.onnx", progress=False)
    assert result.passed and result.onnx_path.name == "ptq.onnx" and result.parity.passed
    assert all(row["status"] == "bits preserved" for row in result.layers)
