"""HQ's k-means rule (deterministic) and the budget mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ghost_deploy
from ghost_deploy.errors import UserError
from ghost_deploy.quant import average_weight_bits, bops, budget_plan, hq_plan, kmeans_1d, size_mb
from ghost_deploy.quant.hq import hq_bits, kmeans_distortion, sorted_subsample

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def tiny(seed=0):
    torch.manual_seed(seed)
    return ghost_deploy.build_model("ghost-n", nc=5, input_mode="rgb+ir")


def test_kmeans_1d_is_exact_on_clustered_data_and_deterministic():
    rng = np.random.default_rng(1)
    levels = np.array([-0.3, -0.1, 0.05, 0.2])
    values = rng.permutation(np.repeat(levels, 250))
    centers, inertia = kmeans_1d(values, 4, seed=0)
    assert inertia == pytest.approx(0.0, abs=1e-20) and np.allclose(centers, levels)
    noisy = rng.normal(size=5000)
    first, second = kmeans_1d(noisy, 16, seed=3), kmeans_1d(noisy, 16, seed=3)
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]
    assert np.all(np.diff(first[0]) > 0)
    # The inertia is the real within-cluster squared distance of the returned centroids.
    nearest = np.abs(noisy[:, None] - first[0][None]).min(axis=1)
    assert first[1] == pytest.approx(float((nearest ** 2).sum()), rel=1e-9)
    # More clusters, less distortion; for a standard normal, K=16 Lloyd-Max MSE is about 0.0095.
    assert kmeans_distortion(noisy, 5) < kmeans_distortion(noisy, 4) < kmeans_distortion(noisy, 3)
    assert first[1] / noisy.size == pytest.approx(0.0095, rel=0.15)


def test_sorted_subsample_keeps_quantiles_and_is_order_free():
    values = np.random.default_rng(0).normal(size=300_000)
    sample = sorted_subsample(values, 1000)
    assert sample.size == 1000 and np.all(np.diff(sample) >= 0)
    assert np.array_equal(sample, sorted_subsample(values[::-1], 1000))
    assert sample[0] == values.min() and sample[-1] == values.max()


def test_hq_rule_smallest_bits_under_threshold():
    levels = torch.tensor([-0.02, -0.01, 0.0, 0.03])
    four_levels = levels[torch.arange(16 * 8 * 9) % 4].view(16, 8, 3, 3)
    assert hq_bits(four_levels)[0] == 2  # four distinct values: zero k-means error at 2 bits
    torch.manual_seed(0)
    wide = torch.randn(16, 8, 3, 3)  # D(8) ~ 1e6 * 1e-4 >> 0.1
    bits, criterion = hq_bits(wide, threshold=0.1)
    assert bits == 8 and ">=" in criterion
    narrow = torch.randn(64, 64, 3, 3) * 0.01
    bits, criterion = hq_bits(narrow, threshold=0.1)
    # Accepted at n means D(n) < T and D(n-1) >= T.
    values = sorted_subsample(narrow.numpy())
    assert kmeans_distortion(values, bits) < 0.1 <= kmeans_distortion(values, bits - 1)
    assert criterion.startswith(f"kmeans D({bits})=")
    assert hq_bits(narrow, bit_min=6)[0] >= 6 and hq_bits(wide, bit_max=6)[0] == 6


def test_hq_plan_is_deterministic_and_keeps_activations_at_8_bits():
    model = tiny()
    first = hq_plan(model, threshold=0.1, seed=0, img_size=128, max_samples=20_000)
    second = hq_plan(model, threshold=0.1, seed=0, img_size=128, max_samples=20_000)
    assert first == second and first.to_json() == second.to_json()
    assert first.method == "hq" and first.threshold == 0.1
    assert len(first.layers) == 62 and all(2 <= layer.weight_bits <= 8 for layer in first.layers.values())
    assert {layer.act_bits for layer in first.layers.values()} == {8}  # not copied from the weights (B9)
    assert len({layer.weight_bits for layer in first.layers.values()}) > 1  # a real per-layer choice
    assert all(layer.criterion.startswith("kmeans D(") for layer in first.layers.values())


@pytest.mark.parametrize("target", [{"avg_bits": 5.0}, {"size_mb": 0.8}, {"bops_g": 10.0}])
def test_budget_plan_meets_its_budget(target):
    model = tiny()
    plan = budget_plan(model, target, img_size=128)
    (kind, limit), = target.items()
    measured = {"avg_bits": average_weight_bits(plan)["param_weighted"], "size_mb": size_mb(plan),
                "bops_g": bops(plan) / 1e9}[kind]
    assert measured <= limit
    assert plan.budget == target and all(l.criterion.startswith(f"budget {kind}<=") for l in plan.layers.values())


def test_budget_stops_at_the_budget_and_follows_sensitivity():
    model = tiny()
    plan = budget_plan(model, {"avg_bits": 6.0}, img_size=128)
    params = {name: layer.params for name, layer in plan.layers.items()}
    largest_share = max(params.values()) / sum(params.values())
    assert 6.0 - largest_share < average_weight_bits(plan)["param_weighted"] <= 6.0  # greedy stops at the budget
    names = list(plan.layers)
    sensitivity = {name: 1.0 for name in names}
    protected = "model.7.conv"  # the largest layer: the cheapest to lower, unless it is very sensitive
    sensitivity[protected] = 1e12
    guided = budget_plan(model, {"avg_bits": 6.0}, sensitivity=sensitivity, img_size=128)
    assert guided.layers[protected].weight_bits == 8
    with pytest.raises(UserError, match="sensitivity has no value"):
        budget_plan(model, {"avg_bits": 6.0}, sensitivity={protected: 1.0}, img_size=128)


def test_budget_rejects_bad_targets_and_keeps_8_bits_without_pressure():
    model = tiny()
    uniform8 = budget_plan(model, {"size_mb": 1e9}, img_size=128)
    assert {layer.weight_bits for layer in uniform8.layers.values()} == {8}
    with pytest.raises(UserError, match="unreachable"):
        budget_plan(model, {"avg_bits": 1.5}, img_size=128)
    with pytest.raises(UserError, match="must be one of"):
        budget_plan(model, {"mb": 1}, img_size=128)


def test_relative_distortion_is_scale_free_and_scores_the_deployed_levels():
    """BN follows every conv, so w -> a*w changes nothing: the relative score (and the bits) must not change
    either, while the paper's raw score moves by a^2. n bits deploy 2^n - 1 levels: three values fit 2 bits."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=generator) * 0.02
    for scale in (0.01, 1.0, 100.0):
        assert hq_bits(weight * scale, threshold=0.1, distortion="relative")[0] == \
            hq_bits(weight, threshold=0.1, distortion="relative")[0]
    assert hq_bits(weight * 100.0, threshold=0.1)[0] > hq_bits(weight, threshold=0.1)[0]  # raw: scale decides
    three_levels = torch.tensor([-1.0, 0.0, 1.0]).repeat(100)
    four_levels = torch.tensor([-1.5, -0.5, 0.5, 1.5]).repeat(100)
    assert kmeans_distortion(three_levels.numpy(), 2, distortion="relative") == 0.0
    assert kmeans_distortion(four_levels.numpy(), 2, distortion="relative") > 0.0  # raw K=4 would call it exact
    assert kmeans_distortion(four_levels.numpy(), 2, distortion="raw") == 0.0
    with pytest.raises(UserError, match="ghost.plan.distortion"):
        hq_bits(weight, distortion="mse")


def test_relative_threshold_means_the_same_on_every_model():
    """The paper's T = 0.1 gives the same bits on every config (raw: 6.4 on ghost-s-vedai, 7.4 on ghost-p)."""
    torch.manual_seed(0)
    from ghost_deploy.model import build_model

    bits = {name: average_weight_bits(hq_plan(build_model(name, nc=3, input_mode="rgb+ir"), threshold=0.1,
                                              img_size=64, distortion="relative", max_samples=20_000))["param_weighted"]
            for name in ("ghost-p", "ghost-n")}
    assert abs(bits["ghost-p"] - bits["ghost-n"]) < 0.25
