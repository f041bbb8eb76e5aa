"""Per-token details for the explorer: top-k next tokens, action loss-to-go, own continuations.

The analysis measures these anyway; this module keeps the small part of them that the
token map shows, and lays it out as two extra tables beside tokens.parquet:

- `analysis/next_tokens.parquet`: one row per (model, doc_id, position), model
  "teacher" or a student name: the K most likely next tokens under that model on the
  teacher-written prefix, with their probabilities;
- `analysis/continuations.parquet`: one row per (model, doc_id): the student's first
  own continuation from the prompt (the first RO sample), and the first step where it
  differs from the teacher response (-1 when it never does).

The per-action loss-to-go Q(s, a) lives in tokens.parquet itself (`action_ids`,
`action_q`, and `exact_action_q` on the lab), since it is one list per position.
Analyses written before these tables existed simply lack them; readers must cope.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

NEXT_TOKENS_K = 5  # next tokens kept per position and model (the explorer shows them)
TEACHER = "teacher"  # the model name of the teacher's rows in next_tokens.parquet


def top_next_tokens(logprobs: torch.Tensor, k: int = NEXT_TOKENS_K) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens at each state: (ids [L, k] int64, probabilities [L, k] float32)."""
    top = torch.topk(logprobs.float(), min(k, logprobs.shape[-1]), dim=-1)
    return top.indices.numpy().astype(np.int64), top.values.exp().numpy().astype(np.float32)


def first_continuation(tokens: torch.Tensor, alive: torch.Tensor) -> list[int]:
    """The first row of a sampled continuation, up to and including its EOS ([n, M] inputs)."""
    return tokens[0][alive[0]].tolist()


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where the sequences differ (a length difference counts); -1 when equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return -1 if len(a) == len(b) else min(len(a), len(b))


def next_token_frame(results, decode) -> pd.DataFrame | None:
    """next_tokens.parquet rows from the documents' results; None when no result kept them."""
    rows = []
    for result in results:
        kept = getattr(result, "next_tokens", None)
        if not kept:
            return None  # a shard saved before this table existed: write none rather than a partial one
        for model, (ids, probs) in [(TEACHER, kept["teacher"]), *kept["students"].items()]:
            for position in range(ids.shape[0]):
                rows.append({"model": model, "doc_id": result.doc.doc_id, "position": position,
                             "token_ids": ids[position].tolist(), "tokens": [decode(i) for i in ids[position]],
                             "probs": probs[position].tolist()})
    return pd.DataFrame(rows) if rows else None


def continuation_frame(results, decode) -> pd.DataFrame | None:
    """continuations.parquet rows from the documents' results; None when no result kept them."""
    rows = []
    for result in results:
        kept = getattr(result, "continuations", None)
        if not kept:
            return None
        for model, own in kept.items():
            rows.append({"model": model, "doc_id": result.doc.doc_id, "own_ids": own,
                         "own_tokens": [decode(i) for i in own],
                         "diverge_at": first_difference(own, result.doc.response_ids)})
    return pd.DataFrame(rows) if rows else None
