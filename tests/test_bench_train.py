"""`bganalysis bench train` at a tiny size: its JSON keys, the loss parity it reports, and the CLI."""

import json
import math

import pytest
import torch

from bganalysis.bench.train import BenchSize, measure_step_in_process, run_bench
from bganalysis.cli import build_parser
from bganalysis.lab import lab_tokenizer
from tests.helpers import tiny_llama

TINY = BenchSize(vocab=512, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, seq_len=32, batch=2,
                 chunk_tokens=16, steps=1, cache_docs=4, cache_batch=2, cache_max_len=64, cache_k=8, cache_steps=1)
TIME_KEYS = ["step_time_ratio_hybrid_vs_ce", "step_time_ratio_chunked_hybrid_vs_ce", "step_time_ratio_chunked_vs_naive",
             "cached_vs_online_step_speedup", "onpolicy_vs_offpolicy_step_cost"]
# In one process at this size a step may not raise the resident size at all, so these may be NaN.
MEMORY_KEYS = ["peak_memory_ratio_hybrid_vs_ce", "peak_memory_ratio_chunked_hybrid_vs_ce", "peak_memory_ratio_chunked_vs_naive"]
PARITY_KEYS = ["parity_chunked_vs_naive_loss", "parity_fused_vs_naive_loss", "parity_chunked_vs_naive_grad",
               "parity_fused_vs_naive_grad"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    teacher = folder / "teacher"
    tiny_llama(len(lab_tokenizer()), seed=0, layers=3).save_pretrained(teacher)
    lab_tokenizer().save_pretrained(teacher)
    questions = folder / "arc.jsonl"
    rows = [{"id": f"q{i}", "question": {"stem": "+ - out : ;" * (i + 1), "choices": [
        {"label": "A", "text": "1 2"}, {"label": "B", "text": "3"}]}, "answerKey": "AB"[i % 2]} for i in range(6)]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    threads = torch.get_num_threads()
    try:
        return run_bench(str(teacher), str(questions), str(folder / "out"), TINY, threads=1, fresh_process=False), folder
    finally:
        torch.set_num_threads(threads)


def test_time_ratios_are_positive(result):
    values, _ = result
    for key in TIME_KEYS:
        assert math.isfinite(values[key]), key
        assert values[key] > 0, key


def test_memory_keys_are_reported(result):
    values, _ = result
    for key in MEMORY_KEYS:
        assert key in values, key
    for variant in ("ce", "hybrid", "naive", "fused"):
        assert values[f"{variant}_peak_mb"] >= 0, variant


def test_losses_match_naive_reference(result):
    values, _ = result
    for key in PARITY_KEYS:
        assert values[key] < 1e-4, key


def test_onpolicy_responses_respect_the_budget(result):
    values, _ = result
    longest_budget = TINY.cache_batch * TINY.cache_max_len
    assert 0 < values["onpolicy_response_tokens_per_step"] <= longest_budget
    assert values["onpolicy_vs_offpolicy_token_cost"] > 0


def test_json_file_matches_result(result):
    values, folder = result
    written = json.loads((folder / "out" / "bench_train.json").read_text())
    assert written["cached_vs_online_step_speedup"] == values["cached_vs_online_step_speedup"]
    assert written["cache_bytes_per_token"] == 8 * 8 + 4


def test_step_in_fresh_process():
    run = measure_step_in_process("hybrid", TINY, threads=1)
    assert run["variant"] == "hybrid"
    assert run["seconds_per_step"] > 0
    assert run["baseline_mb"] > 0
    assert run["peak_mb"] >= 0


def test_cli_has_train_target():
    args = build_parser().parse_args(["bench", "train", "--quick", "--out", "x"])
    assert args.quick
    assert args.func.__module__ == "bganalysis.bench.targets.train"
