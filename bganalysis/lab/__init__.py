"""The lab: small known stochastic processes with an exact teacher and exact kappa.

- `grammar`: the two generators (`calc` arithmetic derivations, `prog` small programs)
  as finite-state processes over words, with the true role of every position;
- `process`: exact next-token distributions over token ids;
- `teacher`: `LabTeacher`, the exact teacher as a Hugging Face causal LM;
- `tokenizer`: the word-level Hugging Face tokenizer;
- `exact`: exact loss-to-go and kappa by dynamic programming.

Importing this package registers the `bganalysis_lab` model type with the transformers
Auto classes, so a saved lab teacher loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import AutoConfig, AutoModelForCausalLM

from bganalysis.lab import grammar
from bganalysis.lab.exact import ExactLossToGo
from bganalysis.lab.process import LabProcess
from bganalysis.lab.teacher import LabConfig, LabTeacher
from bganalysis.lab.tokenizer import lab_tokenizer, vocabulary

AutoConfig.register(LabConfig.model_type, LabConfig, exist_ok=True)
AutoModelForCausalLM.register(LabConfig, LabTeacher, exist_ok=True)

__all__ = [
    "ExactLossToGo", "LabConfig", "LabDocument", "LabProcess", "LabTeacher",
    "is_lab_model", "lab_tokenizer", "sample_documents", "vocabulary",
]


@dataclass
class LabDocument:
    """One sampled lab document, split into prompt and response token ids.

    `prompt_ids` starts with `<bos>` and ends with `:`; `response_ids` ends with `<eos>`
    (unless the document hit the length cap). `roles[i]` is the true role of
    `response_ids[i]` ("bridge" or "garden"); `corrupt` records whether the teacher made a
    mistake (its floor) somewhere in the document.
    """

    task: str
    prompt_ids: list[int]
    response_ids: list[int]
    roles: list[str]
    corrupt: bool


def sample_documents(n: int, seed: int, floor: float = 1e-4, max_tokens: int = 256) -> list[LabDocument]:
    """Sample `n` documents from the lab teacher with a fixed seed (same seed, same documents)."""
    process = LabProcess(floor=floor)
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(n):
        ids, states = process.sample_document(rng, max_tokens=max_tokens)
        roles = [grammar.true_role(state) for state in states[: len(ids) - 1]]
        split = _prompt_length(roles)
        documents.append(LabDocument(
            task=states[1].task if len(states) > 1 else "start",
            prompt_ids=ids[:split],
            response_ids=ids[split:],
            roles=roles[split - 1:],
            corrupt=any(state.corrupt for state in states),
        ))
    return documents


def _prompt_length(roles: list[str]) -> int:
    # roles[i] belongs to ids[i + 1]; the prompt is <bos> plus every token with role "prompt".
    count = 0
    while count < len(roles) and roles[count] == "prompt":
        count += 1
    return count + 1


def is_lab_model(model) -> bool:
    return isinstance(model, LabTeacher)
