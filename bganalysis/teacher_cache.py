"""Offline teacher signal: the teacher's top-k log-probabilities per response token, plus the tail mass.

`build_teacher_cache` runs the teacher once over the training examples and writes, for
every response position (where `collate` gives a target other than -100):

- `topk_ids` int32 `[rows, k]`: the k most likely tokens, most likely first;
- `topk_logprobs` float32 `[rows, k]`: their log-probabilities under
  softmax(teacher_logits / loss_temperature), over the tokenizer's `len(tokenizer)` real
  tokens only (padded output columns are dropped, as in `losses.align_vocab`);
- `tail_logprob` float32 `[rows]`: log of the remaining mass, log(1 - sum of the top-k
  probabilities), computed as a logsumexp over the other tokens so that a tiny tail keeps
  its precision. It is -inf when k equals the vocabulary size.

A cache folder holds `shard-NNNNN.safetensors` files of such rows (k·8 + 4 bytes a token)
and `manifest.json`, which records the settings and maps each example's key (a hash of
its token ids and prompt length) to its shard, first row and row count. Training then
reads the rows with `TeacherCache.collate` instead of running the teacher;
`cached_loss.cached_token_losses` is the loss on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.io import atomic_write_bytes, atomic_write_json
from bganalysis.train_data import IGNORE_INDEX, Example, collate

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 65536
_ROW_CHUNK = 1024  # rows of [rows, vocab] float32 scratch at a time when taking the top-k


def example_key(example: Example) -> str:
    """Return the cache key of an example: a hash of its prompt length and token ids."""
    digest = hashlib.sha256(f"{example.prompt_length}:".encode())
    digest.update(",".join(map(str, example.ids)).encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Return a hash of the tokenizer's token-to-id map, which two tokenizers share only if they agree."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda pair: pair[1])
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def topk_with_tail(logits, k: int, temperature: float):
    """Return the top-k token ids, their log-probabilities and the log tail mass of some rows.

    `logits` is `[rows, vocab]` (already cut to the real vocabulary); the results are
    int64 `[rows, k]`, float32 `[rows, k]` and float32 `[rows]`, at softmax(logits / temperature).
    """
    import torch
    import torch.nn.functional as F

    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, top.indices, float("-inf"))
    return top.indices, top.values, torch.logsumexp(rest, dim=-1)


def build_teacher_cache(
    teacher,
    tokenizer,
    examples: list[Example],
    out: str | Path,
    k: int,
    loss_temperature: float = 1.0,
    batch_size: int = 8,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    device=None,
    teacher_name: str | None = None,
) -> Path:
    """Run `teacher` over `examples` and write the top-k cache to folder `out`; return `out`.

    Examples are grouped in order into shards of about `shard_tokens` response tokens.
    A rerun with the same settings and examples skips every shard already written, so an
    interrupted build resumes. `device` (None: where the teacher is) is where the teacher
    runs. Raises UserError for k outside [1, vocabulary size] and other bad settings.
    """
    import torch
    from tqdm.auto import tqdm

    vocab_size = len(tokenizer)
    _check_build_settings(teacher, k, vocab_size, loss_temperature, batch_size, shard_tokens)
    if device is not None:
        teacher = teacher.to(device)
    teacher.eval()
    device = next(teacher.parameters()).device
    settings = {
        "format": CACHE_FORMAT, "k": k, "vocab_size": vocab_size, "loss_temperature": float(loss_temperature),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "teacher": teacher_name or getattr(teacher, "name_or_path", "") or type(teacher).__name__,
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unique = {example_key(example): example for example in examples}
    shards = _plan_shards(unique, shard_tokens)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # the temporary file of a shard whose write a kill cut off
        stale.unlink()
    index: dict[str, list[int]] = {}
    total = sum(len(example.ids) - example.prompt_length for example in unique.values())
    with tqdm(total=total, desc="cache teacher top-k", unit="token", disable=None) as progress:
        for number, keys in enumerate(shards):
            path = out / f"shard-{number:05d}.safetensors"
            offsets = _finished_shard(path, settings, keys)
            if offsets is None:
                with torch.no_grad():
                    offsets = _write_shard(path, teacher, [unique[key] for key in keys], keys, settings, pad_id,
                                           batch_size, device)
            else:
                logger.info("%s is complete; skipping it", path.name)
            for key in keys:
                index[key] = [number, *offsets[key]]
            progress.update(sum(offsets[key][1] for key in keys))

    atomic_write_json(out / MANIFEST, {**settings, "shards": len(shards), "examples": index})
    logger.info("wrote the teacher cache %s: %d examples, %d tokens, %d shards, k=%d", out, len(index), total, len(shards), k)
    return out


def _check_build_settings(teacher, k, vocab_size, loss_temperature, batch_size, shard_tokens) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise UserError(f"invalid k={k!r}: the cache keeps the top k tokens of a vocabulary of {vocab_size}, "
                        f"so k must be a whole number from 1 to {vocab_size}; pass a k in that range")
    if not (isinstance(loss_temperature, int | float) and math.isfinite(loss_temperature) and loss_temperature > 0):
        raise UserError(f"invalid loss_temperature={loss_temperature!r}: must be a number > 0")
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"invalid {name}={value!r}: must be a whole number >= 1")
    width = getattr(teacher.config, "vocab_size", None)
    if width is not None and width < vocab_size:
        raise UserError(f"the teacher scores {width} tokens but the tokenizer has {vocab_size}; "
                        "pass the tokenizer the teacher was built with")


def _plan_shards(unique: dict[str, Example], shard_tokens: int) -> list[list[str]]:
    """Split the example keys, in order, into shards of at least `shard_tokens` response tokens (the last may be smaller)."""
    shards, current, tokens = [], [], 0
    for key, example in unique.items():
        current.append(key)
        tokens += len(example.ids) - example.prompt_length
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    if current:
        shards.append(current)
    return shards


def _finished_shard(path: Path, settings: dict, keys: list[str]) -> dict | None:
    """Return the offsets stored in an existing shard written with these settings and keys, else None."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if metadata.get("settings") != json.dumps(settings, sort_keys=True):
        return None
    offsets = json.loads(metadata.get("offsets", "{}"))
    return offsets if list(offsets) == keys else None


def _write_shard(path, teacher, examples, keys, settings, pad_id, batch_size, device) -> dict:
    """Run the teacher over one shard's examples and write the shard; return key -> [first row, rows]."""
    import torch
    from safetensors.torch import save

    ids, logprobs, tails = [], [], []
    offsets, rows = {}, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits[..., :settings["vocab_size"]]
        for row, key in enumerate(keys[start:start + batch_size]):
            valid = (batch["targets"][row] != IGNORE_INDEX).nonzero().squeeze(1).to(device)
            for chunk in valid.split(_ROW_CHUNK):
                top_ids, top_logprobs, tail = topk_with_tail(logits[row, chunk], settings["k"], settings["loss_temperature"])
                ids.append(top_ids.to(torch.int32).cpu())
                logprobs.append(top_logprobs.cpu())
                tails.append(tail.cpu())
            offsets[key] = [rows, int(valid.numel())]
            rows += int(valid.numel())

    k = settings["k"]
    tensors = {
        "topk_ids": torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32),
        "topk_logprobs": torch.cat(logprobs) if logprobs else torch.zeros(0, k),
        "tail_logprob": torch.cat(tails) if tails else torch.zeros(0),
    }
    metadata = {"settings": json.dumps(settings, sort_keys=True), "offsets": json.dumps(offsets)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return offsets


class TeacherCache:
    """A teacher top-k cache folder opened for reading; `collate` adds its rows to a batch."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.k: int = manifest["k"]
        self.vocab_size: int = manifest["vocab_size"]
        self.loss_temperature: float = manifest["loss_temperature"]
        self._handles: dict[int, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        """Open the cache folder `path`; raise UserError when it is not a complete cache."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path} not found: {path} is not a finished teacher cache; "
                            "build it (or finish building it) with bganalysis cache-teacher --out " + str(path))
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT:
            raise UserError(f"{manifest_path}: cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}; "
                            "rebuild the cache with this version of bganalysis cache-teacher")
        missing = [n for n in range(manifest["shards"]) if not (path / f"shard-{n:05d}.safetensors").is_file()]
        if missing:
            raise UserError(f"{path}: shard {missing[0]:05d} is missing; rerun bganalysis cache-teacher to write it")
        return cls(path, manifest)

    def check_compatible(self, tokenizer, loss_temperature: float) -> None:
        """Raise UserError unless the cache was built with this tokenizer and loss temperature."""
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != self.manifest["tokenizer_fingerprint"] or len(tokenizer) != self.vocab_size:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise UserError(
                f"the teacher cache {self.path} was built with tokenizer {self.manifest['tokenizer']} "
                f"({self.vocab_size} tokens), not {name} ({len(tokenizer)} tokens); "
                "rebuild the cache with the training tokenizer"
            )
        if float(loss_temperature) != self.loss_temperature:
            raise UserError(
                f"the teacher cache {self.path} holds log-probabilities at loss_temperature={self.loss_temperature:g}, "
                f"but training uses loss_temperature={loss_temperature:g}; set loss_temperature to "
                f"{self.loss_temperature:g} or rebuild the cache with --loss-temperature {loss_temperature:g}"
            )

    def rows(self, example: Example):
        """Return the cached (topk_ids int64 `[n, k]`, topk_logprobs `[n, k]`, tail_logprob `[n]`) of one example."""
        entry = self.manifest["examples"].get(example_key(example))
        if entry is None:
            raise UserError(
                f"an example of {len(example.ids)} tokens (prompt {example.prompt_length}) is not in the teacher "
                f"cache {self.path}; rebuild the cache for this data with bganalysis cache-teacher and the same "
                "data, max_len, num_docs and seed as training"
            )
        shard, first, count = entry
        handle = self._shard(shard)
        return (
            handle.get_slice("topk_ids")[first:first + count].long(),
            handle.get_slice("topk_logprobs")[first:first + count],
            handle.get_slice("tail_logprob")[first:first + count],
        )

    def collate(self, examples: list[Example], pad_id: int) -> dict:
        """Return `train_data.collate` of the examples plus the cached teacher rows aligned with `targets`.

        Added: `teacher_topk_ids` int64 `[batch, seq, k]`, `teacher_topk_logprobs` float32
        `[batch, seq, k]` and `teacher_tail_logprob` float32 `[batch, seq]`. Positions whose
        target is -100 hold a valid point mass (ids 0..k-1, log-probabilities 0 then -inf,
        tail -inf), so code that reads them by mistake gets finite values, not NaN.
        """
        import torch

        batch = collate(examples, pad_id)
        size, length = batch["targets"].shape
        ids = torch.arange(self.k).expand(size, length, self.k).clone()
        logprobs = torch.full((size, length, self.k), float("-inf"))
        logprobs[..., 0] = 0.0
        tails = torch.full((size, length), float("-inf"))
        for row, example in enumerate(examples):
            top_ids, top_logprobs, tail = self.rows(example)
            first = example.prompt_length - 1
            ids[row, first:first + len(tail)] = top_ids
            logprobs[row, first:first + len(tail)] = top_logprobs
            tails[row, first:first + len(tail)] = tail
        batch.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, teacher_tail_logprob=tails)
        return batch

    def _shard(self, number: int):
        from safetensors import safe_open

        if number not in self._handles:
            self._handles[number] = safe_open(str(self.path / f"shard-{number:05d}.safetensors"), framework="pt")
        return self._handles[number]
