"""Per-position risk kappa: action sets, the Monte-Carlo estimator and the exact lab value.

For a state s with action set A and teacher weights w (teacher mass renormalised on A):
Q(s, a) is the loss-to-go after forcing a, Q_bar = sum_a w_a Q(s, a), and

    kappa(s)        = sum_a (Q(s, a) - Q_bar)      (signed)
    kappa_abs(s)    = sum_a |Q(s, a) - Q_bar|
    kappa_spread(s) = sum_a w_a |Q(s, a) - Q_bar|

kappa is linear in Q: kappa = sum_a c_a Q(s, a) with c_a = 1 - |A| w_a.
"""

from __future__ import annotations

import numpy as np
import torch

from bganalysis.analysis.kappa_sampling import STRATIFIED_HEAD, RolloutSpread, kappa_standard_error, rollout_plan
from bganalysis.analysis.labels import KAPPA_ESTIMATORS, estimator_column
from bganalysis.losses import kl_from_logprobs
from bganalysis.rollout import ModelRunner, rollouts_after_tokens


# The columns the kappa estimators fill; an estimator that `analyze --estimators` leaves out leaves them NaN.
KAPPA_COLUMNS = ("kappa_se", *(estimator_column(estimator, ranking) for estimator in KAPPA_ESTIMATORS
                               for ranking in ("kappa", "kappa_abs", "kappa_spread")))


def select_actions(teacher_logprobs: torch.Tensor, k: int, observed: int | None = None, random: int = 0,
                   generator: torch.Generator | None = None, exclude: tuple[int, ...] = ()) -> torch.Tensor:
    """Return the teacher's top-k token ids, then `observed` when given and not among them, then `random` others.

    Ties go to the smaller id (stable sort), so the set is reproducible. The random
    tokens are drawn with `generator`, without replacement, from the tokens the teacher
    gives a finite log-probability, that the set does not contain yet and that are not in
    `exclude` (special tokens such as padding), in ascending id order. They probe actions
    far from the teacher's choice, which the top-k never contains.
    """
    order = torch.sort(teacher_logprobs, descending=True, stable=True).indices
    actions = order[:k]
    if observed is not None and not bool((actions == observed).any()):
        actions = torch.cat([actions, torch.tensor([observed])])
    if random > 0:
        candidates = torch.isfinite(teacher_logprobs)
        candidates[actions] = False
        candidates[[token for token in exclude if token < len(candidates)]] = False
        pool = candidates.nonzero().squeeze(1)
        picks = pool[torch.randperm(len(pool), generator=generator)[:random]]
        actions = torch.cat([actions, picks.sort().values])
    return actions


def action_weights(teacher_logprobs: torch.Tensor, actions: torch.Tensor) -> np.ndarray:
    """Teacher probabilities of `actions`, renormalised to sum to 1, [K] float64."""
    probs = teacher_logprobs.double().exp()[actions].numpy()
    return probs / probs.sum()


def kappa_from_q(q: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """kappa, kappa_abs, kappa_spread and Q_bar from Q values.

    `q` is [K] or [R, K] (R paired rollouts, sharing random numbers across actions);
    the result has one value per leading row.
    """
    q_bar = (q * weights).sum(axis=-1, keepdims=True)
    deviation = q - q_bar
    return {
        "kappa": deviation.sum(axis=-1),
        "kappa_abs": np.abs(deviation).sum(axis=-1),
        "kappa_spread": (weights * np.abs(deviation)).sum(axis=-1),
        "q_bar": q_bar[..., 0],
    }


def monte_carlo_kappa(
    teacher: ModelRunner,
    student: ModelRunner,
    prefix_length: int,
    teacher_logprobs: torch.Tensor,
    actions: torch.Tensor,
    rollouts: int,
    horizon: int,
    generator: torch.Generator,
    eos_ids: set[int],
    sampling: str = "stratified",
    spread: RolloutSpread | None = None,
) -> dict[str, float]:
    """Student-aware Monte-Carlo kappa at one position (both runners hold the document).

    Q(s, a) is the mean over teacher rollouts of the summed per-state loss of the student
    over the H states after a; `sampling` chooses how the K * R rollouts are drawn (see
    `rollout_plan`). `spread` carries the sd guesses of stratified allocation from one
    position to the next; it is updated here. kappa_abs and kappa_spread are computed
    from the mean Q values.
    """
    weights = action_weights(teacher_logprobs, actions)
    guess = spread.guess(len(actions)) if spread is not None else None
    counts, uniforms = rollout_plan(sampling, weights, rollouts, horizon - 1, generator, guess)
    head = STRATIFIED_HEAD if sampling == "stratified" else 0
    forced = actions.repeat_interleave(torch.as_tensor(counts))
    sample = rollouts_after_tokens(teacher, {"student": student}, prefix_length, forced, uniforms, eos_ids, head)

    q_rows = np.split(sample.losses["student"].sum(dim=1).double().numpy(), np.cumsum(counts)[:-1])
    q = np.array([rows.mean() for rows in q_rows])
    if spread is not None:
        spread.add(q_rows)
    result = {name: float(value) for name, value in kappa_from_q(q, weights).items()}
    result["kappa_se"] = kappa_standard_error(q_rows, weights, paired=sampling == "common")
    result["actions"] = actions.tolist()
    result["q"] = q.tolist()
    result["rollouts_per_action"] = counts.tolist()
    return result


def teacher_only_kappa(
    teacher: ModelRunner,
    prefix_length: int,
    actions: torch.Tensor,
    weights: np.ndarray,
    continuation: list[int],
    original_logprobs: torch.Tensor,
    eos_ids: set[int],
) -> dict[str, float]:
    """Teacher-only counterfactual kappa at one position: no student, no sampling.

    Each action replaces the observed token, and the observed continuation follows
    (`continuation`, h - 1 tokens). Q(s, a) is the KL from the teacher's original
    next-token distributions at those h states (`original_logprobs` [h, vocab]) to its
    distributions after the swap, summed over the h states. It measures how far the swap
    moves the teacher's predictions for the next h observed tokens. An EOS action ends the document, so
    its Q is 0. Deterministic, so it has no standard error.
    """
    horizon = original_logprobs.shape[0]
    if horizon == 0:
        return {"kappa": 0.0, "kappa_abs": 0.0, "kappa_spread": 0.0}
    block = torch.cat([actions[:, None], torch.tensor(continuation, dtype=torch.long).expand(len(actions), horizon - 1)], dim=1)
    rows = teacher.rows_from_prefix(prefix_length, len(actions), whole=True)
    swapped = teacher.extend(rows, block)  # [K, h, vocab]: the states after each block token
    q = kl_from_logprobs(original_logprobs.expand_as(swapped), swapped).sum(dim=1).double().numpy()
    q[np.isin(actions.numpy(), sorted(eos_ids))] = 0.0
    return {name: float(value) for name, value in kappa_from_q(q, weights).items() if name != "q_bar"}


def teacher_proxies(teacher_logprobs: torch.Tensor) -> dict[str, float]:
    """Cheap risk proxies at one state: entropy (nats), p_max and the top-1/top-2 margin."""
    probs = teacher_logprobs.double().exp()
    top = torch.topk(probs, 2).values
    entropy = -(probs * teacher_logprobs.double()).nansum()
    return {"teacher_entropy": float(entropy), "teacher_pmax": float(top[0]), "teacher_margin": float(top[0] - top[1])}
