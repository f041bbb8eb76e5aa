"""`bganalysis eval` end to end with tiny models: tables, cache, --force, offline, bad input."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from bganalysis.cli import main
from bganalysis.evaluation.results import COLUMNS, ResultStore
from bganalysis.evaluation.runner import EvalSettings, evaluate_model
from tests.eval_helpers import DATA, tiny_byte_model

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/benchmarks")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline variables set, and proxies at a closed loopback port so any request fails fast."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_byte_model(folder)
    return folder


def _eval(*args) -> int:
    return main(["eval", "--data-dir", str(DATA), "--max-new-tokens", "8", "--batch-size", "2", *args])


def _entry_files(out):
    return {path: path.stat().st_mtime_ns for path in (out / "cache").rglob("*.json")}


def test_tiny_model_through_reasoning_and_code_suites(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _eval("--suite", "all", "--model", str(tiny_dir), "--limit", "2", "--out", str(out)) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns) == COLUMNS
    assert set(table.benchmark) == {"bbh", "mmlu", "arc_challenge", "theoremqa", "humanevalplus", "mbppplus"}
    assert (table.n == 2).all() and table.value.between(0, 1).all()
    assert set(table.metric) == {"exact_match", "acc", "acc_norm", "pass@1_base", "pass@1_plus"}
    printed = capsys.readouterr().out
    assert "| benchmark | metric | tiny |" in printed and (out / "results.md").read_text().strip() == printed.strip()
    samples = pd.concat(pd.read_parquet(path) for path in (out / "samples" / "tiny").glob("*.parquet"))
    assert {"prompt", "generation", "extracted", "correct"} <= set(samples.columns) and len(samples) == 12


def test_cache_hit_then_force(tiny_dir, tmp_path, caplog):
    out = tmp_path / "eval"
    args = ("--suite", "code", "--model", str(tiny_dir), "--limit", "1", "--out", str(out))
    assert _eval(*args) == 0
    first, table = _entry_files(out), pd.read_parquet(out / "results.parquet")
    assert len(first) == 2

    caplog.clear()
    caplog.set_level(logging.INFO, logger="bganalysis.evaluation.runner")
    assert _eval(*args) == 0
    assert _entry_files(out) == first and "cached" in caplog.text
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table)

    assert _eval(*args, "--force") == 0
    again = _entry_files(out)
    assert again.keys() == first.keys() and all(again[path] != first[path] for path in first)


def test_other_settings_are_not_served_from_the_cache(tiny_dir, tmp_path):
    out = tmp_path / "eval"
    assert _eval("--suite", "code", "--model", str(tiny_dir), "--limit", "1", "--out", str(out)) == 0
    assert _eval("--suite", "code", "--model", str(tiny_dir), "--limit", "2", "--out", str(out)) == 0
    assert len(_entry_files(out)) == 4
    table = pd.read_parquet(out / "results.parquet")
    assert (table.n == 2).all()  # the newer settings replace the older rows of the same model and benchmark


def test_in_memory_model_takes_the_same_path(tiny_dir, tmp_path):
    from bganalysis.models import load_causal_lm, load_tokenizer

    out = tmp_path / "eval"
    assert _eval("--suite", "code", "--model", str(tiny_dir), "--limit", "1", "--out", str(out)) == 0
    before = _entry_files(out)
    model, tokenizer = tiny_byte_model()  # the same seed: the same weights, built in memory
    settings = EvalSettings(suite="code", data_dir=DATA, limit=1, max_new_tokens=8, batch_size="2")
    evaluate_model(model, tokenizer, "tiny", settings, ResultStore(out))
    assert _entry_files(out) == before  # same model hash and settings: served from the CLI run's cache

    other = tmp_path / "other"
    evaluate_model(load_causal_lm(str(tiny_dir)), load_tokenizer(str(tiny_dir)), "tiny", settings, ResultStore(other))
    evaluate_model(model, tokenizer, "memory", settings, ResultStore(tmp_path / "memory"))
    for path in (other / "samples" / "tiny").glob("*.parquet"):
        from_disk = pd.read_parquet(path)
        in_memory = pd.read_parquet(tmp_path / "memory" / "samples" / "memory" / path.name)
        assert from_disk.generation.tolist() == in_memory.generation.tolist()


def test_run_folder_means_all_its_students(tmp_path):
    run = tmp_path / "run"
    for seed, name in enumerate(("hard", "soft")):
        tiny_byte_model(run / "students" / name, seed=seed)
    assert _eval("--suite", "code", "--model", str(run), "--limit", "1") == 0
    table = pd.read_parquet(run / "eval" / "results.parquet")
    assert sorted(set(table.model)) == ["hard", "soft"]


def test_list_suites(capsys):
    assert main(["eval", "--list-suites"]) == 0
    printed = capsys.readouterr().out
    assert "reasoning (version 1)" in printed and "pass@1_plus" in printed and "3-shot" in printed


@pytest.mark.parametrize("args, message", [
    (["--suite", "nope"], "--suite 'nope' is unknown"),
    (["--limit", "0"], "--limit 0 is invalid"),
    (["--batch-size", "big"], "--batch-size 'big' is invalid"),
    (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder is not a folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "eval")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "eval").exists()


def test_code_generation_does_not_chain_stop_criteria(tmp_path):
    """evalplus's stop-string hook, left on the model, cut later generations after one token."""
    from bganalysis.evaluation.code_runner import CodeSettings, generate

    model, tokenizer = tiny_byte_model()
    short = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f"}
    # After the short prompt's length, this prompt contains "\ndef ", a stop string of direct completion.
    long = {"task_id": "t/1", "prompt": "import os\nimport sys\n\n\ndef g(x):\n    \"\"\"Return x.\"\"\"\n",
            "entry_point": "g"}
    settings = CodeSettings("humaneval", None, False, 8)
    alone = generate(model, tokenizer, [long], settings, tmp_path / "alone.jsonl")[0]
    after = generate(model, tokenizer, [short, long], settings, tmp_path / "after.jsonl")[1]
    assert len(alone["generation"]) > 1
    assert after["generation"] == alone["generation"]
    assert "_get_stopping_criteria" not in vars(model)
