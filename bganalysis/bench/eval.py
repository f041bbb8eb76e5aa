"""`bganalysis bench eval`: our evaluation path against the engines called directly.

For each benchmark the same items are run twice with SmolLM2-135M-Instruct:

- through `runner.evaluate_model` (what `bganalysis eval` runs: model hash, task
  configs, lm-eval or evalplus, sandbox, cache and sample files), with `force`;
- directly: `lm_eval.simple_evaluate` on the same task configs and item indices, or
  evalplus's `codegen` with the same decoder followed by `evalplus.evaluate.evaluate`
  in a plain child process (evalplus's own per-sample isolation, no sandbox layer).
  Both code paths reset evalplus's stop-string hook after each prompt
  (`code_runner.fresh_stopping_criteria`); without it the direct path would stop
  generations early and do less work.

Reported: items per second through our path, and wall-time ratios ours / direct per
benchmark and per engine (target <= 1.1). Datasets are loaded once before timing, so
neither side pays the first conversion of the local files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


@dataclass(frozen=True)
class BenchSize:
    """Items per benchmark and the generation cap. QUICK took about N minutes on a shared 2-core CPU."""

    items: tuple[tuple[str, int], ...] = (("arc_challenge", 40), ("mmlu", 40), ("bbh", 10), ("theoremqa", 10),
                                          ("humanevalplus", 10), ("mbppplus", 10))
    max_new_tokens: int = 256


FULL = BenchSize()
QUICK = BenchSize(items=(("arc_challenge", 10), ("mmlu", 10), ("bbh", 2), ("theoremqa", 2), ("humanevalplus", 3),
                         ("mbppplus", 3)), max_new_tokens=48)


def run_bench(model_dir: str | None, data_dir: str | None, out: str, size: BenchSize) -> dict:
    import torch

    from bganalysis.bench.analysis import resolve_teacher
    from bganalysis.errors import UserError
    from bganalysis.evaluation.suites import load_suite
    from bganalysis.io import atomic_write_json
    from bganalysis.models import load_causal_lm, load_tokenizer

    started = time.perf_counter()
    data = Path(data_dir) if data_dir else DEFAULT_DATA
    if not data.is_dir():
        raise UserError(f"--data-dir {data} is not a folder; pass the benchmark folder (layout of ../shared/benchmarks)")
    folder = resolve_teacher(model_dir)
    model, tokenizer = load_causal_lm(str(folder), dtype=torch.float32), load_tokenizer(str(folder))
    benchmarks = {b.name: b for b in load_suite("all")[1]}
    log.info("bench eval: %s; model %s; torch threads %d", asdict(size), folder, torch.get_num_threads())

    result = {"threads": torch.get_num_threads(), "max_new_tokens": size.max_new_tokens, "benchmarks": {}}
    totals = {"lm_eval": [0.0, 0.0], "evalplus": [0.0, 0.0]}
    for name, items in size.items:
        benchmark = benchmarks[name]
        timing = (_time_lm_eval if benchmark.engine == "lm_eval" else _time_evalplus)(
            model, tokenizer, benchmark, data, items, size.max_new_tokens)
        result["benchmarks"][name] = {"items": items, "items_per_second": items / timing["ours"],
                                      "ours_seconds": timing["ours"], "direct_seconds": timing["direct"],
                                      "ratio": timing["ours"] / timing["direct"]}
        totals[benchmark.engine][0] += timing["ours"]
        totals[benchmark.engine][1] += timing["direct"]
        log.info("%s: %d items, %.3f items/s, ours %.1f s, direct %.1f s, ratio %.3f", name, items,
                 items / timing["ours"], timing["ours"], timing["direct"], timing["ours"] / timing["direct"])
    for engine, (ours, direct) in totals.items():
        if direct > 0:  # a size without benchmarks of this engine has no ratio for it
            result[f"ratio_{engine}"] = ours / direct
    result["total_seconds"] = time.perf_counter() - started
    atomic_write_json(Path(out) / "bench_eval.json", result)
    return result


def _settings(benchmark, data: Path, items: int, max_new_tokens: int):
    from bganalysis.evaluation.runner import EvalSettings

    suite = "reasoning" if benchmark.engine == "lm_eval" else "code"
    return EvalSettings(suite=suite, data_dir=data, limit=items, max_new_tokens=max_new_tokens, batch_size="1",
                        force=True)  # chat template as the tokenizer has it, on both paths


def _ours(model, tokenizer, benchmark, settings) -> float:
    """Wall time of our path for one benchmark (the suite narrowed to it)."""
    from bganalysis.evaluation import runner
    from bganalysis.evaluation.results import ResultStore

    original = runner.load_suite
    runner.load_suite = lambda name: (benchmark.suite_version, [benchmark])  # one benchmark of the suite
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            runner.evaluate_model(model, tokenizer, "smollm2", settings, ResultStore(Path(out)))
            return time.perf_counter() - started
    finally:
        runner.load_suite = original


def _time_lm_eval(model, tokenizer, benchmark, data: Path, items: int, max_new_tokens: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bganalysis.evaluation.lm_eval_runner import load_tasks, make_lm, spread_indices
    from bganalysis.evaluation.tasks import task_configs

    settings = _settings(benchmark, data, items, max_new_tokens)
    chat = tokenizer.chat_template is not None
    configs = task_configs(benchmark.name, benchmark.task, data, max_new_tokens)
    manager = TaskManager(include_defaults=False)
    sizes = [len(task.eval_docs) for task in load_tasks(configs, manager).values()]
    chosen = [(c, i) for c, i in zip(configs, spread_indices(sizes, items)) if i]

    started = time.perf_counter()
    lm_eval.simple_evaluate(model=make_lm(model, tokenizer, "1"), tasks=[c for c, _ in chosen], task_manager=manager,
                            samples={c["task"]: i for c, i in chosen}, log_samples=True,
                            apply_chat_template=chat, fewshot_as_multiturn=chat)
    direct = time.perf_counter() - started
    return {"ours": _ours(model, tokenizer, benchmark, settings), "direct": direct}


def _time_evalplus(model, tokenizer, benchmark, data: Path, items: int, max_new_tokens: int) -> dict:
    import evalplus.codegen
    import evalplus.data.humaneval
    import evalplus.data.mbpp

    from bganalysis.evaluation.code_runner import OVERRIDE_VARIABLES, fresh_stopping_criteria, load_problems, make_decoder

    problems = load_problems(benchmark.dataset, data, items)
    with tempfile.TemporaryDirectory() as folder:
        subset, samples = Path(folder) / "problems.jsonl", Path(folder) / "samples.jsonl"
        subset.write_text("".join(json.dumps(p) + "\n" for p in problems))
        module = evalplus.data.humaneval if benchmark.dataset == "humaneval" else evalplus.data.mbpp
        variable = OVERRIDE_VARIABLES[benchmark.dataset]
        previous = getattr(module, variable)
        setattr(module, variable, str(subset))  # evalplus read the variable at import; point it at the subset
        try:
            started = time.perf_counter()
            decoder = make_decoder(model, tokenizer, benchmark.dataset, tokenizer.chat_template is not None, max_new_tokens)
            codegen = decoder.codegen

            def one_call(*args, **kwargs):  # the same stop-criteria reset as our path, so both do the same work
                with fresh_stopping_criteria(model):
                    return codegen(*args, **kwargs)

            decoder.codegen = one_call
            evalplus.codegen.codegen(str(samples), decoder, benchmark.dataset, greedy=True)
            code = ("from evalplus.evaluate import evaluate; import os; "
                    f"evaluate({benchmark.dataset!r}, samples={str(samples)!r}, parallel=2); os._exit(0)")
            subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, capture_output=True,
                           env={**os.environ, variable: str(subset), "XDG_CACHE_HOME": folder})
            direct = time.perf_counter() - started
        finally:
            setattr(module, variable, previous)
    return {"ours": _ours(model, tokenizer, benchmark, _settings(benchmark, data, items, max_new_tokens)),
            "direct": direct}
