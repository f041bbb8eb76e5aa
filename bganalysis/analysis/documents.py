"""Analysis documents: prompts turned into token ids, with a teacher response each."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from bganalysis.rollout import ModelRunner, sample_continuation

log = logging.getLogger(__name__)


@dataclass
class AnalysisDocument:
    """One prompt with the teacher response that teacher-forced losses are measured on.

    `roles` (lab only) contains the true role of each response token.
    """

    doc_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_source: str  # "given" or "teacher"
    roles: list[str] | None = None
    states: list = field(default_factory=list, repr=False)  # lab states before each response token

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def seed_for(seed: int, doc_index: int, purpose: int) -> int:
    """Return a 63-bit seed for one document and purpose, independent of sharding and order."""
    return int(np.random.SeedSequence([seed, doc_index, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator_for(seed: int, doc_index: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, doc_index, purpose))


PURPOSE_RESPONSE, PURPOSE_ROLLOUT, PURPOSE_KAPPA, PURPOSE_WINDOW, PURPOSE_ACTIONS = 1, 2, 3, 4, 5


def encode_prompt(tokenizer, prompt: str, chat_template: bool, max_prompt_tokens: int) -> list[int]:
    """Token ids of a prompt; the chat template is applied when asked for and available.

    A prompt longer than `max_prompt_tokens` keeps its last tokens, with a warning.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt).input_ids
    ids = list(ids)
    if len(ids) > max_prompt_tokens:
        log.warning("prompt of %d tokens truncated from the left to %d", len(ids), max_prompt_tokens)
        ids = ids[-max_prompt_tokens:]
    return ids


def build_documents(rows: list[dict], tokenizer, teacher: ModelRunner, eos_ids: set[int], *,
                    chat_template: bool, max_prompt_tokens: int, max_new_tokens: int, seed: int,
                    temperature: float = 1.0, first_index: int = 0) -> list[AnalysisDocument]:
    """Tokenise prompts and attach a response: the given one, else one the teacher samples."""
    documents = []
    eos_id = tokenizer.eos_token_id
    for offset, row in enumerate(rows):
        index = first_index + offset
        prompt_ids = encode_prompt(tokenizer, row["prompt"], chat_template, max_prompt_tokens)
        if row.get("response"):
            response = tokenizer(row["response"], add_special_tokens=False).input_ids + [eos_id]
            source = "given"
        else:
            response = sample_teacher_response(teacher, prompt_ids, max_new_tokens, eos_ids,
                                               generator_for(seed, index, PURPOSE_RESPONSE), temperature)
            source = "teacher"
        documents.append(AnalysisDocument(row["id"], prompt_ids, response, source))
    return documents


def sample_teacher_response(teacher: ModelRunner, prompt_ids: list[int], max_new_tokens: int,
                            eos_ids: set[int], generator: torch.Generator, temperature: float = 1.0) -> list[int]:
    """Sample one teacher response after the prompt, cut after its first EOS.

    `temperature=0` takes the teacher's most likely token at every step (greedy).
    """
    teacher.encode_document(torch.tensor(prompt_ids))
    uniforms = torch.rand(1, max_new_tokens, generator=generator)
    tokens, _, _ = sample_continuation(teacher, len(prompt_ids), uniforms, eos_ids, temperature)
    response = []
    for token in tokens[0].tolist():
        response.append(token)
        if token in eos_ids:
            break
    return response


def attach_lab_roles(documents: list[AnalysisDocument], process) -> None:
    """Store each response token's true role and lab state (the teacher is the lab)."""
    from bganalysis.lab import grammar

    for doc in documents:
        states = process.states_along(doc.ids)
        prompt_length = len(doc.prompt_ids)
        doc.states = [states[prompt_length - 1 + i] for i in range(len(doc.response_ids))]
        doc.roles = [grammar.true_role(state) for state in doc.states]
