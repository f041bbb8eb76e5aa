"""Tests for bganalysis.losses: hand-computed cases, edge cases, and the chunked fast path."""

import math

import pytest
import torch

from bganalysis.losses import (
    align_vocab,
    forward_kl,
    hard_ce,
    hybrid_token_losses,
    kl_from_logprobs,
    masked_mean,
)

INF = float("inf")


def _random_case(seed=0, shape=(3, 5), vocab=11, masked=((0, 0), (2, 4))):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64).float()
    teacher = torch.randn(*shape, vocab, generator=generator) * 2
    targets = torch.randint(0, vocab, shape, generator=generator)
    for index in masked:
        targets[index] = -100
    return student, teacher, targets


def _plain_hybrid(student, teacher, targets, lam, temperature):
    """Reference: autograd through the plain per-token functions."""
    valid = targets != -100
    soft = torch.where(valid, temperature**2 * forward_kl(teacher, student, temperature), 0.0)
    hard = hard_ce(student, targets)
    return {"soft": soft, "hard": hard, "total": lam * soft + (1 - lam) * hard}


# --- hand-computed values on a 2-token vocabulary --------------------------------------


def test_forward_kl_two_token_by_hand():
    teacher = torch.tensor([0.0, 0.0])  # p = (1/2, 1/2)
    student = torch.tensor([0.0, math.log(3.0)])  # q = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert forward_kl(teacher, student).item() == pytest.approx(expected, abs=1e-6)


def test_forward_kl_temperature_by_hand():
    teacher = torch.tensor([0.0, 2 * math.log(3.0)])  # at tau=2: p = (1/4, 3/4)
    student = torch.tensor([0.0, 0.0])  # q = (1/2, 1/2) at any tau
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert forward_kl(teacher, student, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_hard_ce_two_token_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)]] * 3)  # q = (1/4, 3/4)
    targets = torch.tensor([1, 0, -100])
    losses = hard_ce(student, targets)
    assert losses[0].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert losses[1].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert losses[2].item() == 0.0


def test_hybrid_two_token_by_hand():
    teacher = torch.tensor([[0.0, 2 * math.log(3.0)]])  # at tau=2: p = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    parts = hybrid_token_losses(student, teacher, torch.tensor([0]), lam=0.25, temperature=2.0)
    assert parts["soft"].item() == pytest.approx(4 * kl, abs=1e-6)
    assert parts["hard"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert parts["total"].item() == pytest.approx(0.25 * 4 * kl + 0.75 * math.log(2.0), abs=1e-6)


# --- properties ------------------------------------------------------------------------


def test_forward_kl_zero_when_equal():
    logits = torch.randn(4, 7, 50)
    assert torch.allclose(forward_kl(logits, logits), torch.zeros(4, 7), atol=1e-6)
    # Shifting all logits by a constant leaves the distribution unchanged.
    assert torch.allclose(forward_kl(logits, logits + 3.0), torch.zeros(4, 7), atol=1e-5)


def test_forward_kl_non_negative():
    student, teacher, _ = _random_case(seed=1, vocab=30)
    for temperature in (0.5, 1.0, 3.0):
        assert (forward_kl(teacher, student, temperature) >= 0).all()


def test_kl_from_logprobs_matches_forward_kl():
    student, teacher, _ = _random_case(seed=2)
    from_logprobs = kl_from_logprobs(teacher.log_softmax(-1), student.log_softmax(-1))
    assert torch.allclose(from_logprobs, forward_kl(teacher, student), atol=1e-6)


def test_forward_kl_output_is_float32():
    teacher = torch.randn(2, 9, dtype=torch.bfloat16)
    student = torch.randn(2, 9, dtype=torch.bfloat16)
    assert forward_kl(teacher, student).dtype == torch.float32


# --- -inf logits ---------------------------------------------------------------------------


def test_kl_teacher_rules_out_token():
    teacher = torch.tensor([-INF, 0.0])  # p = (0, 1)
    student = torch.tensor([0.0, 0.0], requires_grad=True)
    kl = forward_kl(teacher, student)
    assert kl.item() == pytest.approx(math.log(2.0), abs=1e-6)
    kl.backward()
    assert torch.isfinite(student.grad).all()


def test_kl_both_rule_out_same_token():
    teacher = torch.tensor([-INF, 0.0, 1.0])
    student = torch.tensor([-INF, 0.0, 1.0], requires_grad=True)
    kl = forward_kl(teacher, student)
    assert kl.item() == 0.0
    kl.backward()
    assert torch.isfinite(student.grad).all()


def test_kl_student_rules_out_teacher_token():
    teacher = torch.tensor([0.0, 0.0])
    student = torch.tensor([-INF, 0.0], requires_grad=True)
    kl = forward_kl(teacher, student)
    assert kl.item() == INF  # the true value, not NaN
    kl.backward()
    assert torch.isfinite(student.grad).all()


def test_hybrid_inf_logits_no_nan():
    student, teacher, targets = _random_case(seed=3)
    teacher[..., :3] = -INF
    student[..., :2] = -INF
    targets[targets < 3] = 5
    student.requires_grad_(True)
    lam = torch.rand(targets.shape)
    parts = hybrid_token_losses(student, teacher, targets, lam=lam, temperature=2.0)
    for name, values in parts.items():
        assert torch.isfinite(values).all(), name
    masked_mean(parts["total"], targets != -100, int((targets != -100).sum())).backward()
    assert torch.isfinite(student.grad).all()


def test_hybrid_lam_zero_ignores_infinite_soft():
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[-INF, 0.0]], requires_grad=True)
    parts = hybrid_token_losses(student, teacher, torch.tensor([1]), lam=0.0)
    assert parts["soft"].item() == INF
    assert parts["total"].item() == 0.0
    parts["total"].sum().backward()
    assert torch.isfinite(student.grad).all()


# --- chunked fast path against the plain reference -----------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_chunked_matches_plain(chunk_tokens, temperature):
    student, teacher, targets = _random_case(seed=4)
    lam = torch.rand(targets.shape, generator=torch.Generator().manual_seed(9))
    weights = torch.randn(3, targets.shape[0], targets.shape[1])  # distinct upstream gradients per part

    results = {}
    for name, function in {
        "chunked": lambda s: hybrid_token_losses(s, teacher, targets, lam, temperature, chunk_tokens=chunk_tokens),
        "plain": lambda s: _plain_hybrid(s, teacher, targets, lam, temperature),
    }.items():
        leaf = student.clone().requires_grad_(True)
        parts = function(leaf)
        loss = sum((weights[i] * parts[key]).sum() for i, key in enumerate(("soft", "hard", "total")))
        loss.backward()
        results[name] = (parts, leaf.grad)

    chunked_parts, chunked_grad = results["chunked"]
    plain_parts, plain_grad = results["plain"]
    for key in ("soft", "hard", "total"):
        assert torch.allclose(chunked_parts[key], plain_parts[key], atol=1e-6), key
    assert torch.allclose(chunked_grad, plain_grad, atol=1e-6)


def test_hybrid_bfloat16_student():
    student, teacher, targets = _random_case(seed=5)
    leaf = student.to(torch.bfloat16).requires_grad_(True)
    parts = hybrid_token_losses(leaf, teacher.to(torch.bfloat16), targets, lam=0.5)
    assert parts["total"].dtype == torch.float32
    parts["total"].sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    plain = _plain_hybrid(leaf.detach(), teacher.to(torch.bfloat16), targets, 0.5, 1.0)
    assert torch.allclose(parts["total"], plain["total"], atol=1e-5)


def test_hybrid_lam_zero_equals_hard():
    student, teacher, targets = _random_case(seed=6)
    parts = hybrid_token_losses(student, teacher, targets, lam=0.0, temperature=2.0)
    assert torch.equal(parts["total"], hard_ce(student, targets))


def test_hybrid_lam_one_equals_soft():
    student, teacher, targets = _random_case(seed=7)
    parts = hybrid_token_losses(student, teacher, targets, lam=1.0, temperature=2.0)
    expected = torch.where(targets != -100, 4.0 * forward_kl(teacher, student, 2.0), 0.0)
    assert torch.allclose(parts["total"], expected, atol=1e-6)


def test_hybrid_without_teacher_needs_lam_zero():
    student, _, targets = _random_case(seed=8)
    parts = hybrid_token_losses(student, None, targets, lam=0.0)
    assert torch.equal(parts["total"], hard_ce(student, targets))
    with pytest.raises(ValueError, match="lam=0"):
        hybrid_token_losses(student, None, targets, lam=0.5)


def test_hybrid_rejects_unaligned_vocab():
    student, teacher, targets = _random_case(seed=8)
    with pytest.raises(ValueError, match="align_vocab"):
        hybrid_token_losses(student, teacher[..., :-1], targets, lam=0.5)


# --- masking and normalisation -------------------------------------------------------------


def test_all_masked_batch_zero_loss_zero_grad():
    student, teacher, targets = _random_case(seed=9)
    targets[:] = -100
    leaf = student.clone().requires_grad_(True)
    parts = hybrid_token_losses(leaf, teacher, targets, lam=0.5, temperature=2.0)
    loss = masked_mean(parts["total"], targets != -100, 0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_masked_mean_ignores_inf_in_masked_entries():
    values = torch.tensor([1.0, 3.0, INF, float("nan")], requires_grad=True)
    mask = torch.tensor([True, True, False, False])
    loss = masked_mean(values, mask, 2)
    assert loss.item() == 2.0
    loss.backward()
    assert torch.equal(values.grad, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_masked_mean_tensor_count():
    values = torch.tensor([1.0, 3.0])
    assert masked_mean(values, torch.ones(2, dtype=torch.bool), torch.tensor(4)).item() == 1.0
    assert masked_mean(values, torch.zeros(2, dtype=torch.bool), torch.tensor(0)).item() == 0.0


def test_grad_accumulation_matches_full_batch():
    torch.manual_seed(0)
    vocab, seq = 13, 6
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    teacher_model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    inputs = torch.randint(0, vocab, (4, seq))
    targets = torch.randint(0, vocab, (4, seq))
    targets[0, :4] = -100  # micro-batches with different numbers of valid tokens
    targets[3, :] = -100
    num_valid = int((targets != -100).sum())

    def step_loss(rows):
        with torch.no_grad():
            teacher_logits = teacher_model(inputs[rows])
        parts = hybrid_token_losses(model(inputs[rows]), teacher_logits, targets[rows], lam=0.3, temperature=2.0)
        return masked_mean(parts["total"], targets[rows] != -100, num_valid)

    step_loss(slice(0, 4)).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    step_loss(slice(0, 2)).backward()
    step_loss(slice(2, 4)).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    for full_grad, accumulated_grad in zip(full, accumulated):
        assert torch.allclose(full_grad, accumulated_grad, atol=1e-6)


# --- vocabulary alignment ---------------------------------------------------------------


def test_align_vocab_defaults_to_narrower():
    teacher, student = align_vocab(torch.zeros(2, 10), torch.zeros(2, 12))
    assert teacher.shape[-1] == 10
    assert student.shape[-1] == 10


def test_align_vocab_to_tokenizer_length():
    teacher, student = align_vocab(torch.zeros(2, 10), torch.zeros(2, 12), vocab_size=8)
    assert teacher.shape[-1] == 8
    assert student.shape[-1] == 8


def test_align_vocab_rejects_wider_tokenizer():
    with pytest.raises(ValueError, match="vocab_size=11"):
        align_vocab(torch.zeros(2, 10), torch.zeros(2, 12), vocab_size=11)
