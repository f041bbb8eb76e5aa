"""Fixtures of the fault suite: real model folders and prompt files, good and bad, built once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bganalysis.lab import lab_tokenizer, sample_documents
from tests.faults.cli import ANALYZE, CACHE, GENERATE, TRAIN, ok, run
from tests.test_cli_errors import _other_tokenizer as other_tokenizer
from tests.helpers import tiny_llama

LAB_VOCAB = 39


def _lab_rows(count: int, seed: int) -> list[dict]:
    tokenizer = lab_tokenizer()
    rows = []
    for number, document in enumerate(sample_documents(count, seed)):
        prompt = tokenizer.decode(document.prompt_ids, skip_special_tokens=True)
        response = tokenizer.decode(document.response_ids, skip_special_tokens=True)
        rows.append({"id": f"doc{number}", "prompt": prompt, "response": response})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict:
    """Good and bad inputs by name: model folders, prompt files, a GGUF-named file."""
    root = tmp_path_factory.mktemp("fault_inputs")
    paths = {}

    student = paths["student"] = root / "student"
    tiny_llama(LAB_VOCAB, seed=1).save_pretrained(student)
    lab_tokenizer().save_pretrained(student)

    other = paths["other_student"] = root / "other_student"
    tokenizer = other_tokenizer()
    tiny_llama(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)

    paths["not_model"] = root / "tokenizer_only"
    lab_tokenizer().save_pretrained(paths["not_model"])

    truncated = paths["truncated"] = root / "truncated"
    shutil.copytree(student, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    unreadable = paths["unreadable_model"] = root / "unreadable_model"
    shutil.copytree(student, unreadable)
    unreadable.chmod(0)

    paths["missing"] = root / "no_such_thing"

    rows = _lab_rows(6, seed=3)
    files = {
        "prompts": _jsonl(rows),
        "empty": "",
        "malformed": _jsonl(rows[:2]) + '{"prompt": "calc 1 + 2 :"\n',
        "no_prompt": _jsonl(rows[:1]) + json.dumps({"question": "calc 1 + 2 :", "response": "x"}) + "\n",
        "unreadable_prompts": _jsonl(rows),
    }
    for name, text in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text(text, encoding="utf-8")
    paths["not_utf8"] = root / "not_utf8.jsonl"
    paths["not_utf8"].write_bytes(_jsonl(rows[:1]).encode() + b'{"prompt": "caf\xe9", "response": "x"}\n')
    paths["unreadable_prompts"].chmod(0)

    fake_gguf = paths["not_gguf"] = root / "model.gguf"
    fake_gguf.write_bytes(b"this is not a GGUF file\n")
    truncated_gguf = paths["truncated_gguf"] = root / "cut.gguf"
    truncated_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    return paths


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory) -> Path:
    """The student of one uninterrupted `train` run (cli.TRAIN)."""
    out = tmp_path_factory.mktemp("train_reference")
    ok(run(["train", *TRAIN, "--out", str(out)], out))
    return out / "students" / "hybrid"


@pytest.fixture(scope="session")
def generate_reference(tmp_path_factory) -> Path:
    """The output file of one uninterrupted `generate` run (cli.GENERATE)."""
    out = tmp_path_factory.mktemp("generate_reference") / "labels.jsonl"
    ok(run(["generate", *GENERATE, "--out", str(out)], out.parent))
    return out


@pytest.fixture(scope="session")
def analyze_reference(tmp_path_factory, inputs) -> Path:
    """The analysis folder of one uninterrupted `analyze` run (cli.ANALYZE) of the lab student."""
    out = tmp_path_factory.mktemp("analyze_reference")
    ok(run(["analyze", *ANALYZE, "--student", str(inputs["student"]), "--out", str(out)], out))
    return out / "analysis"


@pytest.fixture(scope="session")
def cache_reference(tmp_path_factory) -> Path:
    """The folder of one uninterrupted `cache-teacher` run (cli.CACHE)."""
    out = tmp_path_factory.mktemp("cache_reference") / "cache"
    ok(run(["cache-teacher", *CACHE, "--out", str(out)], out.parent))
    return out
