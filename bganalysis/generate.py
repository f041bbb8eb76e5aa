"""`bganalysis generate`: sample teacher responses to a prompt set, as hard labels for training.

The output is JSONL with one row per (prompt, sample): `{"id", "prompt", "response",
"sample", "finish_reason", "response_tokens"}`, which `bganalysis train --data FILE`
reads as it is. A sidecar `FILE.meta.json` stores the sampling settings.

Seeds and batching: every (prompt, sample) pair gets its own `torch.Generator`, seeded
from (seed, prompt index in the file, sample number). Batches run through HF
`model.generate` with greedy search and `RowSampler`, a logits processor. At each step
`RowSampler` draws one uniform per row from that row's generator, picks the token by
inverse CDF, and leaves only that token's score finite. So a response does not depend
on --batch-size, on which rows share a batch, or on a resume point. The
alternative, HF's `do_sample=True`, draws every row from the global torch RNG, so a
response would change with the batch size. NOTE: the logits of a left-padded row can
differ from the unpadded ones in the last float bits, and such a difference can flip a
sampled token when the uniform falls within that margin of a CDF step. The output is
identical across batch sizes in the tests, but it is not guaranteed to be. A different
--device or dtype changes the logits too.

Resuming: rows are appended after each batch (flush and fsync). On restart, the
(id, sample) pairs already in the file are skipped, and a last line cut off by a kill is
dropped. A resumed file equals the one a single run writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from bganalysis.errors import UserError
from bganalysis.io import atomic_write_json, drop_cut_off_line, read_prompts

log = logging.getLogger(__name__)

# Settings that change the responses, so a resumed run must use the same values.
COMPARED_SETTINGS = ("teacher", "prompts", "prompts_sha256", "temperature", "top_p", "max_new_tokens",
                     "seed", "chat_template", "samples_per_prompt", "max_prompt_tokens")


@dataclass
class GenerateConfig:
    """Settings of one `generate` run, validated at construction (UserError names the flag)."""

    teacher: str
    out: str
    prompts: str | None = None  # JSONL or .jsonl.gz; None with teacher "lab" samples lab prompts
    lab_prompts: int = 100
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling temperature, 0 for greedy
    top_p: float = 1.0
    samples_per_prompt: int = 1
    batch_size: int = 8
    seed: int = 0
    chat_template: bool = True
    max_prompt_tokens: int = 1024
    device: str = "cpu"
    limit: int | None = None
    force: bool = False

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("samples_per_prompt", self.samples_per_prompt >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, "an integer >= 1"),
            ("lab_prompts", self.lab_prompts >= 1, "an integer >= 1"),
            ("limit", self.limit is None or self.limit >= 1, "an integer >= 1"),
            ("seed", self.seed >= 0, "an integer >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is invalid: it must be {rule}")
        if self.prompts is None and self.teacher != "lab":
            raise UserError("--prompts is missing; pass a JSONL file of {\"prompt\": ...} rows (only --teacher lab can sample its own prompts)")
        if Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a folder; pass a file path such as {Path(self.out) / 'responses.jsonl'}")


@dataclass
class Job:
    """One response to write: prompt `index` in the prompt set, sample number `sample`."""

    index: int
    row: dict
    sample: int
    prompt_ids: list[int]


class RowSampler(LogitsProcessor):
    """Sample each row's next token from its own generator and keep only that token.

    Applies the sampling temperature and top-p to `scores` [batch, vocab], draws one
    uniform per row from `generators[row]` and picks the token by inverse CDF. The
    returned scores are 0 at that token and -inf elsewhere, so greedy search takes it.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(cdf.device)
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)
        # right=True takes the first token whose CDF exceeds the target, so never a zero-probability token.
        tokens = torch.searchsorted(cdf, targets, right=True).clamp(max=cdf.shape[1] - 1)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """Return a 63-bit seed for one (prompt, sample) pair, independent of batching and order."""
    return int(np.random.SeedSequence([seed, prompt_index, sample]).generate_state(1, dtype=np.uint64)[0] >> 1)


def run_generate(config: GenerateConfig) -> Path:
    """Write the teacher's responses for every pending (prompt, sample) pair; return the output path."""
    out = Path(config.out)
    rows = _read_prompt_rows(config)
    settings = _settings(config)
    log.info("generate: %d prompts x %d samples -> %s; settings %s; device %s, batch size %d",
             len(rows), config.samples_per_prompt, out, json.dumps(settings), config.device, config.batch_size)

    fresh = _check_output(out, settings, config)
    model, tokenizer = _load_teacher(config)
    done = set() if fresh else _finished_pairs(out)
    jobs = _pending_jobs(rows, done, tokenizer, config, _prompt_limit(model, config))
    if fresh:
        _start_output(out, settings, config)  # after loading and tokenising, so bad input leaves no meta file
    log.info("%d responses already in %s, %d to generate", len(done), out, len(jobs))
    _generate_all(model, tokenizer, jobs, out, config)
    return out


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


# --- prompts and settings ---------------------------------------------------------------


def _read_prompt_rows(config: GenerateConfig) -> list[dict]:
    if config.prompts is not None:
        return read_prompts(config.prompts, limit=config.limit)
    from bganalysis.analysis.setup import lab_prompt_rows

    count = config.lab_prompts if config.limit is None else min(config.limit, config.lab_prompts)
    return lab_prompt_rows(count, config.seed)


def _settings(config: GenerateConfig) -> dict:
    teacher = config.teacher
    if teacher != "lab" and Path(teacher).expanduser().is_dir():
        teacher = str(Path(teacher).expanduser().resolve())
    if config.prompts is None:
        prompts, digest = "lab", None  # lab prompts follow from the seed
    else:
        prompts = str(Path(config.prompts).resolve())
        digest = hashlib.sha256(Path(config.prompts).read_bytes()).hexdigest()
    return {
        "teacher": teacher, "prompts": prompts, "prompts_sha256": digest,
        "temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
        "seed": config.seed, "chat_template": config.chat_template,
        "samples_per_prompt": config.samples_per_prompt, "max_prompt_tokens": config.max_prompt_tokens,
    }


# --- the output file ---------------------------------------------------------------------


def _check_output(out: Path, settings: dict, config: GenerateConfig) -> bool:
    """Return True to start `out` over, False to resume it; raise UserError if neither is allowed."""
    meta = meta_path(out)
    if config.force:
        return True
    if meta.is_file():
        _check_same_settings(meta, settings, out)
        return False
    if out.exists() and out.stat().st_size > 0:
        raise UserError(f"--out {out} exists but {meta.name} is missing, so it was not written by generate "
                        "with known settings; pass --force to overwrite it or choose another --out")
    return True


def _start_output(out: Path, settings: dict, config: GenerateConfig) -> None:
    """Delete an earlier `out` and write the meta file of this run."""
    from bganalysis.provenance import provenance

    if out.exists():
        out.unlink()
    atomic_write_json(meta_path(out), {"settings": settings, "device": config.device,
                                       "batch_size": config.batch_size, "provenance": provenance()})


def _check_same_settings(meta: Path, settings: dict, out: Path) -> None:
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{meta} is not a valid generate meta file ({error}); pass --force to start {out} over") from None
    changed = [f"{name} ({saved.get(name)!r} -> {settings[name]!r})"
               for name in COMPARED_SETTINGS if saved.get(name) != settings[name]]
    if changed:
        raise UserError(f"{out} was generated with other settings: {', '.join(changed)}; rerun with the saved "
                        "settings to resume, pass --force to start over, or choose another --out")


def _finished_pairs(out: Path) -> set[tuple[str, int]]:
    """Return the (id, sample) pairs in `out`, after dropping a cut-off last line."""
    if not out.is_file():
        return set()
    lines = drop_cut_off_line(out).split(b"\n")[:-1]
    done = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((str(row["id"]), int(row["sample"])))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{out}:{number}: not a generate output row (malformed JSON or no \"id\"/\"sample\"); "
                            "fix or delete the line, or pass --force to start over") from None
    return done


def _append_rows(handle, rows: list[dict]) -> None:
    handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


# --- the teacher and the jobs ---------------------------------------------------------


def _load_teacher(config: GenerateConfig):
    if config.teacher == "lab":
        from bganalysis.lab import LabTeacher, lab_tokenizer
        from bganalysis.models import _parse_device

        return LabTeacher().to(_parse_device(config.device)).eval(), lab_tokenizer()
    from bganalysis.models import load_causal_lm, load_tokenizer

    return load_causal_lm(config.teacher, device=config.device), load_tokenizer(config.teacher)


def _prompt_limit(model, config: GenerateConfig) -> int:
    """Return --max-prompt-tokens, lowered so that a prompt and --max-new-tokens fit the teacher's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return config.max_prompt_tokens
    room = context - config.max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt in the teacher's "
                        f"context of {context} tokens; pass --max-new-tokens below {context}")
    if room < config.max_prompt_tokens:
        log.warning("the teacher's context is %d tokens, so prompts keep at most their last %d tokens "
                    "(--max-new-tokens %d)", context, room, config.max_new_tokens)
    return min(room, config.max_prompt_tokens)


def _pending_jobs(rows: list[dict], done: set, tokenizer, config: GenerateConfig, prompt_limit: int) -> list[Job]:
    from bganalysis.analysis.documents import encode_prompt

    jobs = []
    for index, row in enumerate(rows):
        samples = [s for s in range(config.samples_per_prompt) if (row["id"], s) not in done]
        if not samples:
            continue
        prompt_ids = encode_prompt(tokenizer, row["prompt"], config.chat_template, prompt_limit)
        if not prompt_ids:
            raise UserError(f"prompt {row['id']!r} is empty and the tokenizer adds no BOS token, so there is "
                            "nothing to generate from; give it a non-empty prompt")
        jobs.extend(Job(index, row, sample, prompt_ids) for sample in samples)
    return jobs


# --- generation -----------------------------------------------------------------------


def _generate_all(model, tokenizer, jobs: list[Job], out: Path, config: GenerateConfig) -> None:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    with logging_redirect_tqdm(), out.open("a", encoding="utf-8") as handle, \
            tqdm(total=len(jobs), desc="generate", unit="response") as progress:
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start:start + config.batch_size]
            tokens = _generate_batch(model, batch, pad_id, eos_ids, config)
            _append_rows(handle, [_output_row(job, row_tokens, tokenizer, eos_ids) for job, row_tokens in zip(batch, tokens)])
            progress.update(len(batch))


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if not ids:
        raise UserError("neither the tokenizer nor the teacher's generation_config sets an EOS token, so responses "
                        "cannot end; use a tokenizer with eos_token")
    return sorted(ids)


def _generate_batch(model, batch: list[Job], pad_id: int, eos_ids: list[int], config: GenerateConfig) -> list[list[int]]:
    """Return the generated token ids of each job, [batch][new tokens], padding included."""
    device = model.device
    width = max(len(job.prompt_ids) for job in batch)
    # Left padding puts every prompt's last token at the same position, where generate appends.
    input_ids = torch.tensor([[pad_id] * (width - len(job.prompt_ids)) + job.prompt_ids for job in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job in batch],
                                  device=device)

    processors = LogitsProcessorList()
    if config.temperature > 0:
        generators = [torch.Generator().manual_seed(sample_seed(config.seed, job.index, job.sample)) for job in batch]
        processors.append(RowSampler(generators, config.temperature, config.top_p))
    # do_sample=False: RowSampler already drew the token. The explicit values override sampling
    # extras (repetition penalty, n-gram blocking) that a teacher's generation_config may set.
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
            do_sample=False, num_beams=1, max_new_tokens=config.max_new_tokens, min_new_tokens=0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos_ids, pad_token_id=pad_id,
        )
    return output[:, width:].tolist()


def _output_row(job: Job, tokens: list[int], tokenizer, eos_ids: list[int]) -> dict:
    """Build the output row. `response_tokens` counts the generated tokens, the EOS included.

    NOTE: the response is decoded to text, and `train` tokenises that text again, which
    can give other ids than the teacher wrote (e.g. a BPE merge across a word boundary).
    """
    stop = next((position for position, token in enumerate(tokens) if token in eos_ids), None)
    if stop is None:
        response, finish_reason, count = tokens, "length", len(tokens)
    else:
        response, finish_reason, count = tokens[:stop], "eos", stop + 1
    return {
        "id": job.row["id"], "prompt": job.row["prompt"],
        "response": tokenizer.decode(response, skip_special_tokens=True),
        "sample": job.sample, "finish_reason": finish_reason, "response_tokens": count,
    }
