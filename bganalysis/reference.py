"""Plain reference implementations of the rollout engine: no cache, no batching.

Every step re-reads the whole sequence with a full forward pass, one row at a time.
They are slow on purpose: tests use them as the oracle for `bganalysis.rollout`, and
`bganalysis bench` uses them as the baseline. They take the same uniforms, so the same
tokens are drawn.
"""

from __future__ import annotations

import torch

from bganalysis.losses import kl_from_logprobs
from bganalysis.rollout import Sample, alive_mask, sample_from_logprobs


@torch.no_grad()
def next_logprobs(model, ids: list[int], vocab_size: int) -> torch.Tensor:
    """Full forward pass over `ids`; return the last position's log-probs [vocab] fp32."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, :vocab_size]
    return torch.log_softmax(logits.float(), dim=-1)


def reference_rollouts(teacher, students: dict, prefix: list[int], actions: torch.Tensor,
                       uniforms: torch.Tensor, eos_ids: set[int], vocab_size: int, head: int = 0) -> Sample:
    """Same result as `rollout.rollouts_after_actions`, computed one row and one step at a time."""
    num_actions, rollouts, draws = uniforms.shape
    all_tokens, all_losses = [], {name: [] for name in students}
    for a in range(num_actions):
        for r in range(rollouts):
            tokens = [int(actions[a])]
            row_losses = {name: [] for name in students}
            for k in range(draws + 1):
                teacher_lp = next_logprobs(teacher, prefix + tokens, vocab_size)
                for name, student in students.items():
                    student_lp = next_logprobs(student, prefix + tokens, vocab_size)
                    row_losses[name].append(float(kl_from_logprobs(teacher_lp, student_lp)))
                if k < draws:
                    tokens.append(int(sample_from_logprobs(teacher_lp[None], uniforms[a, r, k:k + 1], head=head)[0]))
            all_tokens.append(tokens)
            for name in students:
                all_losses[name].append(row_losses[name])
    tokens = torch.tensor(all_tokens)
    alive = alive_mask(tokens, eos_ids, include_current=True)
    losses = {name: torch.tensor(values) * alive for name, values in all_losses.items()}
    return Sample(tokens=tokens, alive=alive, losses=losses)


def reference_continuation(model, prefix: list[int], uniforms: torch.Tensor, eos_ids: set[int],
                           vocab_size: int, temperature: float = 1.0):
    """Same result as `rollout.sample_continuation`, one row and one step at a time."""
    rows, max_new = uniforms.shape
    all_tokens, all_states = [], []
    for r in range(rows):
        tokens, states = [], []
        for k in range(max_new):
            logprobs = next_logprobs(model, prefix + tokens, vocab_size)
            states.append(logprobs)
            tokens.append(int(sample_from_logprobs(logprobs[None], uniforms[r, k:k + 1], temperature)[0]))
            if tokens[-1] in eos_ids:
                break
        all_tokens.append(tokens)
        all_states.append(states)
    width = max(len(t) for t in all_tokens)
    finished_width = width
    padded = torch.full((rows, finished_width), min(eos_ids), dtype=torch.long)
    state_tensor = torch.zeros(rows, finished_width, vocab_size)
    for r, (tokens, states) in enumerate(zip(all_tokens, all_states)):
        padded[r, : len(tokens)] = torch.tensor(tokens)
        state_tensor[r, : len(states)] = torch.stack(states)
    return padded, alive_mask(padded, eos_ids, include_current=False), state_tensor
