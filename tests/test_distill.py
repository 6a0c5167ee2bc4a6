"""OST distance, the SCM switch and its objective, and the GQSD total (tiny tensors only)."""
from __future__ import annotations

import math

import pytest
import torch

from ghost_deploy.train.distill import (
    OpenRateLog,
    SelfTeaching,
    gqsd_loss,
    ost_distance,
    spatial_attention,
)

CHANNELS = [4, 8, 8]
SIZES = [8, 4, 2]


def make_features(batch: int, channels=CHANNELS, sizes=SIZES, requires_grad: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, s, s, generator=generator).requires_grad_(requires_grad)
        for c, s in zip(channels, sizes)
    ]


def switch_parameters(module: SelfTeaching):
    return list(module.parameters())


# --- OST distance -------------------------------------------------------------------------------


def test_ost_distance_is_zero_for_identical_features():
    features = make_features(3)
    for layer_norm in ("mean", "paper"):
        distance = ost_distance(features, [f.clone() for f in features], layer_norm=layer_norm)
        assert distance.shape == (3, len(CHANNELS))
        assert torch.allclose(distance, torch.zeros_like(distance), atol=1e-7)


def test_ost_distance_known_value_and_layer_norms():
    # Teacher attention all on pixel (0, 0), student all on (1, 1): unit vectors e_a, e_b, ||e_a - e_b||^2 = 2.
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[:, :, 0, 0] = 3.0
    student = torch.zeros(1, 2, 4, 4)
    student[:, :, 1, 1] = 0.5
    same = torch.ones(1, 2, 2, 2)
    mean = ost_distance([teacher, same], [student, same], layer_norm="mean")
    paper = ost_distance([teacher, same], [student, same], layer_norm="paper")
    assert torch.allclose(mean, torch.tensor([[2.0 / 2, 0.0]]))
    assert torch.allclose(paper, torch.tensor([[2.0 / 16, 0.0]]))


def test_spatial_attention_is_unit_norm_and_scale_free():
    feature = torch.rand(2, 5, 3, 3)
    attention = spatial_attention(feature)
    assert attention.shape == (2, 9)
    assert torch.allclose(attention.norm(dim=1), torch.ones(2))
    assert torch.allclose(spatial_attention(feature * 7.0), attention, atol=1e-6)


def test_ost_distance_rejects_mismatched_layers():
    features = make_features(2)
    with pytest.raises(ValueError, match="feature layers"):
        ost_distance(features, features[:-1])
    with pytest.raises(ValueError, match="spatial"):
        ost_distance([torch.rand(2, 4, 8, 8)], [torch.rand(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="layer_norm"):
        ost_distance(features, features, layer_norm="sum")


# --- SelfTeaching forward ---------------------------------------------------------------------------


def test_output_shapes_and_hard_gates():
    torch.manual_seed(0)
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    out = module(make_features(5, seed=1), make_features(5, seed=2), torch.rand(5), torch.rand(5))
    layers = len(CHANNELS)
    assert out.ost_loss.shape == () and out.switch_loss.shape == ()
    assert out.gates.shape == (5, layers) and out.distance.shape == (5, layers)
    assert out.open_rate_per_layer.shape == (layers,) and out.open_probability_per_layer.shape == (layers,)
    assert out.switch_target.shape == (5,)
    # Hard in the forward: exactly 0 or 1, yet differentiable (straight-through).
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert out.gates.requires_grad
    assert torch.allclose(out.open_rate_per_layer, out.gates.detach().mean(dim=0))
    expected_ost = (out.gates.detach() * out.distance).mean(dim=0).sum()
    assert torch.allclose(out.ost_loss, expected_ost)


def test_different_teacher_and_student_widths():
    module = SelfTeaching([8, 16], [4, 8], qk_dim=8)
    out = module(make_features(2, [8, 16], [4, 2]), make_features(2, [4, 8], [4, 2]))
    assert out.gates.shape == (2, 2)
    with pytest.raises(ValueError, match="channels"):
        module(make_features(2, [4, 8], [4, 2]), make_features(2, [4, 8], [4, 2]))


def test_batch_of_one_in_train_and_eval():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16)
    for training in (True, False):
        module.train(training)
        out = module(make_features(1, seed=3), make_features(1, seed=4), torch.tensor([0.2]), torch.tensor([0.5]))
        out.switch_loss.backward()
        assert out.gates.shape == (1, len(CHANNELS))
        assert torch.isfinite(out.switch_loss) and torch.isfinite(out.ost_loss)


def test_eval_gates_are_deterministic_and_follow_probability():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).eval()
    teacher, student = make_features(6, seed=5), make_features(6, seed=6)
    first, second = module(teacher, student), module(teacher, student)
    assert torch.equal(first.gates, second.gates)
    probability = module.open_probability(module.switch_logits(teacher, student))
    assert torch.equal(first.gates, (probability > 0.5).float())


def test_training_gate_opens_with_its_probability():
    # Logistic (two-Gumbel) noise: P(hard gate = 1) must equal the open probability, whatever tau is.
    torch.manual_seed(0)
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16, tau=0.3).train()
    teacher, student = make_features(1, seed=7), make_features(1, seed=8)
    probability = module.open_probability(module.switch_logits(teacher, student)).detach()
    repeated = probability.expand(20000, -1)
    frequency = module.sample_gates(repeated).detach().mean(dim=0)
    assert torch.allclose(frequency, probability[0], atol=0.015)


def test_switch_loss_is_zero_without_detection_losses_and_needs_both():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16)
    out = module(make_features(2), make_features(2, seed=1))
    assert out.switch_loss.item() == 0.0 and out.switch_target is None
    with pytest.raises(ValueError, match="both"):
        module(make_features(2), make_features(2, seed=1), torch.rand(2), None)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        module(make_features(2), make_features(2, seed=1), torch.rand(2), torch.rand(3))


def test_switch_target_is_teacher_better():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16)
    out = module(make_features(3), make_features(3, seed=1), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.5, 0.3]))
    assert out.switch_target.tolist() == [1.0, 0.0, 0.0]


def test_constructor_validation():
    with pytest.raises(ValueError, match="open_bounds"):
        SelfTeaching(CHANNELS, CHANNELS, open_bounds=(0.9, 0.1))
    with pytest.raises(ValueError, match="same non-zero"):
        SelfTeaching(CHANNELS, CHANNELS[:-1])
    with pytest.raises(ValueError, match="tau"):
        SelfTeaching(CHANNELS, CHANNELS, tau=0.0)
    with pytest.raises(ValueError, match="layer_norm"):
        SelfTeaching(CHANNELS, CHANNELS, layer_norm="sum")


# --- gradients ------------------------------------------------------------------------------------


def test_ost_gradient_reaches_open_student_layers_only_and_never_the_switch():
    torch.manual_seed(0)
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    teacher = make_features(16, requires_grad=True, seed=1)
    student = make_features(16, requires_grad=True, seed=2)
    out = module(teacher, student, torch.rand(16), torch.rand(16))
    out.ost_loss.backward()
    assert all(p.grad is None for p in switch_parameters(module)), "OST must not train the switch (s*d)"
    assert all(t.grad is None for t in teacher), "teacher features must be detached"
    gates = out.gates.detach()
    assert 0 < gates.sum() < gates.numel(), "seed should give both open and closed gates"
    for layer, feature in enumerate(student):
        per_image = feature.grad.abs().flatten(1).sum(dim=1)
        assert torch.all(per_image[gates[:, layer] == 1] > 0)
        assert torch.all(per_image[gates[:, layer] == 0] == 0)


def test_switch_objective_trains_the_switch_and_not_the_features():
    torch.manual_seed(0)
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    teacher = make_features(4, requires_grad=True, seed=1)
    student = make_features(4, requires_grad=True, seed=2)
    out = module(teacher, student, torch.tensor([0.1, 0.9, 0.1, 0.9]), torch.tensor([0.5] * 4))
    out.switch_loss.backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
    for layer in range(len(CHANNELS)):
        assert module.queries[layer][0].weight.grad.abs().sum() > 0
        assert module.keys[layer][0].weight.grad.abs().sum() > 0
    assert all(f.grad is None for f in teacher + student), "the switch objective must not shape the features"


def test_straight_through_gates_carry_soft_gradient():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    out = module(make_features(4), make_features(4, seed=1))
    out.gates.sum().backward()
    assert module.queries[0][0].weight.grad.abs().sum() > 0


def test_require_in_optimizer():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16)
    student = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="B3"):
        module.require_in_optimizer(torch.optim.SGD(student.parameters(), lr=0.1))
    module.require_in_optimizer(torch.optim.SGD([*student.parameters(), *module.parameters()], lr=0.1))


# --- the switch learns, within bounds ---------------------------------------------------------------


def pattern_batch(batch: int, outcome: str, generator: torch.Generator):
    """Random features; on 'type A' images channel 0 is raised. `outcome` says where the teacher is better."""
    type_a = torch.rand(batch, generator=generator) < 0.5
    teacher, student = [], []
    for channels, size in zip(CHANNELS, SIZES):
        feature = torch.randn(batch, channels, size, size, generator=generator)
        feature[type_a, 0] += 2.0
        teacher.append(feature)
        student.append(feature + 0.1 * torch.randn(feature.shape, generator=generator))
    student_loss = torch.full((batch,), 1.0)
    teacher_loss = {
        "pattern": torch.where(type_a, 0.5, 2.0),  # teacher better exactly on type A
        "always": torch.full((batch,), 0.5),
        "never": torch.full((batch,), 2.0),
    }[outcome]
    return teacher, student, teacher_loss, student_loss, type_a


def train_switch(outcome: str, steps: int = 100):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16, open_bounds=(0.1, 0.9)).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.require_in_optimizer(optimizer)
    log, early, probabilities = OpenRateLog(), None, []
    for step in range(steps):
        teacher, student, teacher_loss, student_loss, _ = pattern_batch(8, outcome, generator)
        out = module(teacher, student, teacher_loss, student_loss)
        optimizer.zero_grad()
        out.switch_loss.backward()
        optimizer.step()
        log.update(out.gates)
        probabilities.append(out.open_probability_per_layer)
        if step == 19:
            early = log.epoch_summary()
            log.reset()
    return module, early, log.epoch_summary(), torch.stack(probabilities), generator


def test_switch_learns_when_the_teacher_helps():
    module, _, _, probabilities, generator = train_switch("pattern")
    assert probabilities.min() >= 0.1 and probabilities.max() <= 0.9
    module.eval()
    teacher, student, teacher_loss, student_loss, type_a = pattern_batch(128, "pattern", generator)
    out = module(teacher, student, teacher_loss, student_loss)
    accuracy = (out.gates == type_a[:, None].float()).float().mean(dim=0)
    assert torch.all(accuracy > 0.9), accuracy


@pytest.mark.parametrize("outcome", ["always", "never"])
def test_open_rate_moves_but_stays_within_bounds(outcome):
    _, early, late, probabilities, _ = train_switch(outcome)
    first, last = probabilities[0], probabilities[-1]
    if outcome == "always":
        assert torch.all(last > first + 0.2) and torch.all(last > 0.8)
        assert sum(late) / len(late) > sum(early) / len(early) + 0.1
    else:
        assert torch.all(last < first - 0.2) and torch.all(last < 0.2)
        assert sum(late) / len(late) < sum(early) / len(early) - 0.1
    # Never collapses: every open probability stays inside [min_open, max_open] ...
    assert probabilities.min() >= 0.1 and probabilities.max() <= 0.9
    # ... so the realised open rate over the last 80 steps (640 images) does too, up to sampling noise.
    noise = 3 * math.sqrt(0.9 * 0.1 / 640)
    assert all(0.1 - noise <= rate <= 0.9 + noise for rate in late), late


# --- OpenRateLog and gqsd_loss -----------------------------------------------------------------------


def test_open_rate_log():
    log = OpenRateLog()
    assert log.epoch_summary() == []
    log.update(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    log.update(torch.tensor([[0.0, 0.0]]))
    assert log.epoch_summary() == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="layers"):
        log.update(torch.ones(1, 3))
    log.reset()
    assert log.epoch_summary() == []


def test_gqsd_loss_weights_and_items():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16, open_bounds=(0.5, 1.0)).train()
    out = module(make_features(4), make_features(4, seed=1), torch.rand(4), torch.rand(4))
    det = torch.tensor(1.5, requires_grad=True)
    total, items = gqsd_loss(det, out, ost_weight=10.0, switch_weight=0.5, det_weight=2.0)
    expected = 2.0 * 1.5 + 10.0 * out.ost_loss + 0.5 * out.switch_loss
    assert torch.allclose(total, expected)
    assert set(items) == {"det", "ost", "switch", "total", "open_rate"}
    assert items["det"].item() == pytest.approx(3.0) and not items["total"].requires_grad
    total.backward()
    assert det.grad.item() == pytest.approx(2.0)


def test_autocast_keeps_distillation_in_float32():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    teacher = [f.bfloat16() for f in make_features(2)]
    student = [f.bfloat16().requires_grad_() for f in make_features(2, seed=1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(teacher, student, torch.rand(2), torch.rand(2))
    assert out.ost_loss.dtype == torch.float32 and out.switch_loss.dtype == torch.float32
    (out.ost_loss + out.switch_loss).backward()
    assert torch.isfinite(out.ost_loss) and torch.isfinite(out.switch_loss)


# --- with the real detector ----------------------------------------------------------------------------


def test_with_detector_and_detection_loss_gradient_reaches_student_weights():
    from ghost_deploy.model import build_model
    from ghost_deploy.train.loss import DetectionLoss

    torch.manual_seed(0)
    teacher = build_model("ghost-n-vedai", nc=5, input_mode="rgb+ir").eval()
    student = build_model("ghost-n-vedai", nc=5, input_mode="rgb+ir").train()
    student.load_state_dict(teacher.state_dict())
    rgb, ir = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.1], [1, 3, 0.3, 0.6, 0.1, 0.1]])
    with torch.no_grad():
        teacher_heads, teacher_features = teacher.forward_features(rgb, ir)
    student_heads, student_features = student.forward_features(rgb, ir)
    assert len(student_features) == len(student.layer_channels)

    module = SelfTeaching.from_detectors(teacher, student, qk_dim=16, open_bounds=(0.9, 1.0)).train()
    optimizer = torch.optim.SGD([*student.parameters(), *module.parameters()], lr=0.01)
    module.require_in_optimizer(optimizer)
    teacher_criterion = DetectionLoss(teacher.detect, img_size=64)
    student_criterion = DetectionLoss(student.detect, img_size=64)
    with torch.no_grad():
        teacher_per_image, _ = teacher_criterion(teacher_heads, targets, per_image=True)
        student_per_image, _ = student_criterion(student_heads, targets, per_image=True)
    det_loss, _ = student_criterion(student_heads, targets)
    out = module(teacher_features, student_features, teacher_per_image, student_per_image)
    total, items = gqsd_loss(det_loss, out, ost_weight=1.0)
    total.backward()
    assert out.gates.shape == (2, len(student.layer_channels))
    assert out.switch_target.shape == (2,)
    assert out.ost_loss.item() > 0  # train-mode BN in the student differs from the eval-mode teacher
    first_conv = student.model[0].conv.weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in module.parameters())


# --- switch controls and what the logs measure ------------------------------------------------------------------


def test_switch_mode_maps_booleans_and_refuses_others():
    from ghost_deploy.train.distill import switch_mode

    assert switch_mode(True) == "learned" and switch_mode(False) == "off"
    assert [switch_mode(m) for m in ("learned", "random", "off")] == ["learned", "random", "off"]
    with pytest.raises(ValueError, match="ghost.distill.switch"):
        switch_mode("sometimes")


def test_random_gates_open_at_their_rate_and_ignore_the_images():
    from ghost_deploy.train.distill import random_gates

    distance = torch.zeros(4000, 6)
    generator = torch.Generator().manual_seed(0)
    gates = random_gates(distance, 0.3, generator)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(gates.mean()) - 0.3) < 0.02
    # the same draw whatever the distances: the gate sees nothing of the images
    again = random_gates(torch.randn(4000, 6), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(gates, again)
    with pytest.raises(ValueError, match="random_open_rate"):
        random_gates(distance, 1.5)


def test_roc_auc_known_values():
    import numpy as np

    from ghost_deploy.train.distill import roc_auc

    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5  # ties count half
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_switch_log_reports_auc_per_layer_and_base_rate():
    from ghost_deploy.train.distill import SwitchLog

    log = SwitchLog()
    assert log.epoch_summary() == {}
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # layer 0 ranks the targets perfectly, layer 1 backwards
    log.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]), target)
    summary = log.epoch_summary()
    assert summary["auc_per_layer"] == [1.0, 0.0]
    assert summary["auc"] == 0.5 and summary["base_rate"] == 0.5


def test_distill_output_carries_per_image_probability():
    module = SelfTeaching(CHANNELS, CHANNELS, qk_dim=16).train()
    out = module(make_features(3), make_features(3, seed=1), torch.rand(3), torch.rand(3))
    assert out.probability.shape == (3, len(CHANNELS))
    assert torch.allclose(out.probability.mean(dim=0), out.open_probability_per_layer)
    assert not out.probability.requires_grad


def test_gradient_ratio_log_measures_the_two_terms_once_per_epoch():
    from ghost_deploy.train.loop import GradientRatioLog

    student = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    x = torch.tensor([[1.0, 0.0, 0.0]])
    det_term = student(x).sum()          # gradient (1, 0, 0): norm 1
    ost_term = 4.0 * student(x).sum()    # gradient (4, 0, 0): norm 4
    log = GradientRatioLog()
    log.maybe_measure(student, det_term, ost_term)
    log.maybe_measure(student, det_term, 100 * ost_term)  # already measured this epoch: ignored
    assert log.take() == pytest.approx(4.0)
    assert log.take() is None
    assert student.weight.grad is None  # measuring leaves the training step's gradients alone
