"""Rollout plans of Monte-Carlo kappa: plain, common random numbers, or stratified.

kappa = sum_a c_a Q(s, a) with c_a = 1 - |A| w_a, so its variance is
sum_a c_a^2 var(Q_a) / R_a. The stratified plan lowers it at equal model calls in two
ways: it gives more rollouts to the actions with large |c_a| sd(Q_a) (Neyman
allocation), and it draws each action's rollouts as a Latin hypercube, so that every
step's draws cover the teacher's likely tokens evenly instead of at random.
"""

from __future__ import annotations

import numpy as np
import torch

# Rollout plans of one position (`--kappa-sampling`, see `rollout_plan`).
KAPPA_SAMPLING = ("stratified", "common", "independent")
# Tokens put first, most likely first, in the inverse CDF of stratified sampling.
STRATIFIED_HEAD = 64
MIN_ROLLOUTS_PER_ACTION = 2  # the per-action variance in the standard error needs two


def latin_hypercube(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """Uniforms [rows, columns] in which every column has one value in each of the `rows` strata.

    Column k contains (perm_k(r) + v) / rows for a random permutation perm_k and v ~ U[0, 1),
    so each value on its own is uniform (the estimate stays unbiased) while the rows
    together cover [0, 1) evenly at every step.
    """
    strata = torch.argsort(torch.rand(rows, columns, generator=generator), dim=0)
    return (strata + torch.rand(rows, columns, generator=generator)) / rows


def allocate_rollouts(weights: np.ndarray, total: int, spread: np.ndarray | None = None,
                      minimum: int = MIN_ROLLOUTS_PER_ACTION) -> np.ndarray:
    """Split `total` rollouts over the actions to minimise sum_a c_a^2 spread_a^2 / R_a, with R_a >= `minimum`.

    kappa = sum_a c_a Q_a with c_a = 1 - |A| w_a, so its variance is sum_a c_a^2 var(Q_a) / R_a,
    smallest for R_a proportional to |c_a| sd(Q_a) (Neyman allocation). `spread` [K] is a
    guess of sd(Q_a) made without this position's rollouts (equal when None), so the
    counts do not depend on the values they average and the estimate stays unbiased.
    When the teacher is confident, c of its top token is about 1 - |A| and the other c_a
    about 1. Greedy one-at-a-time assignment is exact for this separable convex objective;
    ties go to the earlier action. Returns counts [K] summing to max(total, K * minimum).
    """
    scale = np.ones(len(weights)) if spread is None else np.asarray(spread, dtype=float)
    squared = ((1.0 - len(weights) * np.asarray(weights, dtype=float)) * scale) ** 2
    counts = np.full(len(weights), minimum)
    for _ in range(total - int(counts.sum())):
        gain = squared / counts - squared / (counts + 1)
        counts[int(np.argmax(gain))] += 1
    return counts


class RolloutSpread:
    """Running guess of sd(Q_a) by action rank (0 = the teacher's top token) from earlier positions.

    `monte_carlo_kappa` allocates the rollouts of a position with the guess from the
    positions before it, then adds its own per-action variances. A rank seen at no earlier
    position gets the mean of the others. A guess is floored at `floor` times the largest,
    so a few quiet positions cannot starve an action of rollouts.
    """

    def __init__(self, floor: float = 0.1):
        self.floor = floor
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def guess(self, num_actions: int) -> np.ndarray | None:
        """Return sd guesses [num_actions], or None before any position was added."""
        if not self.counts:
            return None
        known = {rank: np.sqrt(self.sums[rank] / self.counts[rank]) for rank in self.counts}
        fallback = float(np.mean(list(known.values())))
        guess = np.array([known.get(rank, fallback) for rank in range(num_actions)])
        if guess.max() <= 0:
            return None
        return np.maximum(guess, self.floor * guess.max())

    def add(self, q_rows: list[np.ndarray]) -> None:
        """Add one position's per-rollout Q values, one array per action in rank order."""
        for rank, rows in enumerate(q_rows):
            if len(rows) >= 2:
                self.sums[rank] = self.sums.get(rank, 0.0) + float(rows.var(ddof=1))
                self.counts[rank] = self.counts.get(rank, 0) + 1


def rollout_plan(sampling: str, weights: np.ndarray, rollouts: int, draws: int, generator: torch.Generator,
                 spread: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Rollouts per action [K] and their uniforms [sum R_a, draws], action-major, for one position.

    Every plan runs K * R rollouts in all (K * 2 at least under `stratified`), so the
    model calls are equal:

    - `independent`: R rollouts per action, fresh uniforms each (plain Monte Carlo);
    - `common`: R rollouts per action whose uniforms the K actions share (common random numbers);
    - `stratified`: R_a from `allocate_rollouts` with `spread`, each action's uniforms a Latin hypercube
      of R_a rows, used with the inverse CDF over the likely tokens first (`STRATIFIED_HEAD`).
    """
    num_actions = len(weights)
    if sampling == "independent":
        return np.full(num_actions, rollouts), torch.rand(num_actions * rollouts, draws, generator=generator)
    if sampling == "common":
        shared = torch.rand(rollouts, draws, generator=generator)
        return np.full(num_actions, rollouts), shared.repeat(num_actions, 1)
    if sampling == "stratified":
        counts = allocate_rollouts(weights, num_actions * rollouts, spread)
        return counts, torch.cat([latin_hypercube(int(count), draws, generator) for count in counts])
    raise ValueError(f"unknown kappa sampling {sampling!r}; choose one of: {', '.join(KAPPA_SAMPLING)}")


def kappa_standard_error(q_rows: list[np.ndarray], weights: np.ndarray, paired: bool) -> float:
    """Return the standard error of kappa = sum_a c_a mean(q_rows[a]) from each action's per-rollout Q.

    `paired` (rollout r of every action shares its uniforms): the spread of the R
    per-rollout kappa values over sqrt(R). Otherwise the actions are independent and the
    variances add: sqrt(sum_a c_a^2 var(Q_a) / R_a).

    NOTE: with stratified rollouts the values of one action are not independent, and the
    formula estimates the se that unstratified draws with the same R_a would have. That
    is an upper bound up to a factor sqrt(R_a / (R_a - 1)) (Owen 1997, Latin hypercube
    sampling), not the smaller se that stratification achieves.
    """
    if min(len(rows) for rows in q_rows) < 2:
        return float("nan")
    coefficients = 1.0 - len(weights) * np.asarray(weights, dtype=float)
    if paired:
        per_rollout = np.stack(q_rows, axis=1) @ coefficients  # [R]: kappa of each rollout index
        return float(per_rollout.std(ddof=1) / np.sqrt(len(per_rollout)))
    variances = np.array([rows.var(ddof=1) / len(rows) for rows in q_rows])
    return float(np.sqrt((coefficients**2 * variances).sum()))
