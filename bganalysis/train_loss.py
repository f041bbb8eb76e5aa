"""Per-token soft weights λ and loss parts of one trainer micro-batch.

The loss at a response position is λ·soft + (1 - λ)·(hard + risk):

- `soft` = loss_temperature² · D(p_T || q_S) for the configured divergence D;
- `hard` = -log q_S(a*), the cross-entropy on the label;
- `risk` = (α/4)·Δ(s, a*)² for the risk_guided scheme, else 0 (see `weights.risk_delta`);
- λ comes from the weight scheme and is a constant of the loss (no gradient).

Shapes: logits `[batch, seq, vocab]` (sliced with `losses.align_vocab`), targets and
input ids `[batch, seq]`, every returned tensor float32 `[batch, seq]`. Positions whose
target is -100 have all parts 0.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bganalysis.divergences import DIVERGENCES, divergence
from bganalysis.losses import IGNORE_INDEX, hybrid_token_losses
from bganalysis.weights import (
    confidence_weights,
    curriculum_weight,
    entropy_weights,
    quantile_weights,
    region_weights,
    risk_penalty,
    sequence_risk_delta,
    static_weights,
)

WEIGHT_SCHEMES = ("static", "confidence", "entropy", "curriculum", "reverse_curriculum", "bridge_garden", "risk_guided")
# Schemes whose λ is constant across tokens and steps: `lam`, fixed by the method unless it is hybrid.
STATIC_LAMBDA_SCHEMES = ("static", "risk_guided")
# Teacher statistics usable as a per-token risk proxy, with the sign that makes a larger value
# riskier (more Bridge-like): a confident teacher marks a position with one right token.
PROXY_RISK_SIGNS = {"teacher_entropy": -1.0, "teacher_pmax": 1.0, "teacher_margin": 1.0}


def divergence_parameters(name: str) -> tuple[str, ...]:
    """Return the names of the keyword parameters that divergence `name` takes (alpha, beta)."""
    signature = inspect.signature(DIVERGENCES[name])
    return tuple(key for key, parameter in signature.parameters.items() if parameter.kind is inspect.Parameter.KEYWORD_ONLY)


class SoftWeights:
    """The per-token soft weight λ of the configured scheme, for one training run.

    The confidence, entropy and proxy schemes read the teacher's own distribution
    (temperature 1), not the loss-temperature soft target, so that changing
    loss_temperature does not also change the mix.
    """

    def __init__(self, config, region_map=None):
        self.config = config
        self.region_map = region_map

    @torch.no_grad()
    def __call__(self, step: int, teacher_logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """Return λ `[batch, seq]` for optimiser step `step` (from 1); -100 positions get 0."""
        config = self.config
        scheme = config.weight_scheme
        if scheme in STATIC_LAMBDA_SCHEMES:
            weights = static_weights(config.lam, targets)
        elif scheme in ("curriculum", "reverse_curriculum"):
            lam = curriculum_weight(step - 1, config.steps, config.lam_max, config.ramp_fraction, reverse=scheme == "reverse_curriculum")
            weights = static_weights(lam, targets)
        elif scheme == "confidence":
            weights = confidence_weights(teacher_logits, targets)
        elif scheme == "entropy":
            weights = entropy_weights(teacher_logits, config.tsallis_order)
        elif self.region_map is not None:
            regions = self.region_map.lookup(targets)
            weights = region_weights(regions, config.lam_bridge, config.lam_garden, config.lam_middle)
        else:
            quantiles = proxy_risk_quantiles(teacher_logits, targets, config.bridge_garden_proxy)
            weights = quantile_weights(quantiles, config.lam_bridge, config.lam_garden)
        return torch.where(targets != IGNORE_INDEX, weights, 0.0)


@torch.no_grad()
def proxy_risk_quantiles(teacher_logits: torch.Tensor, targets: torch.Tensor, proxy: str) -> torch.Tensor:
    """Return each valid position's risk quantile in [0, 1] among the valid positions of this batch.

    The riskiest position gets 1 and the least risky 0. Tied values share their average
    rank, so the mean quantile over the batch is exactly 0.5. A batch with one valid
    position gives it 0.5. Invalid positions get 0.5 (their λ is masked later).
    NOTE: the ranking covers one micro-batch, so the same token can get a different λ
    in another batch; a batch of near-identical positions still spreads them over [0, 1].
    """
    from scipy.stats import rankdata

    logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    probs = logprobs.exp()
    if proxy == "teacher_entropy":
        values = -(probs * torch.where(probs > 0, logprobs, 0.0)).sum(dim=-1)
    elif proxy == "teacher_pmax":
        values = probs.max(dim=-1).values
    else:
        top2 = probs.topk(2, dim=-1).values
        values = top2[..., 0] - top2[..., 1]
    risk = PROXY_RISK_SIGNS[proxy] * values

    valid = targets != IGNORE_INDEX
    quantiles = torch.full(targets.shape, 0.5, dtype=torch.float32, device=targets.device)
    count = int(valid.sum())
    if count > 1:
        ranks = rankdata(risk[valid].cpu().double().numpy(), method="average") - 1.0
        quantiles[valid] = torch.from_numpy(ranks / (count - 1)).float().to(targets.device)
    return quantiles


def token_losses(
    config, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, batch: dict, targets: torch.Tensor,
    lam: torch.Tensor, cached: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the soft, hard, risk and total loss per token for one micro-batch.

    With `cached` (the `teacher_topk_ids`, `teacher_topk_logprobs` and
    `teacher_tail_logprob` tensors of a `TeacherCache` batch) the soft loss reads the
    cached top-k through `cached_loss.cached_token_losses`. Otherwise forward_kl uses the
    chunked fast path `losses.hybrid_token_losses` and every other divergence goes through
    `divergence_token_losses`. `teacher_logits` may be None (and `cached` too) only when λ
    is 0 everywhere, and `soft` is then 0.
    """
    params = {key: getattr(config, f"divergence_{key}") for key in divergence_parameters(config.divergence)}
    params = {key: value for key, value in params.items() if value is not None}
    if cached is not None:
        from bganalysis.cached_loss import cached_token_losses

        parts = cached_token_losses(
            student_logits, cached["teacher_topk_ids"], cached["teacher_topk_logprobs"], cached["teacher_tail_logprob"],
            targets, lam, config.divergence, params, config.loss_temperature, config.loss_chunk_tokens,
        )
    elif config.divergence == "forward_kl" or teacher_logits is None:
        lam_argument = 0.0 if teacher_logits is None else lam
        parts = hybrid_token_losses(student_logits, teacher_logits, targets, lam_argument, config.loss_temperature, config.loss_chunk_tokens)
    else:
        parts = divergence_token_losses(
            student_logits, teacher_logits, targets, lam, config.divergence, params, config.loss_temperature, config.loss_chunk_tokens
        )

    parts["risk"] = torch.zeros_like(parts["hard"])
    if config.weight_scheme == "risk_guided":
        delta = sequence_risk_delta(student_logits, targets, batch["input_ids"])
        parts["risk"] = torch.where(targets != IGNORE_INDEX, risk_penalty(delta, config.risk_alpha), 0.0)
        parts["total"] = parts["total"] + torch.where(lam < 1, (1.0 - lam) * parts["risk"], 0.0)
    return parts


def divergence_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    lam: torch.Tensor,
    name: str,
    params: dict[str, float],
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> dict[str, torch.Tensor]:
    """Compute lam·soft + (1 - lam)·hard per token for any divergence of `DIVERGENCES`, in chunks of tokens.

    Same contract as `losses.hybrid_token_losses` (soft = temperature² · D, hard at
    temperature 1, lam a detached tensor shaped like `targets`), but built on plain
    autograd through `divergences.divergence`, so every divergence works.

    NOTE: memory differs from the forward_kl fast path. Each chunk runs under activation
    checkpointing, so only one chunk's float32 `[chunk_tokens, vocab]` intermediates
    exist at a time and the forward is recomputed in backward (about twice the loss
    compute, an estimate). But the backward of each chunk's row gather writes a full
    `[batch·seq, vocab]` gradient that autograd then adds up, so the peak is about two
    extra logits-sized float32 tensors, where the fast path needs one.
    """
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)
    teacher_rows = teacher_logits.reshape(-1, vocab).detach()
    target_rows = targets.reshape(-1)
    valid_rows = (target_rows != IGNORE_INDEX).nonzero().squeeze(1)

    soft = torch.zeros(target_rows.shape, dtype=torch.float32, device=student_logits.device)
    hard = torch.zeros_like(soft)
    for rows in valid_rows.split(chunk_tokens):
        chunk_soft, chunk_hard = checkpoint(
            _chunk_losses, student_rows, teacher_rows, target_rows, rows, name, params, temperature, use_reentrant=False
        )
        soft = soft.index_copy(0, rows, chunk_soft)
        hard = hard.index_copy(0, rows, chunk_hard)
    soft, hard = soft.reshape(targets.shape), hard.reshape(targets.shape)

    # Select instead of multiplying by 0, so that an infinite part with zero weight leaves `total` finite.
    total = torch.where(lam > 0, lam * soft, 0.0) + torch.where(lam < 1, (1.0 - lam) * hard, 0.0)
    return {"soft": soft, "hard": hard, "total": total}


def _chunk_losses(student_rows, teacher_rows, target_rows, rows, name, params, temperature):
    student = student_rows[rows].float()
    soft = temperature**2 * divergence(name, teacher_rows[rows], student, temperature, **params)
    hard = -F.log_softmax(student, dim=-1).gather(-1, target_rows[rows, None]).squeeze(-1)
    return soft, hard
