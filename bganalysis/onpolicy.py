"""On-policy sequences for mixed KD: the student writes some responses itself, as in GKD.

With `onpolicy_fraction` above 0, each sequence of a micro-batch is, with that
probability, replaced by the same prompt followed by a response the current student
samples. The teacher then scores the student's tokens and the loss at those positions
is the soft loss alone (λ = 1): the label of an on-policy token is the student's own
sample, so a hard loss there would only reinforce what the student already does.

The choice of rows and the sampling use a generator seeded by (seed, optimiser step,
micro-batch index, process rank), so a resumed run draws the same sequences as an
uninterrupted one.
"""

from __future__ import annotations

import inspect

import torch

from bganalysis.rollout import _output_cache as output_cache
from bganalysis.train_data import IGNORE_INDEX, Example, collate

ONPOLICY_KEY = "onpolicy"


def examples_from_batch(batch: dict) -> list[Example]:
    """Rebuild the examples of a collated batch (right-padded, targets shifted by one)."""
    examples = []
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        first_target = int((batch["targets"][row] != IGNORE_INDEX).nonzero()[0])
        examples.append(Example(ids=batch["input_ids"][row, :length].tolist(), prompt_length=first_target + 1))
    return examples


def step_generator(seed: int, step: int, micro_batch: int, rank: int) -> torch.Generator:
    """A CPU generator for one micro-batch, the same on every rerun of the run."""
    import numpy as np

    state = np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@torch.no_grad()
def student_responses(student, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                      eos_id: int, pad_id: int, generator: torch.Generator, vocab_size: int) -> list[list[int]]:
    """Sample one response per prompt from `student`; each ends at its first EOS (kept) or at max_new_tokens.

    Prompts are left-padded into one batch. Sampling uses inverse-CDF draws from
    `generator`, so the tokens do not depend on the global random state. Only the first
    `vocab_size` logits (the tokenizer's tokens) are sampled, never padded embedding rows.
    """
    device = next(student.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    uniforms = torch.rand((len(prompts), max_new_tokens), generator=generator)

    # transformers 5 renamed `past_key_values` to `cache`; older releases know only the first.
    cache_argument = "cache" if "cache" in inspect.signature(student.forward).parameters else "past_key_values"
    was_training = student.training
    student.eval()
    try:
        output = student(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        cache, logits = output_cache(output), output.logits[:, -1, :vocab_size]
        responses = [[] for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        for step in range(max_new_tokens):
            tokens = _draw(logits.float(), uniforms[:, step].to(device), temperature)
            for row in range(len(prompts)):
                if not finished[row]:
                    responses[row].append(int(tokens[row]))
            finished |= tokens.cpu() == eos_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
            positions = positions[:, -1:] + 1
            output = student(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, **{cache_argument: cache})
            cache, logits = output_cache(output), output.logits[:, -1, :vocab_size]
    finally:
        student.train(was_training)
    return responses


def _draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(logits / temperature); temperature 0 takes the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return index.clamp(max=logits.shape[-1] - 1)


def mix_onpolicy(batch: dict, student, config, generator: torch.Generator, eos_id: int, pad_id: int,
                 vocab_size: int, max_len: int) -> dict:
    """Return `batch` with a `config.onpolicy_fraction` share of rows rewritten by the student.

    The result is a new collated batch on the same device with an extra bool `[batch]`
    tensor under `ONPOLICY_KEY` marking the rewritten rows. Prompts are cut from the
    left so that prompt plus response fits `max_len`.
    """
    device = batch["input_ids"].device
    examples = examples_from_batch({key: value.cpu() for key, value in batch.items()})
    chosen = (torch.rand(len(examples), generator=generator) < config.onpolicy_fraction).tolist()
    rows = [row for row, pick in enumerate(chosen) if pick]
    if rows:
        budget = max(1, max_len - config.onpolicy_max_new_tokens)
        prompts = [examples[row].ids[: examples[row].prompt_length][-budget:] for row in rows]
        responses = student_responses(student, prompts, config.onpolicy_max_new_tokens, config.onpolicy_temperature,
                                      eos_id, pad_id, generator, vocab_size)
        for row, prompt, response in zip(rows, prompts, responses):
            examples[row] = Example(ids=prompt + response, prompt_length=len(prompt))
    mixed = collate(examples, pad_id)
    mixed[ONPOLICY_KEY] = torch.tensor(chosen, dtype=torch.bool)
    return {key: value.to(device) for key, value in mixed.items()}
