"""Exact loss-to-go and kappa on the lab by dynamic programming.

The loss that kappa accumulates needs a student. The exact values use an idealised
reference student: it equals the teacher on clean prefixes and, on corrupt prefixes,
keeps predicting as if the prefix were clean (it never saw a mistake in training). Its
per-state loss is therefore 0 on clean states and KL(teacher || clean teacher) on
corrupt ones. A trained student is close to this picture where it learned the process
well, which is what the Monte-Carlo estimator is validated against.

Q(s, a) = V_H(s + a), with V_0 = 0, V(after <eos>) = 0 and
V_h(x) = loss(x) + sum_c p_T(c | x) * V_{h-1}(x + c).
Tokens that lead to the same next state are summed first, so one step branches into at
most (valid words + 2) states and the recursion is cheap.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bganalysis.lab import grammar
from bganalysis.lab.grammar import State
from bganalysis.lab.process import LabProcess, kl_nats


class ExactLossToGo:
    """Memoised V_h(state) for one lab process."""

    def __init__(self, process: LabProcess):
        self.process = process
        self._value = lru_cache(maxsize=None)(self._value_uncached)

    def reference_loss(self, state: State) -> float:
        """Per-state loss of the idealised reference student (nats)."""
        if not state.corrupt or state == grammar.DONE:
            return 0.0
        clean = state._replace(corrupt=False)
        return kl_nats(self.process.probs(state), self.process.probs(clean))

    def transitions(self, state: State) -> list[tuple[float, State]]:
        """Return (probability, next state) pairs, tokens with the same next state merged."""
        process = self.process
        probs = process.probs(state)
        merged: dict[State, float] = {}
        valid_ids = {process.word_to_id[w] for w in grammar.grammar_distribution(state)}
        valid_ids.add(process.eos_id)
        for token_id in valid_ids:
            nxt = process.advance(state, token_id)
            merged[nxt] = merged.get(nxt, 0.0) + float(probs[token_id])
        rest = 1.0 - float(sum(probs[i] for i in valid_ids))
        if rest > 0:
            invalid_id = next(i for i in range(process.vocab_size) if i not in valid_ids)
            nxt = process.advance(state, invalid_id)
            merged[nxt] = merged.get(nxt, 0.0) + rest
        return [(probability, nxt) for nxt, probability in merged.items()]

    def value(self, state: State, horizon: int) -> float:
        """V_horizon(state): expected reference loss over the next `horizon` states (nats)."""
        return self._value(state, horizon)

    def _value_uncached(self, state: State, horizon: int) -> float:
        if horizon <= 0 or state == grammar.DONE:
            return 0.0
        total = self.reference_loss(state)
        for probability, nxt in self.transitions(state):
            total += probability * self._value(nxt, horizon - 1)
        return total

    def q_values(self, state: State, action_ids: list[int], horizon: int) -> np.ndarray:
        """Q(state, a) for each forced action a: V_horizon of the state after a, [K] nats."""
        return np.array([self.value(self.process.advance(state, a), horizon) for a in action_ids])
