"""The rollout engine: every step-wise computation of the analysis goes through here.

A `ModelRunner` wraps one causal LM. It encodes a document once, keeps the KV cache,
and from any prefix of that document it can

- expand the prefix to n rows without re-running it (`rows_from_prefix`),
- feed one token per row and return the next-token log-probabilities (`step`),
- feed a block of tokens per row and return log-probabilities after each (`extend`).

Sampling uses inverse-CDF draws from uniforms given by the caller, so the batched engine
and the plain reference (`bganalysis.reference`) draw the same tokens from the same
uniforms, and the K forced actions of one position share their random numbers (common
random numbers, which cancel noise in the differences that kappa is made of).

Models without a usable KV cache (the lab teacher, or a cache layout this module does
not know) fall back to re-reading the whole row at every step; results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch

from bganalysis.losses import kl_from_logprobs


@dataclass
class Rows:
    """A batch of n rows that share a prefix: their tokens so far and the model's cache."""

    tokens: torch.Tensor  # [n, length] token ids, prefix included
    cache: object | None  # a transformers Cache over all tokens but the last, or None


class ModelRunner:
    """KV-cached incremental scoring for one causal LM (see the module docstring)."""

    def __init__(self, model, vocab_size: int, device: str | torch.device = "cpu"):
        self.model = model
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.use_cache = _supports_kv_cache(model)
        # transformers 5 renamed `past_key_values` to `cache`; older releases know only the first.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._document: torch.Tensor | None = None
        self._document_cache = None

    @torch.no_grad()
    def encode_document(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the model over a whole document once; return log-probs [length, vocab] fp32.

        Row i is the distribution of token i + 1 given tokens 0..i. The KV cache is
        kept for `rows_from_prefix`.
        """
        ids = ids.to(self.device)
        output = self.model(input_ids=ids[None], use_cache=self.use_cache)
        self._document = ids
        self._document_cache = _output_cache(output) if self.use_cache else None
        return self._logprobs(output.logits[0])

    def rows_from_prefix(self, prefix_length: int, n: int, whole: bool = False) -> Rows:
        """Return n rows holding the first `prefix_length` tokens of the encoded document.

        With a KV cache the rows carry the cache of the first `prefix_length - 1` tokens, so
        feeding the last prefix token (or a block starting with it) costs one step and
        returns the distribution after the prefix too. With `whole`, the cache covers the
        whole prefix, which saves that step for callers that append a block and need only
        the distributions after its tokens (`extend` without `keep`, never with `block=None`).
        """
        tokens = self._document[:prefix_length].expand(n, prefix_length)
        cache = None
        if self.use_cache:
            cache = _slice_cache(self._document_cache, prefix_length if whole else prefix_length - 1, n)
        return Rows(tokens=tokens.clone(), cache=cache)

    @torch.no_grad()
    def step(self, rows: Rows, next_tokens: torch.Tensor | None) -> torch.Tensor:
        """Append `next_tokens` [n] (or nothing) to the rows; return log-probs [n, vocab].

        The returned distribution is the one after the last token of the rows.
        """
        if next_tokens is not None:
            rows.tokens = torch.cat([rows.tokens, next_tokens[:, None].to(rows.tokens)], dim=1)
        return self.extend(rows, None)[:, -1]

    @torch.no_grad()
    def extend(self, rows: Rows, block: torch.Tensor | None, keep: int | None = None) -> torch.Tensor:
        """Append `block` [n, h] to the rows; return log-probs after each new token [n, h, vocab].

        With `block=None`, return the distribution after the rows as they are, [n, 1, vocab].
        `keep=h + 1` also returns the distribution before the block (the state the first
        block token was written in), as the first of h + 1 entries.
        """
        if block is not None:
            rows.tokens = torch.cat([rows.tokens, block.to(rows.tokens)], dim=1)
        wanted = keep or (block.shape[1] if block is not None else 1)

        if not self.use_cache:
            output = self.model(input_ids=rows.tokens, logits_to_keep=wanted)
            return self._logprobs(output.logits[:, -wanted:])

        # The cache lacks the last prefix token too, so feed it with the block.
        fed = rows.tokens.shape[1] - rows.cache.get_seq_length()
        output = self.model(input_ids=rows.tokens[:, -fed:], use_cache=True, **{self._cache_argument: rows.cache})
        rows.cache = _output_cache(output)
        return self._logprobs(output.logits[:, -wanted:])

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)


def _supports_kv_cache(model) -> bool:
    from bganalysis.lab import is_lab_model

    return not is_lab_model(model) and bool(getattr(model.config, "use_cache", True) is not False)


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _slice_cache(cache, length: int, n: int):
    """Return a new DynamicCache with the first `length` positions, repeated for n rows."""
    from transformers import DynamicCache

    layers = []
    for layer in cache.layers:
        keys = layer.keys[:, :, :length].expand(n, -1, -1, -1).contiguous()
        values = layer.values[:, :, :length].expand(n, -1, -1, -1).contiguous()
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


def sample_from_logprobs(logprobs: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                         head: int = 0) -> torch.Tensor:
    """Draw one token per row by inverse CDF: logprobs [n, vocab], uniforms [n] in [0, 1).

    Using the caller's uniforms makes the draw reproducible and shared across engines.
    `temperature=0` returns the most likely token (ties to the smaller id).

    The CDF runs over the vocabulary in id order, or with `head > 0` over the `head` most
    likely tokens first (most likely first, ties to the smaller id), then the rest in id
    order. Each token keeps its probability either way. The probability order makes
    stratified uniforms stratify the likely tokens: u in [0, p_max) always draws the most
    likely token.
    """
    if temperature == 0:
        return torch.argmax(logprobs, dim=-1)
    scaled = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, dim=-1)
    probs = scaled.double().exp()
    targets = uniforms.double()[:, None] * probs.sum(dim=-1, keepdim=True)
    if head <= 0:
        return _search(torch.cumsum(probs, dim=-1), targets)

    head_ids = _head_tokens(scaled, head)
    head_cumulative = torch.cumsum(probs.gather(-1, head_ids), dim=-1)
    in_head = targets < head_cumulative[:, -1:]
    head_pick = head_ids.gather(-1, _search(head_cumulative, targets)[:, None])[:, 0]
    rest_cumulative = torch.cumsum(probs.scatter(-1, head_ids, 0.0), dim=-1)
    rest_pick = _search(rest_cumulative, targets - head_cumulative[:, -1:])
    return torch.where(in_head[:, 0], head_pick, rest_pick)


def _search(cumulative: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of `cumulative` [n, m] above `targets` [n, 1], clamped to m - 1."""
    return torch.searchsorted(cumulative, targets, right=True)[:, 0].clamp_(max=cumulative.shape[-1] - 1)


def _head_tokens(logprobs: torch.Tensor, head: int) -> torch.Tensor:
    """The `head` most likely token ids per row [n, head], most likely first, ties to the smaller id.

    `topk` is O(vocab) where a full sort of 49,152 tokens costs 20 ms a row on one CPU
    thread. A key lowered by 1e-10 nats per id makes every key distinct, so ties go to
    the smaller id in a batch and in a single row alike. Tokens closer than that in log
    probability may swap places, which leaves every token's probability unchanged.
    """
    head = min(head, logprobs.shape[-1])
    ids = torch.arange(logprobs.shape[-1], device=logprobs.device, dtype=torch.float64)
    return torch.topk(logprobs.double() - 1e-10 * ids, head, dim=-1).indices


@dataclass
class Sample:
    """Tokens a model wrote after a prefix, with the losses of every student at each state."""

    tokens: torch.Tensor  # [n, h]
    alive: torch.Tensor  # [n, h] bool: state k is counted (no EOS written before it)
    losses: dict[str, torch.Tensor]  # student name -> [n, h] per-state loss (nats), 0 where not alive


def alive_mask(tokens: torch.Tensor, eos_ids: set[int], include_current: bool) -> torch.Tensor:
    """[n, h] bool: whether the state at column k counts, given the EOS tokens written.

    With `include_current`, column k is the state after tokens[:, k] (rollouts after a
    forced action), so an EOS at k ends it; otherwise it is the state before tokens[:, k]
    (a model's own continuation), which counts unless an EOS came earlier.
    """
    is_eos = torch.isin(tokens, torch.tensor(sorted(eos_ids), device=tokens.device))
    ended = torch.cumsum(is_eos.long(), dim=1)
    if not include_current:
        ended = ended - is_eos.long()
    return ended == 0


def rollouts_after_actions(
    teacher: ModelRunner,
    students: dict[str, ModelRunner],
    prefix_length: int,
    actions: torch.Tensor,
    uniforms: torch.Tensor,
    eos_ids: set[int],
    head: int = 0,
) -> Sample:
    """Force each action after the prefix, let the teacher continue, score every student.

    `actions` [K] token ids; `uniforms` [K, R, H - 1] in [0, 1) drive the teacher's H - 1
    sampled tokens for R rollouts per action (`head` as in `sample_from_logprobs`).
    Returns losses at the H states after each forced action, rows ordered action-major
    ([K * R, H]). `rollouts_after_tokens` takes a different number of rollouts per action.
    """
    num_actions, rollouts, draws = uniforms.shape
    forced = actions.repeat_interleave(rollouts)
    return rollouts_after_tokens(teacher, students, prefix_length, forced, uniforms.reshape(-1, draws), eos_ids, head)


def rollouts_after_tokens(
    teacher: ModelRunner,
    students: dict[str, ModelRunner],
    prefix_length: int,
    forced: torch.Tensor,
    uniforms: torch.Tensor,
    eos_ids: set[int],
    head: int = 0,
) -> Sample:
    """Force token `forced[i]` [n] after the prefix in row i, let the teacher continue, score every student.

    `uniforms` [n, H - 1] drive the teacher's H - 1 sampled tokens. The n rows run as one
    batch from the shared prefix cache. Returns losses at the H states after the forced
    token ([n, H]).
    """
    n, draws = uniforms.shape
    rows = teacher.rows_from_prefix(prefix_length, n, whole=True)
    tokens = forced[:, None]
    teacher_logprobs = [teacher.extend(rows, tokens)[:, -1]]
    for k in range(draws):
        next_tokens = sample_from_logprobs(teacher_logprobs[-1], uniforms[:, k], head=head)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        teacher_logprobs.append(teacher.step(rows, next_tokens))
    teacher_logprobs = torch.stack(teacher_logprobs, dim=1)  # [n, H, V]

    alive = alive_mask(tokens, eos_ids, include_current=True)
    losses = {}
    for name, runner in students.items():
        student_rows = runner.rows_from_prefix(prefix_length, n, whole=True)
        student_logprobs = runner.extend(student_rows, tokens)  # the states after each of the H tokens
        kl = kl_from_logprobs(teacher_logprobs, student_logprobs)
        losses[name] = torch.where(alive, kl, torch.zeros_like(kl))
    return Sample(tokens=tokens, alive=alive, losses=losses)


def sample_continuation(
    runner: ModelRunner,
    prefix_length: int,
    uniforms: torch.Tensor,
    eos_ids: set[int],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Let the runner's model write after the prefix: uniforms [n, max_new] drive n rows.

    Returns (tokens [n, max_new], alive [n, max_new], the model's log-probs at each state
    [n, max_new, vocab]). Stops early once every row has written an EOS.
    """
    n, max_new = uniforms.shape
    rows = runner.rows_from_prefix(prefix_length, n)
    logprobs = runner.extend(rows, None)[:, -1]
    tokens, states = [], []
    finished = torch.zeros(n, dtype=torch.bool)
    for k in range(max_new):
        states.append(logprobs)
        next_tokens = sample_from_logprobs(logprobs, uniforms[:, k], temperature)
        tokens.append(next_tokens)
        finished |= torch.isin(next_tokens, torch.tensor(sorted(eos_ids)))
        if bool(finished.all()) or k == max_new - 1:
            break
        logprobs = runner.step(rows, next_tokens)
    tokens = torch.stack(tokens, dim=1)
    return tokens, alive_mask(tokens, eos_ids, include_current=False), torch.stack(states, dim=1)
