"""Evaluate models on a suite: cache lookup, one benchmark at a time, tables at the end.

`evaluate_model` is the one code path: it takes a loaded model and tokenizer, so a
student in memory during training is evaluated exactly as one read from disk
(`evaluate_sources` loads each `--model` and calls it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.evaluation.local_data import check_data_dir, warn_if_partial
from bganalysis.evaluation.results import ResultStore, settings_hash
from bganalysis.evaluation.suites import Benchmark, load_suite, select_benchmarks
from bganalysis.evaluation.sources import ModelSource, model_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    suite: str = "reasoning"
    benchmarks: tuple[str, ...] = ()  # run only these benchmarks of the suite; empty: all
    data_dir: Path | None = None  # None: the tools' own (online) datasets
    limit: int | None = None
    max_new_tokens: int = 256
    chat_template: bool | None = None  # None: apply when the tokenizer has one
    batch_size: str = "8"
    device: str = "cpu"
    dtype: str | None = None  # None: as stored
    force: bool = False
    code_parallel: int = 2  # evalplus worker processes

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} is invalid: it must be an integer >= 1")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} is invalid: it must be an integer >= 1")
        if self.batch_size != "auto" and not (self.batch_size.isdigit() and int(self.batch_size) >= 1):
            raise UserError(f"--batch-size {self.batch_size!r} is invalid: use an integer >= 1 or auto")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise UserError(f"--data-dir {self.data_dir} is not a folder; pass a folder with the benchmark layout of "
                            "docs/eval.md, or leave it out to use the online datasets")


def selected_benchmarks(settings: EvalSettings) -> list[Benchmark]:
    """Return the suite's benchmarks that `settings` selects; raise UserError for an unknown suite or benchmark."""
    _, benchmarks = load_suite(settings.suite)
    return select_benchmarks(settings.suite, benchmarks, settings.benchmarks)


def benchmark_settings(benchmark: Benchmark, settings: EvalSettings, chat_template: bool) -> dict:
    """Everything that changes a benchmark's numbers; its hash is part of the cache key."""
    return {"benchmark": benchmark.name, "suite_version": benchmark.suite_version,
            "definition": benchmark.definition_hash(), "limit": settings.limit,
            "source": f"local:{Path(settings.data_dir).resolve()}" if settings.data_dir else "online",
            "chat_template": chat_template, "max_new_tokens": settings.max_new_tokens, "dtype": settings.dtype}


def evaluate_model(model, tokenizer, name: str, settings: EvalSettings, store: ResultStore) -> list[dict]:
    """Run (or take from the cache) every benchmark of the suite for one loaded model."""
    benchmarks = selected_benchmarks(settings)
    check_data_dir([benchmark.name for benchmark in benchmarks], settings.data_dir)  # before the first one runs
    chat = tokenizer.chat_template is not None if settings.chat_template is None else settings.chat_template
    if chat and tokenizer.chat_template is None:
        raise UserError(f"--apply-chat-template: model {name} has no chat template; pass --no-chat-template")
    mhash = model_hash(model, tokenizer)
    log.info("model %s: hash %s, chat template %s", name, mhash, "on" if chat else "off")
    entries, lm = [], None
    for benchmark in benchmarks:
        spec = benchmark_settings(benchmark, settings, chat)
        shash = settings_hash(spec)
        cached = None if settings.force else store.get(mhash, benchmark.name, shash)
        if cached is not None:
            log.info("%s / %s: cached (%s), skipped; --force reruns it", name, benchmark.name, shash)
            entries.append({**cached, "model": name})
            continue
        started = time.perf_counter()
        if benchmark.engine == "lm_eval":
            lm = lm or _make_lm(model, tokenizer, settings)
            metrics, samples, extra = _run_lm_eval(lm, benchmark, settings, chat)
        else:
            metrics, samples, extra = _run_evalplus(model, tokenizer, benchmark, settings, chat, store, name, shash)
        entry = {"model": name, "model_hash": mhash, "suite": benchmark.suite, "benchmark": benchmark.name,
                 "suite_version": benchmark.suite_version, "settings_hash": shash, "settings": spec,
                 "metrics": metrics, "seconds": time.perf_counter() - started, **extra}
        samples.insert(0, "model", name)
        samples.insert(1, "benchmark", benchmark.name)
        store.put(entry, samples)
        log.info("%s / %s: %s in %.0f s", name, benchmark.name,
                 ", ".join(f"{m['metric']} {m['value']:.3f}" for m in metrics), entry["seconds"])
        entries.append(entry)
    return entries


def _make_lm(model, tokenizer, settings: EvalSettings):
    from bganalysis.evaluation.lm_eval_runner import make_lm

    return make_lm(model, tokenizer, settings.batch_size)


def _run_lm_eval(lm, benchmark: Benchmark, settings: EvalSettings, chat: bool):
    from bganalysis.evaluation.lm_eval_runner import LmEvalSettings, run_benchmark
    from bganalysis.evaluation.tasks import HUB, task_configs

    configs = task_configs(benchmark.name, benchmark.task, settings.data_dir, settings.max_new_tokens)
    if settings.data_dir is not None:
        warn_if_partial(benchmark.name, settings.data_dir)
    else:
        log.info("fetching %s from the Hugging Face Hub (%s), unless the datasets cache has it; "
                 "--data-dir reads local files instead", benchmark.name, HUB[benchmark.name])
    metrics, samples = run_benchmark(lm, configs, LmEvalSettings(settings.limit, chat, settings.batch_size))
    return metrics, samples, {}


def _run_evalplus(model, tokenizer, benchmark: Benchmark, settings: EvalSettings, chat: bool, store: ResultStore,
                  name: str, shash: str):
    from bganalysis.evaluation import code_runner

    code_settings = code_runner.CodeSettings(benchmark.dataset, settings.limit, chat, settings.max_new_tokens,
                                             parallel=settings.code_parallel)
    problems = code_runner.load_problems(benchmark.dataset, settings.data_dir, settings.limit)
    generations = store.samples_path(name, benchmark.name, shash).with_suffix(".generations.jsonl")
    if settings.force and generations.exists():
        generations.unlink()
    solutions = code_runner.generate(model, tokenizer, problems, code_settings, generations)
    statuses, protections = code_runner.score(problems, solutions, code_settings)
    metrics, samples = code_runner.outcome_rows(problems, solutions, statuses)
    return metrics, samples, {"sandbox": protections}


def evaluate_sources(sources: list[ModelSource], settings: EvalSettings, out: Path) -> list[dict]:
    """Load each model in turn and evaluate it; return all cache entries."""
    import torch

    from bganalysis.models import load_causal_lm, load_tokenizer

    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    store = ResultStore(out)
    entries = []
    for source in sources:
        model = load_causal_lm(source.path, device=settings.device, dtype=dtype)
        tokenizer = load_tokenizer(source.path)
        entries += evaluate_model(model, tokenizer, source.name, settings, store)
        del model
    return entries


def default_out(sources: list[ModelSource]) -> Path:
    """eval/ of the run folder all models belong to, else runs/eval."""
    runs = {source.run_dir for source in sources}
    if len(runs) == 1 and None not in runs:
        return next(iter(runs)) / "eval"
    return Path("runs/eval")


def settings_dict(settings: EvalSettings) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(settings).items()}
