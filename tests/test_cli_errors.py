"""The CLI on bad input: exit status 2, one error line, no traceback, no output files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bganalysis.lab import lab_tokenizer
from tests.helpers import tiny_llama

LAB_VOCAB = 39
OTHER_WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + "the cat dog sat ran on a mat log big small red".split()


def _environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Tiny models gain nothing from more threads, and on a shared 2-core machine two
    # OpenMP threads made `demo --quick` about 3 times slower.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bganalysis", *args], cwd=cwd, env=_environment(),
                          capture_output=True, text=True, timeout=300)


def _assert_one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """Assert that the CLI failed as a user error, and return the error message."""
    prefix = f"bganalysis {command}: error:"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sum(line.startswith(prefix) for line in lines) == 1, result.stderr
    assert lines[-1].startswith(prefix), result.stderr
    return lines[-1]


def _assert_no_outputs(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(str(p) for p in out.rglob("*"))


def _other_tokenizer(words: list[str] = OTHER_WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Save a lab student, a student with another tokenizer, a tokenizer-only folder and prompt files."""
    root = tmp_path_factory.mktemp("cli")
    student = root / "student"
    tiny_llama(LAB_VOCAB, seed=1).save_pretrained(student)
    lab_tokenizer().save_pretrained(student)

    other = root / "other_student"
    tiny_llama(len(OTHER_WORDS), seed=1).save_pretrained(other)
    _other_tokenizer().save_pretrained(other)

    not_model = root / "tokenizer_only"
    lab_tokenizer().save_pretrained(not_model)

    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "calc 3 + 5 :"}) + "\n")
    malformed = root / "malformed.jsonl"
    malformed.write_text(json.dumps({"prompt": "calc 3 + 5 :"}) + "\n" + '{"prompt": "calc 1 + 2 :"\n')
    empty = root / "empty.jsonl"
    empty.write_text("")
    duplicate = root / "duplicate_ids.jsonl"
    duplicate.write_text(json.dumps({"id": "x", "prompt": "calc 3 + 5 :"}) + "\n"
                         + json.dumps({"id": "x", "prompt": "prog 2 :"}) + "\n")
    return {"student": student, "other": other, "not_model": not_model, "prompts": prompts,
            "malformed": malformed, "empty": empty, "duplicate": duplicate}


def _analyze(folders, out: Path, teacher: str = "lab", student: str = "student", prompts: str = "prompts",
             extra: tuple = ()) -> list[str]:
    return ["analyze", "--teacher", teacher, "--student", str(folders[student]), "--prompts", str(folders[prompts]),
            "--out", str(out), "--max-new-tokens", "4", "--kappa-k", "2", "--kappa-rollouts", "2",
            "--kappa-horizon", "2", "--bootstrap", "10", *extra]


def test_analyze_missing_teacher(folders, tmp_path):
    out, teacher = tmp_path / "out", tmp_path / "no_such_teacher"
    result = _run(_analyze(folders, out, teacher=str(teacher)), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert str(teacher) in message
    _assert_no_outputs(out)


def test_analyze_student_not_a_model(folders, tmp_path):
    out = tmp_path / "out"
    result = _run(_analyze(folders, out, student="not_model"), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert str(folders["not_model"]) in message
    assert "config.json" in message
    _assert_no_outputs(out)


def test_analyze_malformed_prompt_line(folders, tmp_path):
    out = tmp_path / "out"
    result = _run(_analyze(folders, out, prompts="malformed"), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert f"{folders['malformed']}:2:" in message
    _assert_no_outputs(out)


def test_analyze_empty_prompts_file(folders, tmp_path):
    out = tmp_path / "out"
    result = _run(_analyze(folders, out, prompts="empty"), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert str(folders["empty"]) in message
    _assert_no_outputs(out)


def test_analyze_different_tokenizers(folders, tmp_path):
    out = tmp_path / "out"
    result = _run(_analyze(folders, out, student="other"), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert f"vocabulary {LAB_VOCAB}" in message
    assert f"vocabulary {len(OTHER_WORDS)}" in message
    _assert_no_outputs(out)


def test_analyze_invalid_kappa_rollouts(folders, tmp_path):
    out = tmp_path / "out"
    args = _analyze(folders, out)
    args[args.index("--kappa-rollouts") + 1] = "1"
    result = _run(args, tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert "--kappa-rollouts 1" in message
    _assert_no_outputs(out)


def test_analyze_duplicate_prompt_ids(folders, tmp_path):
    # Rows that share an id would be labelled as one document and give tokens.parquet two
    # rows per (document, position, model).
    out = tmp_path / "out"
    result = _run(_analyze(folders, out, prompts="duplicate"), tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert str(folders["duplicate"]) in message
    assert "'x'" in message or '"x"' in message
    _assert_no_outputs(out)


@pytest.mark.parametrize("option, value", [("--max-docs", "0"), ("--max-docs", "-1"), ("--lab-docs", "0")])
def test_analyze_invalid_document_count(folders, tmp_path, option, value):
    out = tmp_path / "out"
    args = _analyze(folders, out, extra=(option, value))
    if option == "--lab-docs":
        index = args.index("--prompts")
        del args[index:index + 2]
    result = _run(args, tmp_path)
    message = _assert_one_error_line(result, "analyze")
    assert f"{option} {value}" in message
    _assert_no_outputs(out)


def test_tokenizers_same_size_different_ids():
    from bganalysis.errors import UserError
    from bganalysis.models import check_tokenizers_match

    teacher = _other_tokenizer()
    swapped = list(OTHER_WORDS)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    student = _other_tokenizer(swapped)
    with pytest.raises(UserError) as error:
        check_tokenizers_match(teacher, student, "T", "S")
    assert f"both have {len(OTHER_WORDS)} tokens" in str(error.value)
    assert repr(OTHER_WORDS[4]) in str(error.value) or repr(OTHER_WORDS[5]) in str(error.value)


def test_train_lam_out_of_range(tmp_path):
    out = tmp_path / "out"
    result = _run(["train", "--lam", "2", "--out", str(out)], tmp_path)
    message = _assert_one_error_line(result, "train")
    assert "lam" in message
    _assert_no_outputs(out)


def test_demo_lam_out_of_range(tmp_path):
    out = tmp_path / "out"
    result = _run(["demo", "--lam", "3", "--out", str(out)], tmp_path)
    message = _assert_one_error_line(result, "demo")
    assert "--lam 3" in message
    _assert_no_outputs(out)


def test_demo_quick_writes_run(tmp_path):
    out = tmp_path / "run"
    result = _run(["demo", "--quick", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("report.md", "config.yaml", "analysis/tokens.parquet", "analysis/steps.parquet",
                 "analysis/summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
