"""Bridge/Garden regions for training tokens, looked up from an analysis map by context.

`bganalysis analyze` writes `analysis/tokens.parquet` with one row per (document,
response position) and its region ("bridge", "garden" or "" for unlabelled). The
trainer samples its own documents, so a training token rarely has the same
(doc_id, position) as a map row. Instead, a training position takes the majority
region of the map rows that share its context: the token itself and up to
`CONTEXT_TOKENS` preceding response tokens. The longest context seen in the map wins
(backoff), and a token never seen in the map is middle (unlabelled).

The alternative, the majority region per token id alone, ignores that one token can
be a Bridge in one place and a Garden in another (a digit is a computed result in a
lab `calc` document and a free literal in a `prog` one). On the lab's true roles,
with tables built from 300 documents (seed 0) and read on 300 others (seed 1), the
token-id lookup recovers 75% of roles, one preceding token 90%, two 96%, and three or
more no further gain, hence `CONTEXT_TOKENS = 2`.

NOTE: this is still an approximation: a context the map never saw falls back to a
shorter one, and on real text two tokens of context rarely pin down the state.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch

from bganalysis.errors import UserError
from bganalysis.losses import IGNORE_INDEX
from bganalysis.weights import REGION_CODES, REGION_MIDDLE

CONTEXT_TOKENS = 2
REQUIRED_COLUMNS = ("doc_id", "position", "token_id", "region")
# Marks a context position before the first response token.
_RESPONSE_START = -1


class RegionMap:
    """Majority region codes keyed by (preceding response tokens..., token id), one table per context length."""

    def __init__(self, tables: list[dict[tuple[int, ...], int]], source: str):
        self.tables = tables
        self.source = source

    @classmethod
    def from_parquet(cls, path: str | Path, vocab_size: int) -> RegionMap:
        """Read `tokens.parquet` from `bganalysis analyze`; raise UserError for missing columns or foreign token ids."""
        import pandas as pd

        try:
            frame = pd.read_parquet(path, columns=list(REQUIRED_COLUMNS))
        except (OSError, ValueError, KeyError) as error:
            raise UserError(
                f"cannot read bridge_garden_map={str(path)!r} ({error}); pass the analysis/tokens.parquet "
                f"written by bganalysis analyze, with columns {', '.join(REQUIRED_COLUMNS)}"
            ) from None
        # tokens.parquet repeats every position once per analysed student.
        frame = frame.drop_duplicates(["doc_id", "position"])
        too_large = frame["token_id"] >= vocab_size
        if too_large.any():
            raise UserError(
                f"bridge_garden_map={str(path)!r} has token id {int(frame['token_id'][too_large].iloc[0])}, "
                f"outside this tokenizer's {vocab_size} tokens; use a map analysed with the training teacher's tokenizer"
            )
        documents = {}
        for doc_id, rows in frame.groupby("doc_id", sort=False):
            rows = rows.sort_values("position")
            documents[doc_id] = list(zip(rows["position"].tolist(), rows["token_id"].tolist(), rows["region"].tolist()))
        return cls.from_documents(documents.values(), source=str(path))

    @classmethod
    def from_documents(cls, documents, source: str = "rows") -> RegionMap:
        """Build the tables from documents, each a list of (position, token_id, region) sorted by position.

        A context that reaches past a gap in the positions is skipped, so only
        contexts that were observed whole are stored.
        """
        counts = [defaultdict(Counter) for _ in range(CONTEXT_TOKENS + 1)]
        for rows in documents:
            tokens = {int(position): int(token) for position, token, _ in rows}
            for position, token, region in rows:
                if region not in REGION_CODES:
                    raise UserError(f"map {source} has region {region!r}; valid regions: 'bridge', 'garden' and ''")
                code = REGION_CODES[region]
                for length in range(CONTEXT_TOKENS + 1):
                    context = _map_context(tokens, int(position), length)
                    if context is None:
                        break
                    counts[length][context + (int(token),)][code] += 1
        tables = [{key: _majority(counter) for key, counter in table.items()} for table in counts]
        return cls(tables, source)

    def lookup(self, targets: torch.Tensor) -> torch.Tensor:
        """Return region codes `[batch, seq]` (int64) for targets `[batch, seq]`; -100 positions get middle.

        The context of a target is the valid targets just before it in its row, which
        are the preceding response tokens because collate marks only the response.
        """
        codes = torch.full(targets.shape, REGION_MIDDLE, dtype=torch.long)
        for row, row_targets in enumerate(targets.tolist()):
            for column, token in enumerate(row_targets):
                if token == IGNORE_INDEX:
                    continue
                codes[row, column] = self._region(row_targets, column)
        return codes.to(targets.device)

    def _region(self, row_targets: list[int], column: int) -> int:
        token = row_targets[column]
        for length in range(CONTEXT_TOKENS, -1, -1):
            context = tuple(
                row_targets[index] if index >= 0 and row_targets[index] != IGNORE_INDEX else _RESPONSE_START
                for index in range(column - length, column)
            )
            code = self.tables[length].get(context + (token,))
            if code is not None:
                return code
        return REGION_MIDDLE


def _map_context(tokens: dict[int, int], position: int, length: int) -> tuple[int, ...] | None:
    """Return the `length` tokens before `position`, with response-start markers before position 0, or None at a gap."""
    context = []
    for index in range(position - length, position):
        if index < 0:
            context.append(_RESPONSE_START)
        elif index in tokens:
            context.append(tokens[index])
        else:
            return None
    return tuple(context)


def _majority(counter: Counter) -> int:
    """Return the most frequent code; ties go to the lowest code (middle, then bridge)."""
    return min(counter, key=lambda code: (-counter[code], code))
