"""The fused output-layer hybrid loss against the unfused `hybrid_token_losses` on logits."""

import pytest
import torch

from bganalysis.fused_loss import fused_hybrid_loss
from bganalysis.losses import hybrid_token_losses, masked_mean

BATCH, SEQ, HIDDEN, VOCAB, PADDED = 2, 7, 8, 19, 24


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(PADDED, HIDDEN, generator=generator)
    teacher = 2.0 * torch.randn(BATCH, SEQ, PADDED, generator=generator)
    teacher[0, 1, 3] = float("-inf")
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets[0, :2] = -100
    targets[1, -1] = -100
    lam = torch.rand(BATCH, SEQ, generator=generator)
    lam[0, 3], lam[1, 0] = 0.0, 1.0
    return hidden, weight, teacher, targets, lam


def unfused(hidden, weight, teacher, targets, lam, temperature, total_tokens):
    logits = hidden @ weight[:VOCAB].T
    teacher = None if teacher is None else teacher[..., :VOCAB]
    parts = hybrid_token_losses(logits, teacher, targets, lam, temperature, chunk_tokens=3)
    return masked_mean(parts["total"], targets != -100, total_tokens), parts


def fused(hidden, weight, teacher, targets, lam, temperature, total_tokens):
    parts = fused_hybrid_loss(hidden, weight, teacher, targets, lam, total_tokens, temperature, chunk_tokens=3,
                              vocab_size=VOCAB)
    return parts["loss"], parts


def loss_and_grads(function, inputs, lam, temperature, total_tokens=20, teacher=True):
    hidden, weight, teacher_logits, targets, _ = inputs
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss, parts = function(hidden, weight, teacher_logits if teacher else None, targets, lam, temperature, total_tokens)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss, parts, grad_hidden, grad_weight


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_matches_unfused(inputs, temperature):
    lam = inputs[4]
    reference = loss_and_grads(unfused, inputs, lam, temperature)
    result = loss_and_grads(fused, inputs, lam, temperature)
    torch.testing.assert_close(result[0], reference[0])
    for key in ("soft", "hard", "total"):
        torch.testing.assert_close(result[1][key], reference[1][key].detach())
    torch.testing.assert_close(result[2], reference[2])
    torch.testing.assert_close(result[3], reference[3])
    assert float(result[3][VOCAB:].abs().sum()) == 0.0  # padded rows get no gradient


def test_fused_hard_only_without_teacher(inputs):
    reference = loss_and_grads(unfused, inputs, 0.0, 1.0, teacher=False)
    result = loss_and_grads(fused, inputs, 0.0, 1.0, teacher=False)
    torch.testing.assert_close(result[0], reference[0])
    torch.testing.assert_close(result[2], reference[2])
    torch.testing.assert_close(result[3], reference[3])


def test_fused_all_masked_is_zero(inputs):
    hidden, weight, teacher, targets, lam = inputs
    masked = (hidden, weight, teacher, torch.full_like(targets, -100), lam)
    loss, _, grad_hidden, grad_weight = loss_and_grads(fused, masked, lam, 1.0, total_tokens=0)
    assert float(loss.detach()) == 0.0
    assert float(grad_hidden.abs().sum()) == 0.0
    assert float(grad_weight.abs().sum()) == 0.0


def test_fused_without_grad_gives_losses(inputs):
    hidden, weight, teacher, targets, lam = inputs
    with torch.no_grad():
        parts = fused_hybrid_loss(hidden, weight, teacher, targets, lam, 20, vocab_size=VOCAB)
    reference, _ = unfused(hidden, weight, teacher, targets, lam, 1.0, 20)
    torch.testing.assert_close(parts["loss"], reference)


def test_fused_rejects_missing_teacher(inputs):
    hidden, weight, _, targets, lam = inputs
    with pytest.raises(ValueError, match="only valid with lam=0"):
        fused_hybrid_loss(hidden, weight, None, targets, lam, 20)


def test_fused_bfloat16_close_to_float32(inputs):
    hidden, weight, teacher, targets, lam = inputs
    half = fused_hybrid_loss(hidden.bfloat16(), weight.bfloat16(), teacher.bfloat16(), targets, lam, 20, vocab_size=VOCAB)
    full = fused_hybrid_loss(hidden, weight, teacher, targets, lam, 20, vocab_size=VOCAB)
    assert bool((half["soft"] >= 0).all())
    torch.testing.assert_close(half["loss"], full["loss"], rtol=0.05, atol=0.05)
