"""Tests for bganalysis.weights: each λ scheme on hand-made cases, limits and errors."""

import math

import pytest
import torch

from bganalysis.errors import UserError
from bganalysis.weights import (
    REGION_BRIDGE,
    REGION_GARDEN,
    REGION_MIDDLE,
    confidence_weights,
    curriculum_weight,
    entropy_weights,
    quantile_weights,
    region_codes,
    region_weights,
    risk_delta,
    risk_penalty,
    sequence_risk_delta,
    static_weights,
)

INF = float("inf")
LOG3 = math.log(3.0)


def _values(tensor):
    return [pytest.approx(value, abs=1e-6) for value in tensor.tolist()]


# --- static ---------------------------------------------------------------------------------


def test_static_weights_fill_shape():
    weights = static_weights(0.3, torch.zeros(2, 3, dtype=torch.long))
    assert weights.shape == (2, 3)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.full((2, 3), 0.3))


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan"), True])
def test_static_weights_reject_bad_lam(lam):
    with pytest.raises(UserError, match=r"lam=.*\[0, 1\]"):
        static_weights(lam, torch.zeros(2, dtype=torch.long))


# --- confidence -------------------------------------------------------------------------------


def test_confidence_weights_by_hand():
    teacher = torch.tensor([[0.0, LOG3]] * 3)  # p = (1/4, 3/4)
    targets = torch.tensor([1, 0, -100])
    assert confidence_weights(teacher, targets).tolist() == _values(torch.tensor([0.25, 0.75, 0.0]))


def test_confidence_weights_temperature():
    teacher = torch.tensor([[0.0, 2 * LOG3]])  # at temperature 2: p = (1/4, 3/4)
    assert confidence_weights(teacher, torch.tensor([1]), temperature=2.0).item() == pytest.approx(0.25, abs=1e-6)


def test_confidence_weights_detached():
    teacher = torch.randn(2, 5, requires_grad=True)
    assert not confidence_weights(teacher, torch.tensor([0, 4])).requires_grad


def test_confidence_weights_reject_out_of_vocab_target():
    with pytest.raises(ValueError, match="token ids"):
        confidence_weights(torch.zeros(1, 4), torch.tensor([4]))


# --- entropy ----------------------------------------------------------------------------------


def _entropy_case():
    """Rows: uniform over 4 tokens, one token, two of four tokens."""
    return torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [0.0, -INF, -INF, -INF],
            [0.0, 0.0, -INF, -INF],
        ]
    )


def test_shannon_entropy_weights_by_hand():
    # H/log 4: uniform gives 1, one token 0, two tokens log 2 / log 4 = 1/2.
    assert entropy_weights(_entropy_case()).tolist() == _values(torch.tensor([1.0, 0.0, 0.5]))


def test_tsallis_order_two_by_hand():
    # (sum p² - 1)/(4^-1 - 1): uniform (1/4 - 1)/(-3/4) = 1; two tokens (1/2 - 1)/(-3/4) = 2/3.
    assert entropy_weights(_entropy_case(), tsallis_order=2.0).tolist() == _values(torch.tensor([1.0, 0.0, 2 / 3]))


def test_tsallis_order_half_by_hand():
    # (sum sqrt(p) - 1)/(4^0.5 - 1): two tokens give (2·sqrt(1/2) - 1)/1 = sqrt(2) - 1.
    weights = entropy_weights(_entropy_case(), tsallis_order=0.5)
    assert weights.tolist() == _values(torch.tensor([1.0, 0.0, math.sqrt(2.0) - 1.0]))


def test_tsallis_approaches_shannon():
    teacher = torch.randn(6, 20, generator=torch.Generator().manual_seed(0)) * 2
    shannon = entropy_weights(teacher)
    gaps = [(entropy_weights(teacher, tsallis_order=1.0 + offset) - shannon).abs().max().item() for offset in (1e-1, 1e-2, 1e-3)]
    for wider, closer in zip(gaps, gaps[1:]):
        assert closer < wider
    assert gaps[2] < 1e-3
    below = entropy_weights(teacher, tsallis_order=1.0 - 1e-4)
    assert torch.allclose(below, shannon, atol=1e-4)


def test_entropy_weights_in_unit_interval():
    teacher = torch.randn(50, 7, generator=torch.Generator().manual_seed(1)) * 5
    for order in (0.3, 1.0, 3.0):
        weights = entropy_weights(teacher, tsallis_order=order)
        assert ((weights >= 0) & (weights <= 1)).all()


@pytest.mark.parametrize("order", [0.0, -1.0, float("inf")])
def test_entropy_weights_reject_bad_order(order):
    with pytest.raises(UserError, match="tsallis_order"):
        entropy_weights(torch.zeros(1, 4), tsallis_order=order)


# --- curriculum -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step,forward,reverse",
    [(0, 0.0, 0.8), (25, 0.4, 0.4), (50, 0.8, 0.0), (90, 0.8, 0.0), (150, 0.8, 0.0)],
)
def test_curriculum_by_hand(step, forward, reverse):
    # lam_max 0.8, ramp over the first half of 100 steps.
    assert curriculum_weight(step, 100, lam_max=0.8, ramp_fraction=0.5) == pytest.approx(forward)
    assert curriculum_weight(step, 100, lam_max=0.8, ramp_fraction=0.5, reverse=True) == pytest.approx(reverse)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"step": -1}, "step"),
        ({"total_steps": 0}, "total_steps"),
        ({"lam_max": 1.2}, "lam_max"),
        ({"ramp_fraction": 0.0}, "ramp_fraction"),
        ({"ramp_fraction": 1.5}, "ramp_fraction"),
    ],
)
def test_curriculum_rejects_bad_setting(kwargs, word):
    settings = {"step": 0, "total_steps": 10, **kwargs}
    with pytest.raises(UserError, match=word):
        curriculum_weight(**settings)


# --- bridge-garden ----------------------------------------------------------------------------


def test_region_weights_by_hand():
    regions = torch.tensor([[REGION_BRIDGE, REGION_GARDEN, REGION_MIDDLE]])
    weights = region_weights(regions, lam_bridge=0.1, lam_garden=0.9, lam_middle=0.5)
    assert weights.tolist() == [_values(torch.tensor([0.1, 0.9, 0.5]))]


def test_region_codes_from_labels():
    codes = region_codes([["bridge", "", "garden"]])
    assert codes.tolist() == [[REGION_BRIDGE, REGION_MIDDLE, REGION_GARDEN]]


def test_region_codes_reject_unknown_label():
    with pytest.raises(UserError, match="'Bridge'"):
        region_codes(["Bridge"])


def test_region_weights_reject_bad_code():
    with pytest.raises(UserError, match="invalid region codes"):
        region_weights(torch.tensor([0, 3]), 0.1, 0.9, 0.5)


def test_region_weights_reject_bad_lambda():
    with pytest.raises(UserError, match=r"lam_garden=1.5.*\[0, 1\]"):
        region_weights(torch.tensor([0]), 0.1, 1.5, 0.5)


def test_quantile_weights_by_hand():
    # lam_bridge 0.2 at quantile 1 (riskiest), lam_garden 1.0 at quantile 0.
    weights = quantile_weights(torch.tensor([1.0, 0.0, 0.5, 0.25]), lam_bridge=0.2, lam_garden=1.0)
    assert weights.tolist() == _values(torch.tensor([0.2, 1.0, 0.6, 0.8]))


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1])
def test_quantile_weights_reject_bad_quantile(bad):
    with pytest.raises(UserError, match="kappa_quantile"):
        quantile_weights(torch.tensor([0.5, bad]), 0.2, 1.0)


# --- risk-guided ------------------------------------------------------------------------------


def test_risk_delta_by_hand():
    at_state = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    after = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    delta = risk_delta(at_state, after, torch.tensor([1, -100]))
    # log(3·e^0) - f(a*|s) = log 3 - 2 for the valid row; 0 for the skipped one.
    assert delta.tolist() == _values(torch.tensor([LOG3 - 2.0, 0.0]))


def test_risk_penalty_by_hand():
    delta = torch.tensor([LOG3 - 2.0, 0.0])
    # (alpha/4)·Δ² with alpha = 2.
    assert risk_penalty(delta, alpha=2.0).tolist() == _values(torch.tensor([0.5 * (LOG3 - 2.0) ** 2, 0.0]))


def test_risk_penalty_gradient_reaches_student_logits():
    at_state = torch.randn(3, 5, requires_grad=True)
    after = torch.randn(3, 5, requires_grad=True)
    penalty = risk_penalty(risk_delta(at_state, after, torch.tensor([0, 2, -100])), alpha=1.0)
    penalty.sum().backward()
    assert at_state.grad[:2].abs().sum() > 0
    assert after.grad[:2].abs().sum() > 0
    assert (at_state.grad[2] == 0).all()
    assert (after.grad[2] == 0).all()


def test_risk_penalty_rejects_negative_alpha():
    with pytest.raises(UserError, match="alpha=-1"):
        risk_penalty(torch.zeros(2), alpha=-1.0)


def _teacher_forced_batch():
    input_ids = torch.tensor([[5, 1, 3, 2, 0], [4, 4, 1, 0, 0]])
    targets = torch.tensor([[-100, 3, 2, 0, -100], [4, 1, -100, -100, -100]])
    logits = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))
    return logits, targets, input_ids


def test_sequence_risk_delta_matches_per_position():
    logits, targets, input_ids = _teacher_forced_batch()
    delta = sequence_risk_delta(logits, targets, input_ids)
    for row in range(2):
        for position in range(4):
            expected = risk_delta(logits[row, position], logits[row, position + 1], targets[row, position])
            assert delta[row, position].item() == pytest.approx(expected.item(), abs=1e-6)
    assert (delta[:, -1] == 0).all()


def test_sequence_risk_delta_rejects_argmax_targets():
    logits, targets, input_ids = _teacher_forced_batch()
    targets[0, 1] = 4  # not the next input token
    with pytest.raises(ValueError, match="next input token"):
        sequence_risk_delta(logits, targets, input_ids)


def test_sequence_risk_delta_rejects_last_position_target():
    logits, targets, input_ids = _teacher_forced_batch()
    targets[0, -1] = 1
    with pytest.raises(ValueError, match="last position"):
        sequence_risk_delta(logits, targets, input_ids)


# --- every weight scheme is detached ----------------------------------------------------------


def test_weight_schemes_carry_no_gradient():
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[0, 1, -100], [2, 3, 4]])
    quantile = torch.rand(2, 3, requires_grad=True)
    assert not confidence_weights(teacher, targets).requires_grad
    assert not entropy_weights(teacher).requires_grad
    assert not entropy_weights(teacher, tsallis_order=2.0).requires_grad
    assert not quantile_weights(quantile, 0.2, 0.9).requires_grad
    assert not region_weights(torch.zeros(2, 3, dtype=torch.long), 0.1, 0.9, 0.5).requires_grad
