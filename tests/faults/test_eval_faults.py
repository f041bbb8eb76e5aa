"""`eval`, `plot`, `report` and `app` through the real CLI: bad input, and `eval` interrupted and resumed.

The interrupted evaluation runs the code suite on a tiny byte-level model with the
local benchmark files, so it generates, scores in the sandbox and caches for real.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from tests.eval_helpers import DATA, tiny_byte_model
from tests.faults.cli import error_line, files_under, ok, run
from tests.faults.test_bad_input import FIX
from tests.faults.test_interrupt import SEED, _interrupt

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/benchmarks")

EVAL = ["eval", "--suite", "code", "--data-dir", str(DATA), "--limit", "3", "--max-new-tokens", "12",
        "--no-chat-template"]
MBPP_FILE = "mbppplus/MbppPlus-767efcc.jsonl.gz"


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval_faults") / "tiny"
    tiny_byte_model(folder)
    return folder


@pytest.fixture(scope="module")
def partial_data(tmp_path_factory) -> Path:
    """A --data-dir with HumanEval+ but no MBPP+ file, and one BBH task without its CoT prompt."""
    folder = tmp_path_factory.mktemp("partial_data")
    (folder / "humanevalplus").mkdir()
    shutil.copy(DATA / "humanevalplus" / "HumanEvalPlus.jsonl.gz", folder / "humanevalplus")
    (folder / "bbh" / "bbh").mkdir(parents=True)
    (folder / "bbh" / "cot-prompts").mkdir()
    shutil.copy(DATA / "bbh" / "bbh" / "navigate.json", folder / "bbh" / "bbh")
    return folder


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory) -> Path:
    """A --data-dir whose HumanEval+ file is not gzip and whose TheoremQA file is empty."""
    folder = tmp_path_factory.mktemp("broken_data")
    (folder / "humanevalplus").mkdir()
    (folder / "humanevalplus" / "HumanEvalPlus.jsonl.gz").write_text('{"task_id": "HumanEval/0"}\n')
    (folder / "theoremqa").mkdir()
    (folder / "theoremqa" / "theoremqa_test.json").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    """Model folders with a weight shard missing, and with a folder where the weights file should be."""
    root = tmp_path_factory.mktemp("broken_models")
    model, tokenizer = tiny_byte_model()
    sharded = root / "shard_missing"
    model.save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    folder_weights = root / "weights_folder"
    tiny_byte_model(folder_weights)
    (folder_weights / "model.safetensors").unlink()
    (folder_weights / "model.safetensors").mkdir()
    return {"shard_missing": sharded, "weights_folder": folder_weights}


@pytest.fixture(scope="module")
def unanalysed_run(tmp_path_factory) -> Path:
    """A run folder with a student but no analysis."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    tiny_byte_model(run_dir / "students" / "hard")
    return run_dir


def _cases(model: Path, partial: Path, inputs: dict, run_dir: Path, broken: Path, models: dict) -> dict[str, tuple]:
    """Case id -> (command, argv without --out, the text the message must name, other words it must hold)."""
    base = ["eval", "--model", str(model), "--data-dir", str(DATA)]
    cases = {
        "eval-suite-unknown": ("eval", [*base, "--suite", "nope"], "nope", ("all", "code", "reasoning")),
        "eval-benchmark-unknown": ("eval", [*base, "--suite", "code", "--benchmark", "bbh"], "bbh",
                                   ("humanevalplus", "mbppplus")),
        "eval-data-file-missing": ("eval", ["eval", "--model", str(model), "--suite", "code", "--data-dir", str(partial)],
                                   str(partial / MBPP_FILE), ("mbppplus",)),
        "eval-data-cot-prompt-missing": (
            "eval", ["eval", "--model", str(model), "--benchmark", "bbh", "--data-dir", str(partial)],
            str(partial / "bbh" / "cot-prompts" / "navigate.txt"), ()),
        "eval-data-not-gzip": ("eval", [*base[:3], "--suite", "code", "--data-dir", str(broken)],
                               str(broken / "humanevalplus" / "HumanEvalPlus.jsonl.gz"), ("not a gzip file",)),
        "eval-data-empty": ("eval", [*base[:3], "--benchmark", "theoremqa", "--data-dir", str(broken)],
                            str(broken / "theoremqa" / "theoremqa_test.json"), ("empty",)),
        "eval-benchmark-other-suite": ("eval", [*base, "--suite", "code", "--benchmark", "mmlu"], "mmlu",
                                       ("--suite reasoning",)),
        "eval-data-dir-missing": ("eval", [*base[:3], "--data-dir", str(partial / "nowhere")], "nowhere", ()),
        "eval-limit-zero": ("eval", [*base, "--limit", "0"], "--limit 0", ()),
        "eval-batch-size": ("eval", [*base, "--batch-size", "many"], "many", ("auto",)),
        "plot-run-missing": ("plot", ["plot", str(partial / "no_run")], str(partial / "no_run"), ()),
        "report-no-results": ("report", ["report", str(run_dir)], str(run_dir / "eval" / "results.parquet"),
                              ("bganalysis eval",)),
        "app-runs-missing": ("app", ["app", str(partial / "no_runs")], str(partial / "no_runs"), ()),
    }
    for fault in ("missing", "not_model", "truncated", "unreadable_model"):
        cases[f"eval-model-{fault}"] = ("eval", ["eval", "--model", str(inputs[fault]), "--data-dir", str(DATA),
                                                 "--suite", "code"], str(inputs[fault]), ())
    for fault, named in (("shard_missing", "model-00002-of-"), ("weights_folder", "model.safetensors")):
        # The good model comes first: the broken second one must stop the run before the first is evaluated.
        cases[f"eval-model-{fault}"] = ("eval", [*base, "--suite", "code", "--model", str(models[fault])], named, ())
    return cases


CASE_IDS = ["eval-suite-unknown", "eval-benchmark-unknown", "eval-benchmark-other-suite", "eval-data-file-missing",
            "eval-data-cot-prompt-missing", "eval-data-not-gzip", "eval-data-empty", "eval-data-dir-missing",
            "eval-limit-zero", "eval-batch-size", "plot-run-missing", "report-no-results", "app-runs-missing",
            "eval-model-missing", "eval-model-not_model", "eval-model-truncated", "eval-model-unreadable_model",
            "eval-model-shard_missing", "eval-model-weights_folder"]


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input(byte_model, partial_data, inputs, unanalysed_run, broken_data, broken_models, tmp_path, name):
    command, args, named, words = _cases(byte_model, partial_data, inputs, unanalysed_run, broken_data,
                                         broken_models)[name]
    out = tmp_path / "out"
    if command == "eval":
        args = [*args, "--out", str(out)]
    before = files_under(unanalysed_run)
    message = error_line(run(args, tmp_path, timeout=120), command)
    assert named in message, message
    assert FIX.search(message), f"the message says no fix: {message}"
    for word in words:
        assert word in message, message
    assert files_under(out) == []
    assert files_under(unanalysed_run) == before


def _progress(out: Path) -> int:
    """Finished work of an eval run: generated tasks plus finished benchmarks."""
    lines = sum(path.read_bytes().count(b"\n") for path in out.glob("samples/*/*.generations.jsonl"))
    return lines + len(list(out.glob("cache/*/*.json")))


def _lines(path: Path) -> int:
    """Whole lines in `path`: a cut-off last line does not count."""
    return path.read_bytes().count(b"\n")


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    tables = {"results": pd.read_parquet(out / "results.parquet")}
    for path in sorted(out.glob("samples/*/*.parquet")):
        tables[path.name] = pd.read_parquet(path)
    return tables


@pytest.fixture(scope="module")
def eval_reference(byte_model, tmp_path_factory) -> Path:
    """The output folder of one uninterrupted `eval` (EVAL)."""
    out = tmp_path_factory.mktemp("eval_reference") / "eval"
    ok(run([*EVAL, "--model", str(byte_model), "--out", str(out)], out.parent))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
def test_eval_resumes_to_the_same_results(eval_reference, byte_model, tmp_path, signum):
    # 3 HumanEval+ generations, its cache entry, then 3 MBPP+ generations and the last entry: 8 in all.
    at = random.Random(f"{SEED}-eval-{signum}").randint(1, 6)
    out = tmp_path / "eval"
    args = [*EVAL, "--model", str(byte_model), "--out", str(out)]
    stderr = _interrupt(args, tmp_path, lambda: _progress(out), at, signum)
    if signum == signal.SIGTERM:
        assert "interrupted" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "results.parquet").exists()
    finished = {path.name.split("-")[0] for path in out.glob("cache/*/*.json")}  # benchmark names
    generated = {path.name.split("-")[0]: _lines(path) for path in out.glob("samples/*/*.generations.jsonl")}
    if signum == signal.SIGKILL:
        for path in out.glob("samples/*/*.generations.jsonl"):
            if path.name.split("-")[0] not in finished:
                with path.open("a") as handle:
                    handle.write('{"task_id": "Mbpp/9", "gen')  # a write cut off by the kill

    rerun = ok(run(args, tmp_path))
    assert all(f"{name}: cached" in rerun.stderr for name in finished), rerun.stderr[-3000:]
    # The rerun generates only the tasks without a whole line: its progress bars count them.
    totals = dict(re.findall(r"generate (humaneval|mbpp):[^|]*\|[^|]*\| *\d+/(\d+)", rerun.stderr))
    for benchmark, dataset in (("humanevalplus", "humaneval"), ("mbppplus", "mbpp")):
        expected = 0 if benchmark in finished else 3 - generated.get(benchmark, 0)
        assert int(totals.get(dataset, 0)) == expected, (benchmark, totals)
    resumed, reference = _tables(out), _tables(eval_reference)
    assert resumed.keys() == reference.keys()
    for name, table in reference.items():
        pd.testing.assert_frame_equal(resumed[name], table)
    for path in out.glob("samples/*/*.generations.jsonl"):  # every task generated once, no cut-off line kept
        task_ids = [line.split('"task_id": ')[1].split(",")[0] for line in path.read_text().splitlines()]
        assert len(task_ids) == len(set(task_ids)) == 3


def test_partial_bbh_warns(partial_data, caplog):
    from bganalysis.evaluation.local_data import warn_if_partial

    warn_if_partial("bbh", partial_data)
    assert "bbh has 1 of the 27 subtasks" in caplog.text
