"""The hybrid loss fused with the output layer: no `[tokens, vocab]` logits tensor ever exists.

`fused_hybrid_loss` takes the student's final hidden states and its lm_head weight
instead of its logits. For one chunk of response tokens at a time it computes the
logits, the soft and hard losses, and their gradients with respect to the hidden states
and the weight, then drops the chunk. The loss is the scalar that training
back-propagates, masked_mean(λ·soft + (1 - λ)·hard) over `num_valid_tokens`, so the
gradients are computed in the forward pass and scaled by the incoming gradient in the
backward pass. The output layer's matmul therefore runs once forward and twice for the
gradients, as with unfused logits, and is never recomputed.

Alternative: recompute each chunk's logits in the backward pass, which allows any
downstream use of the per-token losses but costs one more output-layer matmul per step.

Memory: one chunk of `[chunk_tokens, vocab]` float32 intermediates, plus a float32
gradient of the weight and of the hidden states. Only forward KL (the soft loss of
`losses.hybrid_token_losses`) is supported. `losses.hybrid_token_losses` on the unfused
logits is the reference the tests compare this with.
"""

from __future__ import annotations

import torch

from bganalysis.losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX


def fused_hybrid_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    lam: float | torch.Tensor,
    num_valid_tokens: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the hybrid loss from hidden states `[..., hidden]` and the lm_head weight `[vocab', hidden]`.

    Returns `loss`, the float32 scalar sum of λ·soft + (1 - λ)·hard over valid tokens divided
    by `num_valid_tokens`, with gradients to `hidden_states` and `lm_head_weight`. Pass the
    valid tokens of the whole optimiser step, as to `losses.masked_mean`. Also returns
    `soft`, `hard` and `total` per token `[...]` without gradient, for logging. The terms are
    those of `losses.hybrid_token_losses`. `vocab_size` cuts padded weight rows and teacher
    columns; `teacher_logits` `[..., vocab]` may be None only when lam is the float 0.
    The output layer must have no bias (true of Llama, Qwen2, Mistral and SmolLM2).
    NOTE: double backward is not supported.
    """
    if vocab_size is not None:
        lm_head_weight = lm_head_weight[:vocab_size]
        teacher_logits = None if teacher_logits is None else teacher_logits[..., :vocab_size]
    if teacher_logits is None and not (isinstance(lam, float | int) and lam == 0):
        raise ValueError("teacher_logits=None is only valid with lam=0 (hard loss only)")
    shape = targets.shape
    if hidden_states.shape[:-1] != shape or hidden_states.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(f"hidden states {tuple(hidden_states.shape)} must be targets {tuple(shape)} + "
                         f"(hidden,) with hidden = {lm_head_weight.shape[-1]}, the lm_head weight's width")
    if teacher_logits is not None and teacher_logits.shape != (*shape, lm_head_weight.shape[0]):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be {(*shape, lm_head_weight.shape[0])}; "
                         "pass vocab_size to cut both to the tokenizer length")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    lam_rows = torch.as_tensor(lam, dtype=torch.float32, device=hidden_states.device).detach().expand(shape).reshape(-1)
    teacher_rows = None if teacher_logits is None else teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    scale = 1.0 / max(int(num_valid_tokens), 1)
    loss, soft, hard, total = _FusedHybrid.apply(hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head_weight,
                                                 teacher_rows, targets.reshape(-1), lam_rows, scale, float(temperature),
                                                 int(chunk_tokens))
    return {"loss": loss, "soft": soft.reshape(shape), "hard": hard.reshape(shape), "total": total.reshape(shape)}


class _FusedHybrid(torch.autograd.Function):
    """Loss and gradients of the fused output layer and hybrid loss, computed chunk by chunk in the forward pass.

    With z = h·Wᵀ, d loss / dz = scale·(c_soft·τ·(q_τ - p_τ) + c_hard·(q - onehot)), where
    c_soft and c_hard are λ and 1 - λ, each set to 0 where its weight is 0 so that an
    infinite unweighted term adds nothing. Then d/dh = (d/dz)·W and d/dW = (d/dz)ᵀ·h.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_rows, target_rows, lam_rows, scale, temperature, chunk_tokens):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        soft = torch.zeros(target_rows.shape, dtype=torch.float32, device=hidden.device)
        hard = torch.zeros_like(soft)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None

        valid_rows = (target_rows != IGNORE_INDEX).nonzero().squeeze(1)
        for rows in valid_rows.split(chunk_tokens):
            chunk_hidden = hidden[rows]
            chunk_teacher = None if teacher_rows is None else teacher_rows[rows]
            weights = _term_weights(lam_rows[rows], scale, temperature)
            soft[rows], hard[rows], grad_logits = _chunk_losses(chunk_hidden @ weight.T, chunk_teacher, target_rows[rows],
                                                                temperature, weights if needs_grad else None)
            if needs_grad:
                grad_hidden[rows] = grad_logits @ weight.float()
                grad_weight.addmm_(grad_logits.T, chunk_hidden.float())
            del grad_logits

        soft_part = torch.where(lam_rows > 0, lam_rows * soft, 0.0)
        hard_part = torch.where(lam_rows < 1, (1.0 - lam_rows) * hard, 0.0)
        total = soft_part + hard_part
        loss = torch.where(target_rows != IGNORE_INDEX, total, 0.0).sum() * scale

        ctx.grads = (grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(soft, hard, total)
        return loss, soft, hard, total

    @staticmethod
    def backward(ctx, grad_loss, grad_soft, grad_hard, grad_total):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:  # scaled in place: a copy of the weight's gradient would add to the peak
            grad_hidden = grad_hidden.mul_(grad_loss).to(ctx.dtypes[0])
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _term_weights(lam: torch.Tensor, scale: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-row factors `[rows, 1]` of d soft / dz (with τ) and d hard / dz in the loss gradient."""
    soft_weight = (torch.where(lam > 0, lam, 0.0) * (scale * temperature))[:, None]
    hard_weight = (torch.where(lam < 1, 1.0 - lam, 0.0) * scale)[:, None]
    return soft_weight, hard_weight


def _chunk_losses(logits, teacher, targets, temperature, weights):
    """Return soft `[rows]`, hard `[rows]` and, when `weights` is given, d loss / d logits `[rows, vocab]`.

    The same terms as `losses.hybrid_token_losses`, written with in-place steps so that at
    most about three `[rows, vocab]` float32 tensors exist at once at temperature 1 (four
    otherwise); the plain functions keep about a dozen.
    """
    logits = logits.float()
    student_logprobs = torch.log_softmax(logits, dim=-1)
    hard = -student_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if temperature == 1.0:
        del logits
        student_logprobs_tau = student_logprobs
    else:
        student_logprobs_tau = torch.log_softmax(logits.div_(temperature), dim=-1)
        del logits

    soft = torch.zeros_like(hard)
    teacher_probs = None
    if teacher is not None:
        terms = torch.log_softmax(teacher.float() / temperature, dim=-1)
        teacher_probs = terms.exp()
        # p·(log p - log q), and exactly 0 where p = 0 (where the difference may be NaN or inf).
        terms.sub_(student_logprobs_tau).mul_(teacher_probs).masked_fill_(teacher_probs == 0, 0.0)
        soft = temperature**2 * terms.sum(dim=-1)
        del terms
    if weights is None:
        return soft, hard, None

    soft_weight, hard_weight = weights
    if teacher_probs is not None:  # becomes c_soft·τ·(q_τ - p_τ) in place
        teacher_probs.sub_(student_logprobs_tau.exp()).mul_(-soft_weight)
    del student_logprobs_tau
    grad = student_logprobs.exp_()  # q, in the buffer of the log-probabilities
    grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    grad.mul_(hard_weight)
    if teacher_probs is not None:
        grad.add_(teacher_probs)
    return soft, hard, grad
