"""Size and BOPs in three conventions (ghost_deploy.bench.conventions, docs/size-bops.md).

Reference numbers are from ghost-algorithm.md §6.4 (the research notes' re-count of the reference's formula).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import ghost_deploy
from ghost_deploy.bench.conventions import (
    all_conventions,
    corrected,
    deployable,
    head_names,
    reference_as_coded,
    reference_convs,
)
from ghost_deploy.bitplan import FLOAT_BITS, bops, size_mb
from ghost_deploy.quant.plans import model_sites, plan_from_bits

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("size_bops", ROOT / "benchmarks" / "size_bops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def three_head():
    model = ghost_deploy.build_model("ghost-s", nc=8, input_mode="rgb")
    return model, model_sites(model, 512)


@pytest.fixture(scope="module")
def vedai():
    model = ghost_deploy.build_model("ghost-s-vedai", nc=8, input_mode="rgb+ir")
    return model, model_sites(model, 512)


def _plan(model_and_sites, bits, size=512):
    model, sites = model_and_sites
    return plan_from_bits(model, bits, 8, image_size=size, sites=sites)


def test_as_coded_reproduces_the_research_table(three_head, vedai):
    """The 3-head all-8-bit ceiling is the abstract's '< 9.7 MB'; the 1-head rows match §6.4."""
    cost = reference_as_coded(_plan(three_head, 8))
    assert cost.size_mb == pytest.approx(9.667, abs=5e-4) and cost.bops_g == pytest.approx(2100.9, abs=0.05)
    cost = reference_as_coded(_plan(three_head, None))  # all float: 32-bit everywhere
    assert cost.size_mb == pytest.approx(30.74, abs=5e-3) and cost.bops_g == pytest.approx(21344, abs=0.5)
    for bits, size, giga in [(8, 4.834, 1201), (6, 3.63, 727), (4, 2.43, 383)]:
        cost = reference_as_coded(_plan(vedai, bits))
        assert cost.size_mb == pytest.approx(size, abs=5e-3) and cost.bops_g == pytest.approx(giga, abs=0.5), bits


def test_b10_double_counts_the_last_bottleneck_and_drops_two_detect_convs(three_head):
    plan = _plan(three_head, 8)
    convs, n = reference_convs(plan)
    assert n == 59 and [c.name for c in convs[57:59]] == ["model.23.m.0.cv1.conv", "model.23.m.0.cv2.conv"]
    assert head_names(plan) == ["model.24.m.0", "model.24.m.1", "model.24.m.2"]
    as_coded, fixed = reference_as_coded(plan), corrected(plan)
    assert fixed.size_mb == pytest.approx(7.17, abs=5e-3)  # "7.17 MB counted right"
    # The size gap is exactly: layer 23's two bottleneck convs again at 4 B/weight, minus Detect m.1 and m.2.
    gap = 4 * (convs[57].params + convs[58].params) - 4 * (convs[60].params + convs[61].params)
    assert (as_coded.size_mb - fixed.size_mb) * 1e6 == pytest.approx(gap)
    # The research table's "head indexing fixed" 1476.7 G still charges Detect 32 x 32; corrected gives
    # Detect's input its producer's 8 bits (the paper's convention): 32 * (32 - 8) less per Detect MAC.
    head_macs = sum(c.macs for c in convs[n:])
    assert fixed.bops_g + head_macs * 32 * (32 - 8) / 1e9 == pytest.approx(1476.7, abs=0.05)


def test_corrected_never_exceeds_as_coded(three_head, vedai):
    for model in (three_head, vedai):
        for bits in (8, 6, 4, 2):
            plan = _plan(model, bits)
            as_coded, fixed = reference_as_coded(plan), corrected(plan)
            assert fixed.size_mb <= as_coded.size_mb + 1e-12 and fixed.bops_g < as_coded.bops_g, bits
    # One head: the float set is right, so only the head's input bits differ; the size is the same.
    assert corrected(_plan(vedai, 8)).size_mb == reference_as_coded(_plan(vedai, 8)).size_mb


def test_four_bit_halves_the_weight_part(three_head, vedai):
    for model in (three_head, vedai):
        eight, four = _plan(model, 8), _plan(model, 4)
        convs, n = reference_convs(eight)
        head_bytes = 4 * sum(c.params for c in convs[n:])  # float Detect convs, the same in both
        ratio = (corrected(four).size_mb * 1e6 - head_bytes) / (corrected(eight).size_mb * 1e6 - head_bytes)
        assert ratio == pytest.approx(0.5)
        # Deployable: scales and biases are float32 at any width, so 4-bit is a little over half.
        assert 0.5 < deployable(four).size_mb / deployable(eight).size_mb < 0.53


def test_deployable_is_the_projects_count_with_8_bit_inputs(vedai):
    plan = _plan(vedai, 4)
    cost = deployable(plan)
    assert cost.size_mb == size_mb(plan) and cost.bops_g == bops(plan) / 1e9
    # Every conv (Detect included) at 4-bit weights reading an 8-bit tensor (the image too).
    assert cost.bops_g == pytest.approx(sum(layer.macs for layer in plan.layers.values()) * 4 * 8 / 1e9)
    assert all(c.weight_bits == (FLOAT_BITS if c.name.startswith("model.18.") else 4) for c in reference_convs(plan)[0])


def test_bops_scale_with_pixels_size_does_not(vedai):
    model, _ = vedai
    small, large = _plan(vedai, 8), plan_from_bits(model, 8, 8, image_size=1024, sites=model_sites(model, 1024))
    for key, cost in all_conventions(small).items():
        other = all_conventions(large)[key]
        assert other.size_mb == cost.size_mb and other.bops_g == pytest.approx(4 * cost.bops_g), key


def test_corrected_needs_input_bits_for_a_mixed_plan(vedai):
    plan = _plan(vedai, 8)
    plan.layers["model.1.conv"].weight_bits = 4
    with pytest.raises(ValueError, match="mixed plan"):
        corrected(plan)
    bits = {name: 8 for name in plan.layers}
    bits["model.2.cv1.conv"] = bits["model.2.cv2.conv"] = 4  # both read model.1's 4-bit output
    uniform = corrected(_plan(vedai, 8))
    layer1, layer2 = plan.layers["model.1.conv"], plan.layers["model.2.cv1.conv"]
    cv2 = plan.layers["model.2.cv2.conv"]
    expected = uniform.bops_g - (layer1.macs * (8 * 8 - 4 * 8) + (layer2.macs + cv2.macs) * 8 * (8 - 4)) / 1e9
    assert corrected(plan, input_bits=bits).bops_g == pytest.approx(expected)
    with pytest.raises(ValueError, match="no entry"):
        corrected(plan, input_bits={})


def test_2158_g_lies_between_the_dota_and_dior_ceilings():
    """docs/size-bops.md: '< 2158 G' is above the ceiling for up to DOTA's 15 classes, below DIOR's 20."""
    script = _load_script()
    ceilings = {row["nc"]: row for row in script.ceiling_rows({"DOTA": 15, "DIOR": 20})}
    assert ceilings[15]["bops_g"] == pytest.approx(2146.3, abs=0.05) and ceilings[15]["below_bops_bound"]
    assert ceilings[20]["bops_g"] == pytest.approx(2178.8, abs=0.05) and not ceilings[20]["below_bops_bound"]
    assert all(row["below_size_bound"] for row in ceilings.values())  # '< 9.7 MB' holds for every class count


def test_committed_result_matches_the_code(vedai):
    """docs/results/size-bops.json is what the script computes now (the VEDAI rows at 512 px)."""
    result = json.loads((ROOT / "docs" / "results" / "size-bops.json").read_text(encoding="utf-8"))
    assert result["format"] == "ghost-deploy/size-bops" and result["paper"]["size_mb_bound"] == 9.7
    rows = {(r["model"], r["image_size"], r["weight_bits"]): r for r in result["rows"]}
    assert {(m, s, b) for m in ("ghost-s", "ghost-s-vedai") for s in (512, 1024) for b in (8, 4)} <= set(rows)
    for bits in (8, 4):
        fresh = all_conventions(_plan(vedai, bits))
        for key, cost in fresh.items():
            assert rows[("ghost-s-vedai", 512, bits)][key] == cost.to_dict(), (bits, key)
