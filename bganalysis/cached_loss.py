"""Per-token hybrid losses against a cached teacher top-k (see `bganalysis.teacher_cache`).

The cache keeps, per response position, the teacher's k most likely tokens with their
log-probabilities at the loss temperature, and one tail bucket with the rest of the
mass. The soft loss compares two distributions over the same k + 1 outcomes:

- the teacher's: the k cached log-probabilities and the cached log tail mass;
- the student's: its log-probabilities at those k ids, at the same temperature, and
  log(1 - their sum), computed as a logsumexp over the other tokens.

Any divergence of `bganalysis.divergences` then applies to these (k + 1)-vectors. What
is approximated: the distribution inside the tail. Merging outcomes never increases an
f-divergence (the data-processing inequality), so for forward KL, reverse KL, JSD, total
variation and the skew KLs the cached soft loss is a lower bound of the online one, with
equality when k is the vocabulary size (the tail is then empty on both sides). The
AB-divergence has no such bound in general. The hard loss reads the student's full
distribution and is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bganalysis import divergences
from bganalysis.losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, _rows_or_zeros

NEG_INF = float("-inf")


def cached_token_losses(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    targets: torch.Tensor,
    lam: float | torch.Tensor,
    divergence: str = "forward_kl",
    params: dict | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Compute lam·soft + (1 - lam)·hard per token against the cached teacher, in chunks of tokens.

    Same contract as `losses.hybrid_token_losses` and `train_loss.divergence_token_losses`:
    `soft` = temperature² · D(teacher || student) on the k + 1 outcomes, `hard` = -log q(target)
    at temperature 1, `total` = lam·soft + (1 - lam)·hard with lam the soft weight (a float or a
    tensor shaped like `targets`, no gradient). Positions whose target is -100 give 0 and no gradient.

    Shapes: student logits `[batch, seq, vocab']`, `topk_ids` and `topk_logprobs` `[batch, seq, k]`,
    `tail_logprob` and `targets` `[batch, seq]`; results float32 `[batch, seq]`. `vocab_size`
    (the tokenizer length, `TeacherCache.vocab_size`) cuts padded output columns off the student;
    leave it None when the logits are already cut. `temperature` must be the cache's
    loss_temperature: the cached log-probabilities are already at it, so it is applied to the
    student only.

    Memory: one chunk of `[chunk_tokens, vocab]` float32 intermediates at a time, and one
    logits-sized gradient. The backward pass recomputes each chunk under autograd.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    _check_shapes(student_logits, topk_ids, topk_logprobs, tail_logprob, targets, chunk_tokens)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    divergences.divergence(divergence, torch.zeros(1, 2), torch.zeros(1, 2), 1.0, **(params or {}))  # validate name and params

    lam_tensor = torch.as_tensor(lam, dtype=torch.float32, device=student_logits.device).detach().expand(targets.shape)
    teacher = {"ids": topk_ids.long(), "logprobs": topk_logprobs.float(), "tail": tail_logprob.float()}
    soft, hard = _CachedChunks.apply(student_logits, teacher, targets, divergence, params or {}, float(temperature),
                                     int(chunk_tokens))
    # Select instead of multiplying by 0, so that an infinite part with zero weight leaves `total` finite.
    total = torch.where(lam_tensor > 0, lam_tensor * soft, 0.0) + torch.where(lam_tensor < 1, (1.0 - lam_tensor) * hard, 0.0)
    return {"soft": soft, "hard": hard, "total": total}


def dense_teacher_logits(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
                         vocab_size: int, loss_temperature: float) -> torch.Tensor:
    """Return stand-in teacher logits `[..., vocab_size]` rebuilt from the cache, for λ schemes and argmax labels.

    The tail mass is spread evenly over the tokens outside the top k, and the
    log-probabilities are multiplied by the loss temperature, so that softmax(logits /
    loss_temperature) is the cached distribution and softmax(logits) equals the teacher at
    temperature 1 on the top k up to the shape of the tail. With k = vocab_size the result
    differs from the teacher's logits by a constant per position, which no softmax sees.
    Statistics read from it (entropy, confidence in a label outside the top k) treat the
    tail as uniform; p_max is exact for k >= 1 and the top-1/top-2 margin for k >= 2.
    """
    k = topk_ids.shape[-1]
    if k < vocab_size:
        fill = tail_logprob.float() - math.log(vocab_size - k)
    else:
        fill = torch.full_like(tail_logprob, NEG_INF, dtype=torch.float32)
    dense = fill.unsqueeze(-1).expand(*fill.shape, vocab_size).clone()
    dense.scatter_(-1, topk_ids.long(), topk_logprobs.float())
    return dense * loss_temperature


def _check_shapes(student_logits, topk_ids, topk_logprobs, tail_logprob, targets, chunk_tokens) -> None:
    if targets.shape != student_logits.shape[:-1] or tail_logprob.shape != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and tail_logprob {tuple(tail_logprob.shape)} must match "
                         f"the logits' leading dims {tuple(student_logits.shape[:-1])}")
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != targets.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
                         f"must both be {tuple(targets.shape)} + (k,)")
    if topk_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"k={topk_ids.shape[-1]} exceeds the student's vocabulary of {student_logits.shape[-1]}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


class _CachedChunks(torch.autograd.Function):
    """Soft and hard losses per token; the backward pass recomputes one chunk of tokens at a time under autograd.

    Plain autograd over the chunks would keep every chunk's float32 intermediates until
    backward, and the backward of each chunk's row gather would write a logits-sized
    gradient. Here each chunk's gradient is written into one preallocated tensor.
    NOTE: double backward is not supported.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher, targets, name, params, temperature, chunk_tokens):
        vocab = student_logits.shape[-1]
        student_rows = student_logits.reshape(-1, vocab)
        target_rows = targets.reshape(-1)
        teacher_rows = _teacher_rows(teacher)
        valid_rows = (target_rows != IGNORE_INDEX).nonzero().squeeze(1)

        soft = torch.zeros(target_rows.shape, dtype=torch.float32, device=student_logits.device)
        hard = torch.zeros_like(soft)
        for rows in valid_rows.split(chunk_tokens):
            soft[rows], hard[rows] = _chunk_losses(student_rows[rows], teacher_rows, rows, target_rows[rows], name, params,
                                                   temperature)

        ctx.save_for_backward(student_logits, targets, valid_rows)
        ctx.teacher_rows, ctx.settings = teacher_rows, (name, params, temperature, chunk_tokens)
        return soft.reshape(targets.shape), hard.reshape(targets.shape)

    @staticmethod
    def backward(ctx, grad_soft, grad_hard):
        student_logits, targets, valid_rows = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        name, params, temperature, chunk_tokens = ctx.settings
        vocab = student_logits.shape[-1]
        student_rows = student_logits.reshape(-1, vocab)
        target_rows = targets.reshape(-1)
        grad_soft = _rows_or_zeros(grad_soft, target_rows)
        grad_hard = _rows_or_zeros(grad_hard, target_rows)

        grad_rows = torch.zeros_like(student_rows)
        for rows in valid_rows.split(chunk_tokens):
            with torch.enable_grad():
                chunk = student_rows[rows].detach().requires_grad_(True)
                soft, hard = _chunk_losses(chunk, ctx.teacher_rows, rows, target_rows[rows], name, params, temperature)
                (chunk_grad,) = torch.autograd.grad((soft, hard), chunk, (grad_soft[rows], grad_hard[rows]))
            grad_rows[rows] = chunk_grad.to(grad_rows.dtype)
        return grad_rows.reshape(student_logits.shape), None, None, None, None, None, None


def _teacher_rows(teacher: dict) -> dict:
    k = teacher["ids"].shape[-1]
    return {"ids": teacher["ids"].reshape(-1, k), "logprobs": teacher["logprobs"].reshape(-1, k),
            "tail": teacher["tail"].reshape(-1)}


def _chunk_losses(student, teacher_rows, rows, targets, name, params, temperature):
    """Return the soft and hard losses `[rows]` of one chunk of student logits `[rows, vocab]`."""
    student = student.float()
    logprobs = F.log_softmax(student, dim=-1)
    hard = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
    logprobs_tau = logprobs if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)

    ids = teacher_rows["ids"][rows]
    student_top = logprobs_tau.gather(-1, ids)
    student_tail = _log_tail(logprobs_tau, ids)
    teacher_vector = torch.cat([teacher_rows["logprobs"][rows], teacher_rows["tail"][rows, None]], dim=-1)
    student_vector = torch.cat([student_top, student_tail[:, None]], dim=-1)
    # Both vectors are normalised log-probabilities at the loss temperature already, so the
    # divergence runs at temperature 1 and only the τ² scale is applied here.
    soft = temperature**2 * divergences.divergence(name, teacher_vector, student_vector, 1.0, **params)
    return soft, hard


def _log_tail(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Return log of the mass outside `ids` per row: -inf, with a zero gradient, where nothing is left."""
    rest = logprobs.scatter(-1, ids, NEG_INF)
    empty = (rest == NEG_INF).all(dim=-1, keepdim=True)
    # logsumexp over a row of only -inf has a NaN gradient, so such rows are replaced before it.
    safe = torch.logsumexp(torch.where(empty, 0.0, rest), dim=-1)
    return torch.where(empty.squeeze(-1), NEG_INF, safe)
