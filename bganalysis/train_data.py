"""Training examples for the trainer: tokenising, truncating, batching and masking.

An example is a prompt followed by a teacher-written response. The loss covers the
response tokens, including the final EOS, and never the prompt or the padding.
torch is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from bganalysis.errors import UserError
from bganalysis.io import read_prompts

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    """Token ids of one training sequence; `ids[prompt_length:]` is the response."""

    ids: list[int]
    prompt_length: int


def lab_examples(num_docs: int, seed: int, max_len: int) -> list[Example]:
    """Sample `num_docs` lab documents with `seed` and return them as examples."""
    from bganalysis.lab import sample_documents

    documents = sample_documents(num_docs, seed)
    pairs = [(document.prompt_ids, document.response_ids) for document in documents]
    return _truncate_all(pairs, max_len, source="lab documents")


def jsonl_examples(path: str, tokenizer, max_len: int, chat_template: bool) -> list[Example]:
    """Tokenise a JSONL file of `{"prompt", "response"}` rows into examples.

    The prompt goes through the tokenizer's chat template (one user turn plus the
    generation prompt) when `chat_template` is true and the tokenizer has one, else
    through the plain tokenizer with its special tokens (BOS for most models). The
    response is tokenised without special tokens and ends with the EOS token.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no EOS token, so responses cannot end with one; use a tokenizer that sets eos_token")
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    logger.info("tokenising %s (%s)", path, "with the chat template" if use_template else "without a chat template")

    pairs = []
    for row in read_prompts(path):
        if row["response"] is None:
            raise UserError(
                f"{path}: row {row['id']} has no \"response\"; training needs teacher-written "
                "responses, so add a \"response\" string to every line"
            )
        prompt_ids = _prompt_ids(tokenizer, row["prompt"], use_template)
        if not prompt_ids:
            raise UserError(
                f"{path}: row {row['id']} has an empty prompt and the tokenizer adds no BOS token, so nothing "
                "precedes the first response token to predict it from; give the row a non-empty prompt"
            )
        pairs.append((prompt_ids, _response_ids(tokenizer, row["response"], eos_id)))
    return _truncate_all(pairs, max_len, source=str(path))


def _prompt_ids(tokenizer, prompt: str, use_template: bool) -> list[int]:
    if use_template:
        messages = [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _response_ids(tokenizer, response: str, eos_id: int) -> list[int]:
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos_id]


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[Example, str | None]:
    """Fit a prompt and response into `max_len` tokens; return the example and what was cut.

    The prompt loses tokens from its left (the start of a long context matters least to
    the next token). At least one prompt token is kept, because the first response token
    is predicted from the position before it. If the response alone still does not fit,
    its end is cut, and then the example has no EOS. The second value is None, "prompt"
    or "response".
    """
    if not prompt_ids:
        raise ValueError("an example needs at least one prompt token (BOS at least) to predict its first response token")
    if len(prompt_ids) + len(response_ids) <= max_len:
        return Example(prompt_ids + response_ids, len(prompt_ids)), None

    keep = max(max_len - len(response_ids), 1)
    prompt_ids = prompt_ids[-keep:]
    if keep + len(response_ids) <= max_len:
        return Example(prompt_ids + response_ids, keep), "prompt"
    return Example(prompt_ids + response_ids[: max_len - keep], keep), "response"


def _truncate_all(pairs: list[tuple[list[int], list[int]]], max_len: int, source: str) -> list[Example]:
    examples = []
    cut = {"prompt": 0, "response": 0}
    for prompt_ids, response_ids in pairs:
        example, part = truncate(prompt_ids, response_ids, max_len)
        examples.append(example)
        if part is not None:
            cut[part] += 1
    if cut["prompt"]:
        logger.warning("%s: %d of %d prompts cut from the left to fit max_len=%d", source, cut["prompt"], len(pairs), max_len)
    if cut["response"]:
        logger.warning(
            "%s: %d of %d responses cut at the end (and so lost their EOS) to fit max_len=%d; raise max_len",
            source, cut["response"], len(pairs), max_len,
        )
    return examples


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad examples into tensors for one forward pass.

    Returns `input_ids` and `attention_mask` `[batch, seq]`, and `targets` `[batch, seq]`
    already shifted: `targets[b, t]` is the token that position t predicts,
    `input_ids[b, t + 1]`, when that token is in the response, else -100. Padding is
    masked by the attention mask and by -100, never by comparing ids with `pad_id`, so
    padding with the EOS id is safe.
    """
    import torch

    length = max(len(example.ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.ids)
        input_ids[row, :size] = torch.tensor(example.ids)
        attention_mask[row, :size] = 1
        # Position t predicts token t + 1; the first response token is predicted at prompt_length - 1.
        targets[row, example.prompt_length - 1 : size - 1] = input_ids[row, example.prompt_length : size]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def step_batches(examples: list[Example], batch_size: int, grad_accum: int, seed: int) -> Iterator[list[list[Example]]]:
    """Yield, forever, one optimiser step's micro-batches: `grad_accum` lists of `batch_size` examples.

    Examples are drawn in a new random order every epoch from a generator seeded with
    `seed`, so a run is reproducible. An epoch boundary may fall inside a step.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        step = []
        for _ in range(grad_accum):
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = torch.randperm(len(examples), generator=generator).tolist()
                batch.append(examples[order.pop()])
            step.append(batch)
        yield step
