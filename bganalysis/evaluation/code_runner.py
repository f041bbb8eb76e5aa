"""HumanEval+ and MBPP+ through evalplus: generate, then score inside the sandbox.

Generation reuses evalplus's own Hugging Face decoder (its prompts, stop strings and
greedy settings) around a model that is already loaded, so a model in memory (during
training) takes the same path as one read from disk. Solutions are sanitised with
`evalplus.sanitize` as `evalplus.codegen` does. Scoring is `evalplus.evaluate.evaluate`
on a subset file, run by `sandbox.run_sandboxed`; pass@1 comes from evalplus's
`estimate_pass_at_k`. Generations are appended to a JSONL file as they come, so an
interrupted run continues with the next task.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bganalysis.evaluation.local_data import LOCAL_FILES
from bganalysis.evaluation.sandbox import SandboxLimits, private_workdir, remove_workdir, run_sandboxed
from bganalysis.io import drop_cut_off_line

log = logging.getLogger(__name__)

INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following problem in a "
                      "markdown code block:")  # the prefixes evalplus.codegen uses for chat models
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                   "corresponding tests:")
BENCHMARKS = {"humaneval": "humanevalplus", "mbpp": "mbppplus"}  # evalplus dataset -> our benchmark name
OVERRIDE_VARIABLES = {"humaneval": "HUMANEVAL_OVERRIDE_PATH", "mbpp": "MBPP_OVERRIDE_PATH"}


@dataclass(frozen=True)
class CodeSettings:
    dataset: str  # "humaneval" or "mbpp"
    limit: int | None
    chat_template: bool
    max_new_tokens: int
    parallel: int = 2  # evalplus worker processes
    limits: SandboxLimits = SandboxLimits()


def load_problems(dataset: str, data_dir: Path | None, limit: int | None) -> list[dict]:
    """The first `limit` problems as raw JSON rows, from `data_dir` or evalplus's download."""
    if data_dir is not None:
        path = Path(data_dir) / LOCAL_FILES[BENCHMARKS[dataset]][0]  # checked by check_data_dir before any run
    else:
        path = Path(_download(dataset))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = rows[:limit] if limit else rows
    return [release_prompt(row) for row in rows] if dataset == "mbpp" else rows


def release_prompt(row: dict) -> dict:
    """An MBPP+ row whose prompt is in the release format: the task text and one example assert.

    The 399-task pre-release snapshot has prompts with the task text alone, so a model
    cannot know the function name its tests call. The release (v0.2.0) prompt is a
    docstring with the text and the first assert; it is rebuilt here from the row's
    `assertion` field. Rows that already carry an assert are returned unchanged.
    """
    if "assert" in row["prompt"] or not row.get("assertion"):
        return row
    text = row["prompt"].strip().strip("'\"").strip()
    first_assert = next(line for line in row["assertion"].splitlines() if line.strip().startswith("assert"))
    return {**row, "prompt": f'"""\n{text}\n{first_assert.strip()}\n"""\n'}


def _download(dataset: str) -> str:
    log.info("fetching %s from evalplus's release files on GitHub, unless evalplus has them cached; "
             "--data-dir reads local files instead", BENCHMARKS[dataset])
    # NOTE: private evalplus helpers, the only ones that return the file path instead of parsed problems.
    if dataset == "humaneval":
        from evalplus.data.humaneval import _ready_human_eval_plus_path
        return _ready_human_eval_plus_path()
    from evalplus.data.mbpp import _ready_mbpp_plus_path
    return _ready_mbpp_plus_path()


def make_decoder(model, tokenizer, dataset: str, chat_template: bool, max_new_tokens: int):
    """evalplus's HuggingFaceDecoder around an already loaded model and tokenizer."""
    from evalplus.provider.base import DecoderBase
    from evalplus.provider.hf import HuggingFaceDecoder
    from evalplus.provider.utility import EOS, extra_eos_for_direct_completion

    decoder = HuggingFaceDecoder.__new__(HuggingFaceDecoder)  # its __init__ loads the model from a name
    with contextlib.redirect_stdout(sys.stderr):  # it prints a greeting; stdout is for the results table
        DecoderBase.__init__(decoder, name=str(getattr(model, "name_or_path", "model")), batch_size=1, temperature=0.0,
                             max_new_tokens=max_new_tokens, instruction_prefix=INSTRUCTION_PREFIX,
                             response_prefix=RESPONSE_PREFIX)
    decoder.device, decoder.model, decoder.tokenizer = model.device, model, tokenizer
    decoder.skip_special_tokens = True
    decoder.force_base_prompt = not chat_template or tokenizer.chat_template is None
    extra = extra_eos_for_direct_completion(dataset) if decoder.is_direct_completion() else ["\n```\n"]
    decoder.eos = list(EOS) + extra  # a copy: `eos += ...` in evalplus would grow the shared EOS list
    return decoder


def generate(model, tokenizer, problems: list[dict], settings: CodeSettings, path: Path) -> list[dict]:
    """Greedy solutions for `problems`, appended to `path` (JSONL) and resumed from it."""
    from evalplus.provider.utility import make_raw_chat_prompt
    from evalplus.sanitize import sanitize

    done = _read_jsonl(path)
    decoder = make_decoder(model, tokenizer, settings.dataset, settings.chat_template, settings.max_new_tokens)
    todo = [problem for problem in problems if problem["task_id"] not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for problem in tqdm(todo, desc=f"generate {settings.dataset}", unit="task", disable=not todo):
            prompt = problem["prompt"].strip() + "\n"  # as evalplus.codegen
            with fresh_stopping_criteria(model):
                output = decoder.codegen(prompt, do_sample=False, num_samples=1)[0]
            solution = prompt + output if decoder.is_direct_completion() else output
            shown = prompt if decoder.is_direct_completion() else make_raw_chat_prompt(
                prompt, INSTRUCTION_PREFIX, RESPONSE_PREFIX, tokenizer)
            row = {"task_id": problem["task_id"], "prompt": shown, "generation": output,
                   "solution": sanitize(solution, entrypoint=problem["entry_point"])}
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a finished generation survives a crash of the machine too
            done[row["task_id"]] = row
    return [done[problem["task_id"]] for problem in problems]


@contextlib.contextmanager
def fresh_stopping_criteria(model):
    """Undo the stop-string hook that evalplus's decoder installs on `model` for one call.

    evalplus 0.3.1 wraps `model._get_stopping_criteria` with stop_sequencer on every
    `codegen` call and never unwraps it. On a model that serves many prompts the
    wrappers chain: each call keeps the criteria of all earlier prompts, with their
    prompt lengths. A criterion from a shorter earlier prompt reads the end of the
    current prompt as generated text, sees a stop string there ("\\ndef ", a closing
    code fence) and ends the generation after one token; the chain also slows every
    step. Restoring the method after each call gives every prompt only its own criterion.
    """
    had_own = "_get_stopping_criteria" in vars(model)
    original = vars(model).get("_get_stopping_criteria")
    try:
        yield
    finally:
        if had_own:
            model._get_stopping_criteria = original
        else:
            vars(model).pop("_get_stopping_criteria", None)


def score(problems: list[dict], solutions: list[dict], settings: CodeSettings) -> tuple[dict, list[str]]:
    """Run evalplus on `solutions` in the sandbox; return ({task_id: statuses}, protections)."""
    workdir = private_workdir()
    try:
        subset, samples = workdir / "problems.jsonl", workdir / "samples.jsonl"
        subset.write_text("".join(json.dumps(problem) + "\n" for problem in problems), encoding="utf-8")
        samples.write_text("".join(json.dumps({"task_id": s["task_id"], "solution": s["solution"]}) + "\n"
                                   for s in solutions), encoding="utf-8")
        result = run_sandboxed("bganalysis.evaluation.code_exec:evaluate_samples",
                               {"dataset": settings.dataset, "samples": str(samples), "parallel": settings.parallel},
                               workdir, settings.limits, env={OVERRIDE_VARIABLES[settings.dataset]: str(subset)})
        result_file = workdir / "result.json"
        if result.timed_out or result.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"evalplus scoring of {settings.dataset} failed in the sandbox (exit {result.returncode}, "
                               f"timed out: {result.timed_out}): {result.stderr_tail[-2000:]}")
        log.info("scored %d %s solutions in %.1f s; sandbox: %s", len(solutions), settings.dataset, result.seconds,
                 ", ".join(result.protections))
        return json.loads(result_file.read_text()), result.protections
    finally:
        remove_workdir(workdir)


def outcome_rows(problems: list[dict], solutions: list[dict], statuses: dict) -> tuple[list[dict], pd.DataFrame]:
    """Metric rows (pass@1 base and plus) and the per-sample table."""
    from evalplus.eval import PASS, estimate_pass_at_k
    from lm_eval.api.metrics import mean_stderr

    base = np.array([statuses[p["task_id"]]["base_status"] == PASS for p in problems])
    plus = base & np.array([statuses[p["task_id"]]["plus_status"] == PASS for p in problems])
    total = np.ones(len(problems), dtype=int)
    metrics = [{"metric": f"pass@1_{name}", "value": float(estimate_pass_at_k(total, correct.astype(int), 1).mean()),
                "stderr": float(mean_stderr(correct.astype(float).tolist())) if len(correct) > 1 else float("nan"),
                "n": len(problems)} for name, correct in (("base", base), ("plus", plus))]
    samples = pd.DataFrame({
        "doc_id": [p["task_id"] for p in problems], "prompt": [s["prompt"] for s in solutions],
        "generation": [s["generation"] for s in solutions], "extracted": [s["solution"] for s in solutions],
        "correct": plus, "correct_base": base,
    })
    return metrics, samples


def _read_jsonl(path: Path) -> dict[str, dict]:
    """The rows of the generations file `path` by task id, after dropping a cut-off last line."""
    if not path.is_file():
        return {}
    rows = {}
    for line in drop_cut_off_line(path).decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["task_id"]] = row
    return rows
