"""Per-token soft weights λ(s) for the hybrid loss λ·soft + (1 - λ)·hard.

λ is the weight on the SOFT term, in [0, 1]. Every scheme returns a float32 tensor
shaped like the positions, `[...]`, detached from the graph, so the weights are
constants of the loss. The exception is `risk_penalty`, an extra hard-loss term that
must carry gradient through the student logits. `curriculum_weight` depends on the
step only and returns a float.

Teacher logits are `[..., vocab]`, sliced to the real vocabulary first
(`losses.align_vocab`): |V| below is their last dimension. Positions whose target is
-100 get λ = 0 where a scheme reads the target.

Parameter errors raise UserError naming the value and the valid range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bganalysis.errors import UserError
from bganalysis.losses import IGNORE_INDEX

# Integer codes of a region tensor. The analysis writes the same regions as the strings
# "bridge", "garden" and "" (unlabelled); `region_codes` converts them.
REGION_MIDDLE = 0
REGION_BRIDGE = 1
REGION_GARDEN = 2
REGION_CODES = {"": REGION_MIDDLE, "bridge": REGION_BRIDGE, "garden": REGION_GARDEN}


def static_weights(lam: float, targets: torch.Tensor) -> torch.Tensor:
    """Return the constant λ = `lam` at every position of `targets` `[...]`."""
    lam = _check_range("lam", lam, 0.0, 1.0)
    return torch.full(targets.shape, lam, dtype=torch.float32, device=targets.device)


@torch.no_grad()
def confidence_weights(teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return λ = 1 - π_T(a*|s): the hard term gets the teacher's confidence in the label.

    Shapes: teacher logits `[..., vocab]`, targets `[...]` int64 (-100 gives λ = 0),
    result float32 `[...]`. `temperature` is the loss temperature of the soft target,
    softmax(logits / temperature); 1 uses the teacher's own probabilities.
    """
    temperature = _check_temperature(temperature)
    _check_targets(teacher_logits, targets)
    valid = targets != IGNORE_INDEX
    index = torch.where(valid, targets, 0).unsqueeze(-1)

    teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    label_probability = teacher_logprobs.gather(-1, index).squeeze(-1).exp()
    return torch.where(valid, 1.0 - label_probability, 0.0)


@torch.no_grad()
def entropy_weights(teacher_logits: torch.Tensor, tsallis_order: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Return λ = the teacher's entropy normalised to [0, 1] by its maximum, at |V| uniform tokens.

    - `tsallis_order` γ = 1: Shannon, H(p) / log|V|.
    - γ > 0, γ ≠ 1: Tsallis, (sum p^γ - 1) / (|V|^(1-γ) - 1). It tends to the Shannon
      value as γ tends to 1. Both differences are computed with expm1, so γ near 1 loses
      no precision.

    Shapes: teacher logits `[..., vocab]`, result float32 `[...]`. `temperature` is the
    loss temperature of the soft target.
    """
    order = _check_finite("tsallis_order", tsallis_order, "a number > 0 (1 selects Shannon entropy)")
    if order <= 0:
        raise UserError(f"invalid tsallis_order={tsallis_order!r}: must be > 0 (1 selects Shannon entropy)")
    temperature = _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"entropy weights need at least 2 tokens, got logits of width {vocab}")

    logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    support = logprobs > float("-inf")
    logprobs = torch.where(support, logprobs, 0.0)
    probs = torch.where(support, logprobs.exp(), 0.0)

    if order == 1.0:
        entropy = -(probs * logprobs).sum(dim=-1)
        weights = entropy / math.log(vocab)
    else:
        # sum p^γ - 1 = sum p·(p^(γ-1) - 1), because sum p = 1.
        numerator = (probs * torch.expm1((order - 1.0) * logprobs)).sum(dim=-1)
        weights = numerator / math.expm1((1.0 - order) * math.log(vocab))
    return weights.clamp(0.0, 1.0)


def curriculum_weight(
    step: int, total_steps: int, lam_max: float = 1.0, ramp_fraction: float = 0.5, reverse: bool = False
) -> float:
    """Return λ at optimiser step `step` (0-based) of a linear ramp.

    Forward: λ = lam_max·min(step / (ramp_fraction·total_steps), 1), so training starts
    hard (λ = 0) and reaches lam_max after ramp_fraction of the steps.
    Reverse: λ = lam_max·(1 - min(step / (ramp_fraction·total_steps), 1)), the same ramp
    run down, so training starts at lam_max and is hard-only after the ramp. The
    alternative, mirroring the forward ramp in time, would keep the hard-only phase to
    the final step only.
    Steps past `total_steps` keep the final value.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"invalid step={step!r}: must be an integer >= 0")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UserError(f"invalid total_steps={total_steps!r}: must be an integer >= 1")
    lam_max = _check_range("lam_max", lam_max, 0.0, 1.0)
    ramp_fraction = _check_range("ramp_fraction", ramp_fraction, 0.0, 1.0)
    if ramp_fraction == 0:
        raise UserError("invalid ramp_fraction=0: must be in (0, 1]; use static weights for a constant λ")

    progress = min(step / (ramp_fraction * total_steps), 1.0)
    return lam_max * (1.0 - progress) if reverse else lam_max * progress


def region_codes(labels) -> torch.Tensor:
    """Convert region labels ("bridge", "garden", "" for unlabelled) to an int64 code tensor.

    `labels` is any nested sequence or NumPy array of those strings; the result has
    its shape.
    """
    array = np.asarray(labels, dtype=object)
    unknown = sorted({str(label) for label in array.ravel() if label not in REGION_CODES})
    if unknown:
        raise UserError(f"unknown region labels {unknown}; valid labels: 'bridge', 'garden' and '' (unlabelled)")

    codes = np.zeros(array.shape, dtype=np.int64)
    for label, code in REGION_CODES.items():
        codes[array == label] = code
    return torch.from_numpy(codes)


def region_weights(regions: torch.Tensor, lam_bridge: float, lam_garden: float, lam_middle: float) -> torch.Tensor:
    """Return λ per position from its region: lam_bridge, lam_garden or lam_middle.

    `regions` `[...]` contains REGION_BRIDGE, REGION_GARDEN or REGION_MIDDLE (see
    `region_codes`). Bridges usually get a small λ (hard-leaning, because the exact
    token matters) and Gardens a large one (soft-leaning). The order is not enforced,
    so an ablation can swap them.
    """
    table = torch.tensor(
        [
            _check_range("lam_middle", lam_middle, 0.0, 1.0),
            _check_range("lam_bridge", lam_bridge, 0.0, 1.0),
            _check_range("lam_garden", lam_garden, 0.0, 1.0),
        ],
        dtype=torch.float32,
        device=regions.device,
    )
    if regions.dtype.is_floating_point or regions.dtype == torch.bool:
        raise UserError(f"regions must be an integer tensor of region codes, got dtype {regions.dtype}")
    invalid = (regions < REGION_MIDDLE) | (regions > REGION_GARDEN)
    if invalid.any():
        found = sorted(set(regions[invalid].tolist()))[:5]
        raise UserError(
            f"invalid region codes {found}: valid codes are {REGION_MIDDLE} (middle), "
            f"{REGION_BRIDGE} (bridge) and {REGION_GARDEN} (garden)"
        )
    return table[regions.long()]


@torch.no_grad()
def quantile_weights(kappa_quantile: torch.Tensor, lam_bridge: float, lam_garden: float) -> torch.Tensor:
    """Return λ = lam_bridge + (lam_garden - lam_bridge)·(1 - quantile) per position.

    `kappa_quantile` `[...]` is the quantile of each position's risk κ in [0, 1], where 1
    is the riskiest (most Bridge-like): it gets lam_bridge, quantile 0 gets lam_garden,
    and values between are interpolated linearly. Raises UserError for a quantile that
    is NaN or outside [0, 1]; fill positions without a κ estimate first (0.5 gives the
    midpoint λ).
    """
    lam_bridge = _check_range("lam_bridge", lam_bridge, 0.0, 1.0)
    lam_garden = _check_range("lam_garden", lam_garden, 0.0, 1.0)
    quantile = kappa_quantile.float()
    invalid = ~((quantile >= 0) & (quantile <= 1))
    if invalid.any():
        raise UserError(
            f"kappa_quantile has {int(invalid.sum())} values that are NaN or outside [0, 1] "
            f"(first: {quantile[invalid][0].item()!r}); pass quantiles in [0, 1] and fill missing positions"
        )
    return lam_bridge + (lam_garden - lam_bridge) * (1.0 - quantile)


def risk_delta(logits_at_state: torch.Tensor, logits_after_action: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Return Δ(s, a*) = log sum_a' exp(f(a'|[s, a*]) - f(a*|s)) per position, in nats.

    f is the student's raw logits. Shapes: `logits_at_state` f(·|s) `[..., vocab]`,
    `logits_after_action` f(·|[s, a*]) `[..., vocab]` (the student's logits one step later,
    after a* is appended), `actions` a* `[...]` int64. Positions where the action is -100
    give Δ = 0 and no gradient. The result is float32 and keeps the gradient through
    both logit tensors.
    """
    if logits_at_state.shape != logits_after_action.shape:
        raise ValueError(
            f"logits at the state {tuple(logits_at_state.shape)} and after the action "
            f"{tuple(logits_after_action.shape)} must have the same shape"
        )
    _check_targets(logits_at_state, actions)
    valid = actions != IGNORE_INDEX
    index = torch.where(valid, actions, 0).unsqueeze(-1)

    action_logit = logits_at_state.float().gather(-1, index).squeeze(-1)
    log_partition_after = torch.logsumexp(logits_after_action.float(), dim=-1)
    return torch.where(valid, log_partition_after - action_logit, 0.0)


def sequence_risk_delta(student_logits: torch.Tensor, targets: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Return Δ at every position of teacher-forced sequences, from one student forward pass.

    Shapes: `student_logits` `[batch, seq, vocab]`, `targets` and `input_ids`
    `[batch, seq]`, result float32 `[batch, seq]`. With `targets[b, t]` the token that
    position t predicts, the logits at t + 1 are f(·|[s, a*]) only if that token is the
    next input, so this raises ValueError unless `targets[b, t] == input_ids[b, t + 1]`
    at every valid position and the last position's target is -100. That holds for
    teacher-written labels, not for argmax labels that differ from the input.
    """
    if student_logits.dim() != 3 or targets.shape != student_logits.shape[:2] or input_ids.shape != targets.shape:
        raise ValueError(
            f"expected logits [batch, seq, vocab] with targets and input_ids [batch, seq]; got "
            f"{tuple(student_logits.shape)}, {tuple(targets.shape)}, {tuple(input_ids.shape)}"
        )
    if (targets[:, -1] != IGNORE_INDEX).any():
        raise ValueError("the last position has a target but no next position to score it; set its target to -100")
    valid = targets[:, :-1] != IGNORE_INDEX
    if (valid & (targets[:, :-1] != input_ids[:, 1:])).any():
        raise ValueError("targets differ from the next input token; Δ needs logits after the target, so run the student on it")

    delta = risk_delta(student_logits[:, :-1], student_logits[:, 1:], targets[:, :-1])
    return F.pad(delta, (0, 1))


def risk_penalty(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return the risk-guided extra hard-loss term (α/4)·Δ², keeping Δ's gradient.

    The risk-guided hard loss is hard_ce + risk_penalty(Δ, α), mixed with the soft term
    by a static λ. `delta` `[...]` comes from `risk_delta` or `sequence_risk_delta`.
    """
    alpha = _check_finite("alpha", alpha, "a finite number >= 0")
    if alpha < 0:
        raise UserError(f"invalid alpha={alpha!r}: the risk penalty weight must be >= 0")
    return (alpha / 4.0) * delta.float().square()


def _check_finite(key: str, value, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"invalid {key}={value!r}: must be {rule}")
    return float(value)


def _check_range(key: str, value, low: float, high: float) -> float:
    rule = f"a number in [{low:g}, {high:g}]"
    value = _check_finite(key, value, rule)
    if not low <= value <= high:
        raise UserError(f"invalid {key}={value!r}: must be {rule}")
    return value


def _check_temperature(temperature) -> float:
    temperature = _check_finite("temperature", temperature, "a finite number > 0")
    if temperature <= 0:
        raise UserError(f"invalid temperature={temperature!r}: the loss temperature must be > 0")
    return temperature


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match the logits' leading dims {tuple(logits.shape[:-1])}")
    vocab = logits.shape[-1]
    out_of_range = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if out_of_range.any():
        raise ValueError(f"targets must be token ids in [0, {vocab}) or -100; found {targets[out_of_range][0].item()}")
