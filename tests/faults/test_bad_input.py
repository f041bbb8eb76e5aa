"""The catalogue of bad inputs, run through the real CLI.

Each case must end with exit status 2, one error line on stderr (the last) that names
the bad value and says what to do, no traceback, and nothing written under --out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.cli import environment, error_line, files_under, run

TINY_TRAIN = ["--steps", "2", "--num-docs", "8", "--batch-size", "2", "--student-hidden", "16",
              "--student-intermediate", "32", "--student-layers", "1", "--student-heads", "2",
              "--student-kv-heads", "1", "--device", "cpu", "--max-len", "64", "--save-every", "0"]
TINY_ANALYZE = ["--max-new-tokens", "4", "--kappa-k", "2", "--kappa-rollouts", "2", "--kappa-horizon", "2",
                "--bootstrap", "10", "--ro-samples", "1"]
# A message ends with what to do: an imperative, or the rule the value must meet.
FIX = re.compile(r"\b(pass|use|add|give|check|choose|delete|fix|re-save|re-encode|install|set|remove|rerun|see|lower"
                 r"|must be)\b|\brun `")
MODEL_FAULTS = ["missing", "not_model", "truncated", "unreadable_model"]
PROMPT_FAULTS = ["missing", "empty", "not_utf8", "malformed", "no_prompt", "unreadable_prompts"]


def _train(inputs, out, teacher="lab", student="tiny", data="lab", extra=()):
    return ["train", "--teacher", str(inputs.get(teacher, teacher)), "--student", str(inputs.get(student, student)),
            "--data", str(inputs.get(data, data)), "--out", str(out), *TINY_TRAIN, *extra]


def _generate(inputs, out, teacher="lab", prompts="prompts", extra=()):
    return ["generate", "--teacher", str(inputs.get(teacher, teacher)), "--prompts", str(inputs[prompts]),
            "--out", str(out), "--max-new-tokens", "4", *extra]


def _analyze(inputs, out, teacher="lab", student="student", prompts="prompts", extra=()):
    return ["analyze", "--teacher", str(inputs.get(teacher, teacher)), "--student", str(inputs[student]),
            "--prompts", str(inputs[prompts]), "--out", str(out), *TINY_ANALYZE, *extra]


def _cache(inputs, out, teacher="lab", data="prompts", extra=()):
    return ["cache-teacher", "--teacher", str(inputs.get(teacher, teacher)), "--data", str(inputs[data]),
            "--out", str(out), "--k", "4", "--device", "cpu", "--max-len", "64", *extra]


def _recipe(out: Path) -> str:
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("method: hybrid\nlr: [4, 8]\n")
    return str(recipe)


def _cases() -> dict[str, tuple]:
    """Case id -> (command, argv builder (inputs, out), the value the message must name, other words it must hold)."""
    cases = {}
    for fault in MODEL_FAULTS:
        cases[f"train-teacher-{fault}"] = ("train", lambda i, o, f=fault: _train(i, o, teacher=f, data="prompts"), fault, ())
    for fault in PROMPT_FAULTS:
        cases[f"train-data-{fault}"] = ("train", lambda i, o, f=fault: _train(i, o, teacher="student", data=f), fault, ())
    for fault in ("truncated", "unreadable_model"):
        cases[f"analyze-student-{fault}"] = ("analyze", lambda i, o, f=fault: _analyze(i, o, student=f), fault, ())
    for fault in ("not_utf8", "no_prompt"):
        cases[f"analyze-prompts-{fault}"] = ("analyze", lambda i, o, f=fault: _analyze(i, o, prompts=f), fault, ())
    for fault in ("missing", "not_model"):
        cases[f"derive-student-{fault}"] = (
            "derive-student", lambda i, o, f=fault: ["derive-student", str(i[f]), "--layers", "1", "--out", str(o)], fault, ())
    for fault in ("missing", "truncated"):
        cases[f"generate-teacher-{fault}"] = ("generate", lambda i, o, f=fault: _generate(i, o, teacher=f), fault, ())
    for fault in ("empty", "not_utf8"):
        cases[f"generate-prompts-{fault}"] = ("generate", lambda i, o, f=fault: _generate(i, o, prompts=f), fault, ())
    for fault in ("not_model", "unreadable_model"):
        cases[f"cache-teacher-{fault}"] = ("cache-teacher", lambda i, o, f=fault: _cache(i, o, teacher=f), fault, ())
    for fault in ("malformed", "unreadable_prompts"):
        cases[f"cache-data-{fault}"] = ("cache-teacher", lambda i, o, f=fault: _cache(i, o, data=f), fault, ())
    for fault in ("missing", "not_gguf", "truncated_gguf", "unreadable_prompts"):
        cases[f"import-gguf-{fault}"] = (
            "import-gguf", lambda i, o, f=fault: ["import-gguf", str(i[f]), "--out", str(o)], fault, ())

    cases["train-tokenizer-mismatch"] = ("train", lambda i, o: _train(i, o, student="other_student"), "other_student",
                                         ("vocabulary 39", "vocabulary 16"))
    cases["analyze-tokenizer-mismatch"] = ("analyze", lambda i, o: _analyze(i, o, student="other_student"), "other_student", ())
    for flag, value, listed in [
        ("--lam", "half", ("lam",)), ("--steps", "2.5", ("steps",)), ("--loss-temperature", "nan", ("loss_temperature",)),
        ("--weight-scheme", "sometimes", ("static", "confidence", "entropy", "bridge_garden", "risk_guided")),
        ("--divergence", "kl", ("forward_kl", "reverse_kl", "jsd", "total_variation")),
    ]:
        cases[f"train{flag}-{value}"] = ("train", lambda i, o, f=flag, v=value: _train(i, o, extra=(f, v)), value, listed)
    cases["train-recipe-wrong-type"] = (
        "train", lambda i, o: _train(i, o, extra=("--recipe", _recipe(o))), "lr", ("[4, 8]",))
    for flag, value, listed in [("--kappa-sampling", "quasi", ("stratified", "common", "independent")),
                                ("--label-ranking", "risk", ("kappa", "kappa_abs", "kappa_spread")),
                                ("--estimators", "rollouts", ("monte_carlo", "teacher_only")),
                                ("--bridge-fraction", "0.8", ())]:
        cases[f"analyze{flag}-{value}"] = ("analyze", lambda i, o, f=flag, v=value: _analyze(i, o, extra=(f, v)), value, listed)
    for flag, value in [("--top-p", "0"), ("--max-new-tokens", "four")]:
        cases[f"generate{flag}-{value}"] = ("generate", lambda i, o, f=flag, v=value: _generate(i, o, extra=(f, v)), value, ())
    for flag, value, named in [("--k", "100", "k=100"), ("--max-len", "1", "1")]:
        cases[f"cache-teacher{flag}-{value}"] = (
            "cache-teacher", lambda i, o, f=flag, v=value: _cache(i, o, extra=(f, v)), named, ())
    for layers in ("3", "two"):
        cases[f"derive-student-layers-{layers}"] = (
            "derive-student", lambda i, o, n=layers: ["derive-student", str(i["student"]), "--layers", n, "--out", str(o)],
            layers, ())
    cases["cache-teacher-other-settings"] = (
        "cache-teacher", lambda i, o: _cache(i, _manifest(o)), "k 8 -> 4", ("--force",))
    return cases


def _manifest(out: Path) -> Path:
    """Make `out` look like a cache built with k=8."""
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"k": 8, "loss_temperature": 1.0, "teacher": "lab"}))
    return out


CASES = _cases()
PREPARED = {"train-recipe-wrong-type": ["recipe.yaml"], "cache-teacher-other-settings": ["out", "out/manifest.json"]}


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory) -> dict:
    """Run every case of CASES, a few at a time, and return id -> (CompletedProcess, out path)."""
    root = tmp_path_factory.mktemp("bad_input")

    def one(name: str):
        command, build, _, _ = CASES[name]
        out = root / name / ("out.jsonl" if command == "generate" else "out")
        out.parent.mkdir()
        return name, (run(build(inputs, out), out.parent), out)

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(results, inputs, name):
    command, _, value, words = CASES[name]
    result, out = results[name]
    message = error_line(result, command)
    assert str(inputs.get(value, value)) in message, message
    assert FIX.search(message), f"the message says no fix: {message}"
    for word in words:
        assert word in message, message
    assert files_under(out.parent) == PREPARED.get(name, [])


@pytest.mark.parametrize("command", ["derive-student", "import-gguf"])
def test_model_output_over_other_files(inputs, tmp_path, command):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = inputs["student"] if command == "derive-student" else inputs["truncated_gguf"]
    args = [command, str(source), "--out", str(out)] + (["--layers", "1"] if command == "derive-student" else [])
    message = error_line(run(args, tmp_path), command)
    assert str(out) in message
    assert files_under(out) == ["keep.txt"]


def test_cli_parser_does_not_import_torch():
    # A bad flag must be reported at once: building the parser may not load torch or transformers.
    code = ("import sys; from bganalysis.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout.replace("'", '"')) == [], result.stderr


def _one_step_train(teacher: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    """One optimiser step of a tiny student on `data`, logged."""
    return ["train", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "1",
            "--batch-size", str(batch_size), "--log-every", "1", "--student-hidden", "16", "--student-intermediate", "32",
            "--student-layers", "1", "--student-heads", "2", "--student-kv-heads", "1", "--device", "cpu"]


def test_train_learns_eos_without_a_pad_token(tmp_path):
    # With no pad token, batches are padded with EOS; the EOS label at each response end must still count.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import tiny_llama

    words = ["<bos>", "<eos>", "calc", "3", "+", "5", ":", "8", "1", "2"]
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token="<bos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")
    teacher = tmp_path / "teacher"
    tiny_llama(len(words), seed=2).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = [("calc 3 + 5 :", "8"), ("calc 1 :", "1 2"), ("calc 2 + 1 + 5 :", "8"), ("calc 1 + 1 :", "2 2 2")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    out = tmp_path / "out"
    result = run(_one_step_train(teacher, data, out, batch_size=4), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "students" / "hybrid" / "train_log.jsonl").read_text().splitlines()[0])
    assert record["loss_tokens"] == sum(len(r.split()) + 1 for _, r in rows)  # each response and its EOS


@pytest.fixture(scope="module")
def short_context_teacher(tmp_path_factory) -> Path:
    """A GPT-2 teacher (learned positions) with a context of 16 tokens, on the lab tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bganalysis.lab import lab_tokenizer

    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("short_context") / "teacher"
    tokenizer = lab_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LONG_PROMPT = "calc " + " + ".join(["3", "5"] * 8) + " :"  # 35 tokens with BOS, more than the context of 16


@pytest.mark.parametrize("command", ["generate", "train"])
def test_prompt_longer_than_context(short_context_teacher, tmp_path, command):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": LONG_PROMPT, "response": "out y 6"}) + "\n")
    if command == "generate":
        out = tmp_path / "labels.jsonl"
        args = ["generate", "--teacher", str(short_context_teacher), "--prompts", str(data), "--out", str(out),
                "--max-new-tokens", "4"]
    else:
        out = tmp_path / "out"
        args = _one_step_train(short_context_teacher, data, out, batch_size=1)
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "context" in result.stderr and "WARNING" in result.stderr
    if command == "generate":
        row = json.loads(out.read_text().splitlines()[0])
        assert row["response_tokens"] >= 1
    else:
        record = json.loads((out / "students" / "hybrid" / "train_log.jsonl").read_text().splitlines()[0])
        assert record["loss_tokens"] == 4  # "out y 6" and its EOS: the prompt was cut, not the response
