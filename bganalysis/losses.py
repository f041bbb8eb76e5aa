"""Per-token distillation losses, shared by the trainer and the analysis.

Every divergence is computed in float32 from log-probabilities made with `log_softmax`
(never the log of a softmax) and reduced over the last dimension, the vocabulary.
Entries with p = 0 contribute exactly 0, so -inf logits (tokens a model rules out)
give no NaN in values or gradients. A loss can still be +inf when the teacher gives
mass to a token the student rules out, which is the true value of KL there.

Units: nats per position. Shapes: `[..., vocab]` in, `[...]` out. The other
divergences (reverse KL, JSD, total variation, skew KL, AB) are in
`bganalysis.divergences`, and the per-token soft weights in `bganalysis.weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


def align_vocab(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice teacher and student logits to one vocabulary width.

    Models often pad their output layer beyond the tokenizer (to a multiple of 64, say),
    and the padded columns are not real tokens. Pass the tokenizer length as
    `vocab_size` to keep exactly the real tokens; without it the narrower width is used.
    Returns views, not copies. Raises ValueError if either model is narrower than
    `vocab_size`.
    """
    width = min(teacher_logits.shape[-1], student_logits.shape[-1])
    if vocab_size is not None:
        if vocab_size > width:
            raise ValueError(
                f"vocab_size={vocab_size} exceeds the logits width (teacher {teacher_logits.shape[-1]}, "
                f"student {student_logits.shape[-1]}); the models cannot score every token of the tokenizer"
            )
        width = vocab_size
    return teacher_logits[..., :width], student_logits[..., :width]


def kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Return KL(p || q) = sum p (log p - log q) over the last dim, in nats.

    Inputs are normalised log-probabilities `[..., vocab]`; the result is float32 `[...]`.
    Terms with p = 0 are exactly 0, even where log q is -inf. A p that underflows to 0
    from a finite log p counts as positive: its term is +inf where log q is -inf, else 0.
    """
    teacher_logprobs = teacher_logprobs.float()
    student_logprobs = student_logprobs.float()
    support = teacher_logprobs > float("-inf")

    # Zero both operands off the teacher's support first, so that neither the value nor
    # the gradient computes -inf - (-inf).
    log_p = torch.where(support, teacher_logprobs, 0.0)
    log_q = torch.where(support, student_logprobs, 0.0)
    p = log_p.exp()
    terms = p * (log_p - log_q)
    # A teacher probability that underflows to 0 (log p below about -103 in float32) is still
    # above 0, so against a student log q of -inf its term is +inf, not 0 · inf = NaN.
    underflow = support & (p == 0)
    terms = torch.where(underflow, torch.where(log_q == float("-inf"), float("inf"), 0.0), terms)
    return torch.where(support, terms, 0.0).sum(dim=-1)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return KL(p_T || q_S) per position in nats, with both at softmax(logits / temperature).

    This is the plain divergence: it is NOT multiplied by temperature², which
    `hybrid_token_losses` does so that gradient sizes stay comparable across
    temperatures. Shapes: `[..., vocab]` in, float32 `[...]` out.
    """
    teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return kl_from_logprobs(teacher_logprobs, student_logprobs)


def hard_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return -log q(target) per position in nats (float32), and 0 where the target is -100.

    Shapes: logits `[..., vocab]`, targets `[...]` (int64), result `[...]`.
    """
    vocab = student_logits.shape[-1]
    losses = F.cross_entropy(
        student_logits.float().reshape(-1, vocab),
        targets.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    return losses.reshape(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, num_valid_tokens: int | torch.Tensor) -> torch.Tensor:
    """Return sum(values over mask) / num_valid_tokens as a float32 scalar.

    Pass the number of valid tokens of the whole optimiser step (every micro-batch and
    process), not of this batch: then summing the gradients of the micro-batches gives
    exactly the gradient of one big batch. With no valid token the result is an exact 0
    whose gradient is 0, never NaN. Masked-out entries may hold inf or NaN; they are
    selected away, not multiplied by 0.
    """
    total = torch.where(mask.bool(), values.float(), 0.0).sum()
    if isinstance(num_valid_tokens, torch.Tensor):
        return total / num_valid_tokens.clamp(min=1).to(total)
    return total / max(int(num_valid_tokens), 1)


def hybrid_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    lam: float | torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Compute the hybrid loss lam·soft + (1 - lam)·hard per token, in chunks of tokens.

    - `soft` = temperature² · KL(p_T || q_S), both at softmax(logits / temperature);
    - `hard` = -log q_S(target) at temperature 1;
    - `total` = lam·soft + (1 - lam)·hard. `lam` is the weight of the SOFT term, a float
      or a tensor shaped like `targets`, in [0, 1]; it is treated as a constant.

    Shapes: logits `[..., vocab]` (already aligned, see `align_vocab`), targets `[...]`;
    each result is float32 `[...]`. Positions whose target is -100 are skipped: all three
    losses are 0 there and get no gradient. The teacher logits get no gradient.
    `teacher_logits` may be None only when lam is the float 0, and `soft` is then 0.

    Memory: at most one chunk of `[chunk_tokens, vocab]` float32 intermediates exists at
    a time, in the forward and in the backward pass. The backward pass recomputes the
    probabilities chunk by chunk instead of saving them, whereas autograd through plain
    ops would keep every chunk's log-probabilities until backward.
    `hard_ce` and `forward_kl` are the plain reference the tests compare this with.
    """
    if teacher_logits is None and not (isinstance(lam, float | int) and lam == 0):
        raise ValueError("teacher_logits=None is only valid with lam=0 (hard loss only)")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ in shape; slice both with align_vocab first"
        )
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match the logits' leading dims {tuple(student_logits.shape[:-1])}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    lam_tensor = torch.as_tensor(lam, dtype=torch.float32, device=student_logits.device).detach()
    lam_tensor = lam_tensor.expand(targets.shape)
    soft, hard = _ChunkedHybrid.apply(student_logits, teacher_logits, targets, float(temperature), int(chunk_tokens))
    # Select instead of multiplying by 0, so that an infinite soft loss at lam = 0 (or an
    # infinite hard loss at lam = 1) leaves `total` finite.
    soft_part = torch.where(lam_tensor > 0, lam_tensor * soft, 0.0)
    hard_part = torch.where(lam_tensor < 1, (1.0 - lam_tensor) * hard, 0.0)
    total = soft_part + hard_part
    return {"soft": soft, "hard": hard, "total": total}


class _ChunkedHybrid(torch.autograd.Function):
    """Per-token soft and hard losses with a hand-written, chunked backward pass.

    Gradients with respect to the student logits z, for q = softmax(z), q_τ = softmax(z/τ)
    and p_τ = softmax(teacher/τ): d soft / dz = τ·(q_τ - p_τ) and d hard / dz = q - onehot.
    NOTE: double backward is not supported (nothing here needs it).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, temperature, chunk_tokens):
        vocab = student_logits.shape[-1]
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
        target_rows = targets.reshape(-1)
        valid_rows = (target_rows != IGNORE_INDEX).nonzero().squeeze(1)

        soft = torch.zeros(target_rows.shape, dtype=torch.float32, device=student_logits.device)
        hard = torch.zeros_like(soft)
        for rows in valid_rows.split(chunk_tokens):
            parts = _chunk_parts(student_rows, teacher_rows, target_rows, rows, temperature)
            soft[rows] = parts["soft"]
            hard[rows] = parts["hard"]

        ctx.save_for_backward(student_logits, teacher_logits, targets, valid_rows)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        return soft.reshape(targets.shape), hard.reshape(targets.shape)

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        student_logits, teacher_logits, targets, valid_rows = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        vocab = student_logits.shape[-1]
        tau = ctx.temperature
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
        target_rows = targets.reshape(-1)
        grad_soft = _rows_or_zeros(grad_soft, target_rows)
        grad_hard = _rows_or_zeros(grad_hard, target_rows)

        grad_rows = torch.zeros_like(student_rows)
        for rows in valid_rows.split(ctx.chunk_tokens):
            parts = _chunk_parts(student_rows, teacher_rows, target_rows, rows, tau, with_probs=True)
            hard_grad = parts["q"]
            hard_grad[torch.arange(rows.numel(), device=rows.device), target_rows[rows]] -= 1.0
            chunk_grad = grad_hard[rows, None] * hard_grad
            if teacher_rows is not None:
                chunk_grad += (grad_soft[rows, None] * tau) * (parts["q_tau"] - parts["p_tau"])
            grad_rows[rows] = chunk_grad.to(grad_rows.dtype)
        return grad_rows.reshape(student_logits.shape), None, None, None, None


def _rows_or_zeros(grad: torch.Tensor | None, target_rows: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros(target_rows.shape, dtype=torch.float32, device=target_rows.device)
    return grad.reshape(-1).float()


def _chunk_parts(student_rows, teacher_rows, target_rows, rows, temperature, with_probs=False) -> dict:
    """Compute the float32 losses (and, for the backward pass, probabilities) of some rows."""
    student = student_rows[rows].float()
    student_logprobs = F.log_softmax(student, dim=-1)
    targets = target_rows[rows]
    parts = {"hard": -student_logprobs.gather(-1, targets[:, None]).squeeze(-1)}
    if with_probs:
        parts["q"] = student_logprobs.exp()
    if teacher_rows is None:
        parts["soft"] = torch.zeros_like(parts["hard"])
        return parts

    teacher_logprobs_tau = F.log_softmax(teacher_rows[rows].float() / temperature, dim=-1)
    if temperature == 1.0:
        student_logprobs_tau = student_logprobs
    else:
        student_logprobs_tau = F.log_softmax(student / temperature, dim=-1)
    parts["soft"] = temperature**2 * kl_from_logprobs(teacher_logprobs_tau, student_logprobs_tau)
    if with_probs:
        parts["q_tau"] = student_logprobs_tau.exp()
        parts["p_tau"] = teacher_logprobs_tau.exp()
    return parts
