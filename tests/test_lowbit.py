"""The low-bit study's pieces: HQ asked for a budget, the summary over seeds, paired differences, and the
teacher fine-tune control starting from the teacher's weights (tiny models only; the study itself is a benchmark)."""
from __future__ import annotations

import pytest

from ghost_deploy.bitplan import average_weight_bits
from ghost_deploy.model import build_model
from ghost_deploy.train.lowbit import format_summary, hq_plan_for_bits, paired, summarise


def test_hq_for_a_budget_meets_it_with_the_smallest_threshold():
    model = build_model("ghost-p", nc=3, input_mode="rgb+ir")
    plan = hq_plan_for_bits(model, 3.0, 64, 2, 4)
    bits = average_weight_bits(plan)["param_weighted"]
    assert bits <= 3.0
    assert {layer.weight_bits for layer in plan.layers.values()} <= {2, 3, 4}
    threshold = plan.layers[next(iter(plan.layers))].criterion  # the plan records HQ's rule per layer
    assert "kmeans" in threshold
    with pytest.raises(ValueError, match="no HQ threshold"):
        hq_plan_for_bits(model, 1.5, 64, 2, 4)  # below bit_min everywhere: unreachable


def _score(name, seed, map50):
    return {"name": name, "seed": seed, "avg_weight_bits": 2.7, "map50": map50, "map50_95": map50 / 2,
            "val_map50": map50, "size_mb": 0.1}


def test_summary_pairs_rows_by_seed():
    scores = [_score("qat", 0, 0.60), _score("qat", 1, 0.70), _score("ghost", 1, 0.75), _score("ghost", 0, 0.62),
              _score("teacher", 0, 0.9), _score("teacher", 1, 0.9)]
    summary = summarise(scores)
    names = [row["name"] for row in summary["rows"]]
    assert names == ["qat", "ghost", "teacher"]
    ghost = summary["rows"][1]
    assert ghost["seeds"] == [0, 1] and ghost["map50"] == [0.62, 0.75]  # sorted by seed
    mean, std, count = paired(summary, "ghost", "qat")
    assert count == 2 and mean == pytest.approx(0.035) and std == pytest.approx(0.0212132, rel=1e-4)
    table = format_summary(summary)
    assert "| ghost | 2.70 | 0.6850 +- 0.0919 | 76.1% |" in table


def test_teacher_finetune_starts_from_the_teacher(tmp_path):
    from ghost_deploy.checkpoint import model_from_checkpoint
    from ghost_deploy.errors import UserError
    from ghost_deploy.export.sample import make_sample
    from ghost_deploy.train.loop import train_teacher

    sample = tmp_path / "t.safetensors"
    make_sample("ghost-p", sample, img_size=64, bits="fp32", nc=5)
    recipe = __import__("ghost_deploy.recipe", fromlist=["load_recipe"]).load_recipe("demo")
    recipe = {**recipe, "model": "ghost-p", "img_size": 64, "teacher": {**recipe["teacher"], "epochs": 1, "lr0": 1e-12,
                                                                         "warmup_epochs": 0}}
    from ghost_deploy.data.synth import ensure_synthetic_dataset

    data = str(ensure_synthetic_dataset(root=tmp_path / "d", n_train=4, n_val=2, n_test=1, img_size=64))
    run = train_teacher(recipe, tmp_path / "ft", data=data, progress=False, init_from=sample, log=lambda *_: None)
    start = model_from_checkpoint(sample, with_sr=False)[0].detector_state_dict()
    after = model_from_checkpoint(run["best"], with_sr=False)[0].detector_state_dict()
    conv = next(key for key in start if key.endswith("conv.weight"))
    # lr ~0 and one epoch: the weights are the teacher's (up to the EMA of identical weights)
    assert (after[conv] - start[conv]).abs().max() < 1e-5
    wrong = tmp_path / "n.safetensors"
    make_sample("ghost-p", wrong, img_size=64, bits="fp32", nc=3)
    with pytest.raises(UserError, match="does not fit"):
        train_teacher(recipe, tmp_path / "ft2", data=data, progress=False, init_from=wrong, log=lambda *_: None)
