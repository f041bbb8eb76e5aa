"""Tests for bganalysis.divergences: float64 NumPy references, limits, invariants, errors."""

import math

import numpy as np
import pytest
import torch

from bganalysis.divergences import (
    DIVERGENCES,
    ab_divergence,
    divergence,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from bganalysis.errors import UserError
from bganalysis.losses import forward_kl

INF = float("inf")

# One parameter set per divergence, covering every name in DIVERGENCES.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 1.0}),
    ("total_variation", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("ab", {"alpha": 1.0, "beta": 0.0}),
    ("ab", {"alpha": 0.5, "beta": 0.5}),
    ("ab", {"alpha": 0.0, "beta": 0.0}),
    ("ab", {"alpha": 1.5, "beta": -0.5}),
    ("ab", {"alpha": 0.2, "beta": 1.3}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}{v:g}' for k, v in params.items())}" for name, params in CASES]


def _logits(seed=0, shape=(3, 4), vocab=9, teacher_scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, vocab, generator=generator) * teacher_scale
    student = torch.randn(*shape, vocab, generator=generator)
    return teacher, student


def _probs(logits, temperature=1.0):
    """Float64 softmax in NumPy: the reference side never touches the library."""
    array = logits.detach().double().numpy() / temperature
    array = array - array.max(axis=-1, keepdims=True)
    weights = np.exp(array)
    return weights / weights.sum(axis=-1, keepdims=True)


def _kl(a, b):
    return (a * np.log(a / b)).sum(axis=-1)


def _ab_reference(p, q, alpha, beta):
    """AB-divergence in float64 from the definition and its four limit cases."""
    total = alpha + beta
    if alpha != 0 and beta != 0 and total != 0:
        terms = -(p**alpha * q**beta - alpha / total * p**total - beta / total * q**total) / (alpha * beta)
    elif alpha != 0 and beta == 0:
        terms = (alpha * p**alpha * np.log(p / q) - p**alpha + q**alpha) / alpha**2
    elif alpha == 0 and beta != 0:
        terms = (beta * q**beta * np.log(q / p) - q**beta + p**beta) / beta**2
    elif alpha != 0:
        terms = ((p / q) ** alpha - 1 - alpha * np.log(p / q)) / alpha**2
    else:
        terms = 0.5 * np.log(p / q) ** 2
    return terms.sum(axis=-1)


def _as_numpy(values):
    return values.detach().double().numpy()


# --- each divergence against a float64 formula -------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_matches_numpy(temperature):
    teacher, student = _logits(seed=1)
    p, q = _probs(teacher, temperature), _probs(student, temperature)
    got = _as_numpy(reverse_kl(teacher, student, temperature))
    np.testing.assert_allclose(got, _kl(q, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.01, 0.3, 0.5, 0.9, 0.999])
def test_jsd_matches_numpy(beta):
    teacher, student = _logits(seed=2)
    p, q = _probs(teacher), _probs(student)
    mixture = beta * p + (1 - beta) * q
    unscaled = beta * _kl(p, mixture) + (1 - beta) * _kl(q, mixture)
    got = _as_numpy(generalized_jsd(teacher, student, beta=beta))
    np.testing.assert_allclose(got, unscaled / (beta * (1 - beta)), rtol=1e-4, atol=1e-6)


def test_total_variation_matches_numpy():
    teacher, student = _logits(seed=3)
    expected = 0.5 * np.abs(_probs(teacher, 0.5) - _probs(student, 0.5)).sum(axis=-1)
    got = _as_numpy(total_variation(teacher, student, temperature=0.5))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_skew_forward_kl_matches_numpy(alpha):
    teacher, student = _logits(seed=4)
    p, q = _probs(teacher), _probs(student)
    got = _as_numpy(skew_forward_kl(teacher, student, alpha=alpha))
    np.testing.assert_allclose(got, _kl(p, alpha * p + (1 - alpha) * q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_skew_reverse_kl_matches_numpy(alpha):
    teacher, student = _logits(seed=5)
    p, q = _probs(teacher), _probs(student)
    got = _as_numpy(skew_reverse_kl(teacher, student, alpha=alpha))
    np.testing.assert_allclose(got, _kl(q, alpha * q + (1 - alpha) * p), rtol=1e-5, atol=1e-6)


AB_GENERAL = [(0.5, 0.5), (2.0, 0.3), (-0.5, 1.2), (0.3, -0.7), (1.5, 2.0), (-1.5, -0.5)]
AB_LIMITS = [(1.0, 0.0), (-0.7, 0.0), (0.0, 1.0), (0.0, 2.5), (1.0, -1.0), (-0.5, 0.5), (0.0, 0.0)]


@pytest.mark.parametrize("alpha,beta", AB_GENERAL + AB_LIMITS)
def test_ab_matches_numpy(alpha, beta):
    teacher, student = _logits(seed=6)
    expected = _ab_reference(_probs(teacher), _probs(student), alpha, beta)
    got = _as_numpy(ab_divergence(teacher, student, alpha=alpha, beta=beta))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


# --- limits and endpoints -------------------------------------------------------------------


def test_jsd_beta_zero_is_forward_kl():
    teacher, student = _logits(seed=7)
    got = _as_numpy(generalized_jsd(teacher, student, beta=0.0))
    np.testing.assert_allclose(got, _kl(_probs(teacher), _probs(student)), rtol=1e-5)
    assert (got > 0.01).all()


def test_jsd_beta_one_is_reverse_kl():
    teacher, student = _logits(seed=7)
    got = _as_numpy(generalized_jsd(teacher, student, beta=1.0))
    np.testing.assert_allclose(got, _kl(_probs(student), _probs(teacher)), rtol=1e-5)
    assert (got > 0.01).all()


@pytest.mark.parametrize("endpoint", [0.0, 1.0])
def test_jsd_continuous_at_endpoints(endpoint):
    teacher, student = _logits(seed=8)
    limit = generalized_jsd(teacher, student, beta=endpoint)
    errors = []
    for offset in (1e-2, 1e-3, 1e-4, 1e-6):
        beta = offset if endpoint == 0 else 1.0 - offset
        errors.append((generalized_jsd(teacher, student, beta=beta) - limit).abs().max().item())
    # The gap shrinks linearly in the offset, with a slope set by the smallest probabilities.
    for wider, closer in zip(errors, errors[1:]):
        assert closer < wider
    assert errors[-1] < 1e-3


def test_jsd_unscaled_below_binary_entropy():
    teacher, student = _logits(seed=9, teacher_scale=20.0)
    for beta in (0.1, 0.5, 0.8):
        unscaled = beta * (1 - beta) * generalized_jsd(teacher, student, beta=beta)
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (unscaled <= bound + 1e-6).all()


def test_skew_alpha_zero_is_plain_kl():
    teacher, student = _logits(seed=10)
    assert torch.allclose(skew_forward_kl(teacher, student, alpha=0.0), forward_kl(teacher, student), atol=1e-6)
    assert torch.allclose(skew_reverse_kl(teacher, student, alpha=0.0), reverse_kl(teacher, student), atol=1e-6)


def test_skew_alpha_one_is_zero():
    teacher, student = _logits(seed=10)
    assert (skew_forward_kl(teacher, student, alpha=1.0) == 0).all()
    assert (skew_reverse_kl(teacher, student, alpha=1.0) == 0).all()


def test_skew_bounded_when_student_rules_out_token():
    teacher = torch.tensor([3.0, 0.0, 0.0])
    student = torch.tensor([-INF, 0.0, 0.0])
    value = skew_forward_kl(teacher, student, alpha=0.1).item()
    assert math.isfinite(value)
    assert value <= math.log(1 / 0.1)


def test_ab_one_zero_is_forward_kl():
    teacher, student = _logits(seed=11, vocab=50)
    assert torch.allclose(ab_divergence(teacher, student, alpha=1.0, beta=0.0), forward_kl(teacher, student), atol=1e-6)


def test_ab_zero_one_is_reverse_kl():
    teacher, student = _logits(seed=11, vocab=50)
    assert torch.allclose(ab_divergence(teacher, student, alpha=0.0, beta=1.0), reverse_kl(teacher, student), atol=1e-6)


def test_ab_half_half_is_four_hellinger_squared():
    teacher, student = _logits(seed=12)
    p, q = _probs(teacher), _probs(student)
    hellinger_squared = 0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=-1)
    got = _as_numpy(ab_divergence(teacher, student, alpha=0.5, beta=0.5))
    np.testing.assert_allclose(got, 4 * hellinger_squared, rtol=1e-5)


# Each limit point with the direction in which (alpha, beta) approaches it.
AB_APPROACHES = [
    ((0.8, 0.0), (0.0, 1.0)),  # beta -> 0
    ((0.0, 1.2), (1.0, 0.0)),  # alpha -> 0
    ((0.7, -0.7), (1.0, 0.0)),  # alpha + beta -> 0
    ((0.0, 0.0), (0.6, 0.8)),  # both -> 0
]


@pytest.mark.parametrize("limit,direction", AB_APPROACHES)
def test_ab_continuous_near_limits(limit, direction):
    teacher, student = _logits(seed=13)
    p, q = _probs(teacher), _probs(student)
    limit_value = _ab_reference(p, q, *limit)
    errors = []
    for offset in (1e-2, 1e-3, 1e-4, 1e-6):
        alpha = limit[0] + offset * direction[0]
        beta = limit[1] + offset * direction[1]
        got = _as_numpy(ab_divergence(teacher, student, alpha=alpha, beta=beta))
        if offset >= 1e-4:  # closer in, the float64 definition itself loses digits to cancellation
            np.testing.assert_allclose(got, _ab_reference(p, q, alpha, beta), rtol=2e-5, atol=1e-6)
        errors.append(np.abs(got - limit_value).max())

    # The gap to the closed-form limit shrinks linearly with the offset, down to 1e-6.
    for wider, closer in zip(errors, errors[1:]):
        assert closer < 0.2 * wider
    assert errors[-1] < 2e-5 * np.abs(limit_value).max()


def _ab_reference_torch(teacher, student, alpha, beta):
    """The general AB formula through float64 autograd, as the gradient reference."""
    p, q = teacher.softmax(-1), student.softmax(-1)
    total = alpha + beta
    terms = -(p**alpha * q**beta - alpha / total * p**total - beta / total * q**total) / (alpha * beta)
    return terms.sum(-1)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (2.0, 0.3), (-0.5, 1.2), (1.0, 1e-4)])
def test_ab_gradient_matches_autograd(alpha, beta):
    teacher, student = _logits(seed=14)
    weights = torch.rand(3, 4, dtype=torch.float64)
    fast_teacher = teacher.double().requires_grad_(True)
    fast_student = student.double().requires_grad_(True)
    (weights * ab_divergence(fast_teacher, fast_student, alpha=alpha, beta=beta)).sum().backward()
    plain_teacher = teacher.double().requires_grad_(True)
    plain_student = student.double().requires_grad_(True)
    (weights * _ab_reference_torch(plain_teacher, plain_student, alpha, beta)).sum().backward()
    assert torch.allclose(fast_student.grad, plain_student.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(fast_teacher.grad, plain_teacher.grad, rtol=1e-4, atol=1e-6)


def test_ab_zero_teacher_probability_one_sided_value():
    # p = (0, 1/2, 1/2), q = (1/3, 1/3, 1/3): the p = 0 token contributes q^λ/(αλ).
    teacher = torch.tensor([-INF, 0.0, 0.0])
    student = torch.zeros(3)
    alpha, beta = 0.5, 0.5
    p, q = np.array([0.5, 0.5]), np.array([1 / 3, 1 / 3])
    expected = _ab_reference(p, q, alpha, beta) + (1 / 3) / (alpha * 1.0)
    assert ab_divergence(teacher, student, alpha=alpha, beta=beta).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (1.0, -1.0), (-0.5, 1.0), (0.0, 0.0)])
def test_ab_zero_teacher_probability_infinite(alpha, beta):
    teacher = torch.tensor([-INF, 0.0, 0.0])
    assert ab_divergence(teacher, torch.zeros(3), alpha=alpha, beta=beta).item() == INF


# --- invariants, for every divergence ---------------------------------------------------------


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_non_negative(name, params):
    teacher, student = _logits(seed=15, shape=(6, 5), vocab=13)
    for temperature in (0.5, 1.0, 3.0):
        assert (divergence(name, teacher, student, temperature, **params) >= 0).all()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_zero_when_equal(name, params):
    teacher, _ = _logits(seed=16)
    assert divergence(name, teacher, teacher.clone(), **params).abs().max().item() < 1e-5
    # Shifting all logits by a constant leaves the distribution unchanged.
    assert divergence(name, teacher, teacher + 3.0, **params).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_temperature_scales_logits(name, params):
    teacher, student = _logits(seed=17)
    at_temperature = divergence(name, teacher, student, 2.5, **params)
    pre_scaled = divergence(name, teacher / 2.5, student / 2.5, **params)
    assert torch.allclose(at_temperature, pre_scaled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_inf_logits_finite_gradient(name, params):
    teacher, student = _logits(seed=18, shape=(2, 3), vocab=7)
    teacher[..., :2] = -INF  # both rule out token 0; the teacher alone rules out token 1
    student[..., 0] = -INF
    student[..., 2] = -INF  # the student alone rules out token 2
    student.requires_grad_(True)
    values = divergence(name, teacher, student, **params)
    assert not values.isnan().any()
    assert (values >= 0).all()
    values.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_both_rule_out_token_is_ignored(name, params):
    teacher, student = _logits(seed=19, shape=(2,), vocab=6)
    reduced = divergence(name, teacher, student, **params)
    teacher_padded = torch.cat([teacher, torch.full((2, 1), -INF)], dim=-1)
    student_padded = torch.cat([student, torch.full((2, 1), -INF)], dim=-1).requires_grad_(True)
    padded = divergence(name, teacher_padded, student_padded, **params)
    assert torch.allclose(padded, reduced, atol=1e-6)
    padded.sum().backward()
    assert (student_padded.grad[:, -1] == 0).all()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_bf16_non_negative_float32(name, params):
    teacher, student = _logits(seed=20, shape=(8, 4), vocab=32)
    values = divergence(name, teacher.bfloat16(), student.bfloat16(), **params)
    assert values.dtype == torch.float32
    assert (values >= 0).all()
    # Nearly equal bf16 inputs stay non-negative too (within float32 rounding).
    near = divergence(name, teacher.bfloat16(), (teacher + 0.01 * student).bfloat16(), **params)
    assert (near >= -1e-6).all()


# --- the registry and its errors ----------------------------------------------------------------


def test_unknown_divergence_lists_names():
    teacher, student = _logits()
    with pytest.raises(UserError) as error:
        divergence("kl", teacher, student)
    for name in DIVERGENCES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "name,params,words",
    [
        ("jsd", {"beta": 1.5}, ["beta=1.5", "[0, 1]"]),
        ("jsd", {"beta": -0.1}, ["beta=-0.1", "[0, 1]"]),
        ("skew_forward_kl", {"alpha": 2.0}, ["alpha=2.0", "[0, 1]"]),
        ("skew_reverse_kl", {"alpha": -1.0}, ["alpha=-1.0", "[0, 1]"]),
        ("ab", {"alpha": float("nan"), "beta": 0.5}, ["alpha=nan", "finite"]),
        ("ab", {"alpha": 1.0}, ["needs beta"]),
        ("jsd", {"alpha": 0.5}, ["takes beta", "alpha"]),
        ("total_variation", {"beta": 0.5}, ["takes no parameters", "beta"]),
    ],
)
def test_bad_parameter_names_value_and_range(name, params, words):
    teacher, student = _logits()
    with pytest.raises(UserError) as error:
        divergence(name, teacher, student, **params)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_bad_temperature_rejected(temperature):
    teacher, student = _logits()
    with pytest.raises(UserError, match="temperature"):
        divergence("reverse_kl", teacher, student, temperature)


def test_shape_mismatch_points_to_align_vocab():
    teacher, student = _logits()
    with pytest.raises(ValueError, match="align_vocab"):
        divergence("reverse_kl", teacher, student[..., :5])


def test_direct_call_validates_parameter():
    teacher, student = _logits()
    with pytest.raises(UserError, match="beta=2"):
        generalized_jsd(teacher, student, beta=2.0)
