"""The lab process over token ids: exact next-token distributions and prefix parsing.

The teacher's distribution at a state mixes the grammar with a uniform floor over the
emittable tokens (every token but `<pad>`, `<bos>`, `<unk>`):

- clean prefix:   p = (1 - floor) * grammar + floor * uniform
- corrupt prefix: p = (1 - corrupt_noise) * grammar + corrupt_noise * uniform

so the teacher writes a wrong token now and then (rate `floor` per token) and becomes
uncertain after a mistake, as real teachers do on prefixes unlike their training data.
`<eos>` gets a tenth of a normal token's share of the uniform part, so that an early
stop is rarer than any other mistake. Non-emittable tokens get probability 1e-12.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bganalysis.lab import grammar
from bganalysis.lab.grammar import State
from bganalysis.lab.tokenizer import SPECIAL_TOKENS, vocabulary

NON_EMITTABLE_PROBABILITY = 1e-12
EOS_FLOOR_SHARE = 0.1
MAX_MEMO_ENTRIES = 400_000


class LabProcess:
    """Exact next-token distributions of the lab over the lab vocabulary."""

    def __init__(self, floor: float = 1e-4, corrupt_noise: float = 0.5):
        self.floor = floor
        self.corrupt_noise = corrupt_noise
        self.words = vocabulary()
        self.word_to_id = {word: index for index, word in enumerate(self.words)}
        self.vocab_size = len(self.words)
        self.bos_id = self.word_to_id["<bos>"]
        self.eos_id = self.word_to_id[grammar.EOS]
        self.pad_id = self.word_to_id["<pad>"]
        self._uniform = self._uniform_floor()
        self._probs: dict[State, np.ndarray] = {}
        self._logprobs: dict[State, torch.Tensor] = {}
        self._prefix_states: dict[tuple, State] = {}

    def _uniform_floor(self) -> np.ndarray:
        weights = np.ones(self.vocab_size)
        for token in SPECIAL_TOKENS:
            if token != grammar.EOS:
                weights[self.word_to_id[token]] = 0.0
        weights[self.eos_id] = EOS_FLOOR_SHARE
        return weights / weights.sum()

    def grammar_probs(self, state: State) -> np.ndarray:
        """Return the grammar's distribution at `state` as a [vocab] float64 array."""
        probs = np.zeros(self.vocab_size)
        for word, probability in grammar.grammar_distribution(state).items():
            probs[self.word_to_id[word]] = probability
        return probs

    def probs(self, state: State) -> np.ndarray:
        """Return the teacher's exact next-token distribution at `state`, [vocab] float64."""
        cached = self._probs.get(state)
        if cached is not None:
            return cached
        noise = self.corrupt_noise if state.corrupt else self.floor
        probs = (1.0 - noise) * self.grammar_probs(state) + noise * self._uniform
        probs = np.maximum(probs, NON_EMITTABLE_PROBABILITY)
        probs /= probs.sum()
        self._probs[state] = probs
        return probs

    def logprobs(self, state: State) -> torch.Tensor:
        """Return log `probs(state)` as a [vocab] float32 tensor (cached per state)."""
        cached = self._logprobs.get(state)
        if cached is None:
            cached = torch.from_numpy(np.log(self.probs(state))).float()
            self._logprobs[state] = cached
        return cached

    def advance(self, state: State, token_id: int) -> State:
        return grammar.advance(state, self.words[token_id])

    def states_along(self, ids: Sequence[int]) -> list[State]:
        """Return the state after each prefix of `ids`.

        `ids` starts with `<bos>` (a missing `<bos>` is treated as present). With `<bos>`
        present the list has len(ids) entries: entry i is the state after ids[0..i].
        """
        ids = list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        states = [grammar.START]
        for token_id in ids:
            states.append(self.advance(states[-1], token_id))
        return states

    def state_after(self, ids: Sequence[int]) -> State:
        """Return the state after `ids`, reusing the parse of the longest cached prefix."""
        key = tuple(ids)
        state = self._prefix_states.get(key)
        if state is not None:
            return state
        if len(key) <= 1:
            state = grammar.START
        else:
            state = self.advance(self.state_after(key[:-1]), key[-1])
        if len(self._prefix_states) >= MAX_MEMO_ENTRIES:
            self._prefix_states.clear()
        self._prefix_states[key] = state
        return state

    def sample_document(self, rng: np.random.Generator, max_tokens: int = 256) -> tuple[list[int], list[State]]:
        """Sample one document from the teacher; return its ids (with `<bos>`) and states.

        `states[i]` is the state in which `ids[i + 1]` was emitted.
        """
        ids = [self.bos_id]
        states = [grammar.START]
        while len(ids) < max_tokens:
            probs = self.probs(states[-1])
            token_id = int(rng.choice(self.vocab_size, p=probs))
            ids.append(token_id)
            if token_id == self.eos_id:
                break
            states.append(self.advance(states[-1], token_id))
        return ids, states


def entropy_nats(probs: np.ndarray) -> float:
    mask = probs > 0
    return float(-(probs[mask] * np.log(probs[mask])).sum())


def kl_nats(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats for two distributions on the same support."""
    mask = p > 0
    return float((p[mask] * (np.log(p[mask]) - np.log(q[mask]))).sum())


