"""Tests for `bganalysis generate`: output rows, seeds, batching, resuming and the CLI errors."""

import json
from pathlib import Path

import pytest
import torch

from bganalysis.cli import main
from bganalysis.generate import RowSampler, meta_path
from bganalysis.lab import LabProcess, lab_tokenizer
from bganalysis.train import TrainConfig, train
from tests.helpers import tiny_llama

FIELDS = {"id", "prompt", "response", "sample", "finish_reason", "response_tokens"}


def _generate(out: Path, *extra: str, teacher: str = "lab") -> int:
    args = ["generate", "--teacher", teacher, "--out", str(out), "--max-new-tokens", "64"]
    if teacher == "lab" and "--prompts" not in extra:
        args += ["--lab-prompts", "6"]
    return main(args + list(extra))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lab_output(tmp_path_factory) -> Path:
    """Six lab prompts, one response each, batch size 4: the reference file of the lab tests."""
    out = tmp_path_factory.mktemp("lab") / "responses.jsonl"
    assert _generate(out, "--batch-size", "4") == 0
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama over the lab vocabulary, saved with the lab tokenizer."""
    folder = tmp_path_factory.mktemp("llama")
    tokenizer = lab_tokenizer()
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_prompts(tmp_path_factory) -> Path:
    """Prompts of different lengths, so batches of two need left padding."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = ["calc 1 + 2 :", "prog 2 :", "calc 3 - 4 + 5 - 6 :", "prog 1 :", "calc 7 :"]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


# --- lab teacher ----------------------------------------------------------------------------


def test_lab_rows_have_fields(lab_output):
    rows = _rows(lab_output)
    assert len(rows) == 6
    for row in rows:
        assert set(row) == FIELDS
        assert row["sample"] == 0
        assert row["finish_reason"] == "eos"
        assert row["response"]
        assert "<eos>" not in row["response"]
    meta = json.loads(meta_path(lab_output).read_text())
    assert meta["settings"]["temperature"] == 1.0
    assert meta["settings"]["teacher"] == "lab"
    assert "torch" in meta["provenance"]


def test_lab_responses_are_valid_continuations(lab_output):
    tokenizer, process = lab_tokenizer(), LabProcess()
    rows = _rows(lab_output)
    corrupt = 0
    for row in rows:
        ids = tokenizer(row["prompt"] + " " + row["response"])["input_ids"] + [tokenizer.eos_token_id]
        assert len(ids) - len(tokenizer(row["prompt"])["input_ids"]) == row["response_tokens"]
        corrupt += any(state.corrupt for state in process.states_along(ids[:-1]))
    # The teacher makes a mistake with probability 1e-4 per token, so six documents are almost surely clean.
    assert corrupt == 0


def test_same_seed_same_file(lab_output, tmp_path):
    out = tmp_path / "again.jsonl"
    assert _generate(out, "--batch-size", "4") == 0
    assert out.read_bytes() == lab_output.read_bytes()


def test_batch_size_does_not_change_lab_output(lab_output, tmp_path):
    out = tmp_path / "batch1.jsonl"
    assert _generate(out, "--batch-size", "1") == 0
    assert out.read_bytes() == lab_output.read_bytes()


def test_other_seed_other_responses(lab_output, tmp_path):
    out = tmp_path / "seed1.jsonl"
    assert _generate(out, "--batch-size", "4", "--seed", "1") == 0
    assert out.read_bytes() != lab_output.read_bytes()


def test_resume_after_limit_equals_one_shot(lab_output, tmp_path):
    out = tmp_path / "resumed.jsonl"
    assert _generate(out, "--batch-size", "4", "--limit", "3") == 0
    assert len(_rows(out)) == 3
    assert _generate(out, "--batch-size", "4") == 0
    assert out.read_bytes() == lab_output.read_bytes()


def test_resume_drops_cut_off_last_line(lab_output, tmp_path, caplog):
    out = tmp_path / "cut.jsonl"
    assert _generate(out, "--batch-size", "4") == 0
    data = out.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(data[: last_line_start + 10])  # a write killed 10 bytes into the last row

    assert _generate(out, "--batch-size", "4") == 0
    assert out.read_bytes() == lab_output.read_bytes()
    assert "cut-off last line" in caplog.text


def test_samples_per_prompt_are_distinct(tmp_path):
    out = tmp_path / "samples.jsonl"
    assert _generate(out, "--samples-per-prompt", "3", "--limit", "2") == 0
    rows = _rows(out)
    assert [(row["id"], row["sample"]) for row in rows] == [(i, s) for i in ("lab0", "lab1") for s in range(3)]
    assert len({row["response"] for row in rows if row["id"] == "lab1"}) > 1


# --- CLI errors -------------------------------------------------------------------------------


def test_changed_settings_rejected_without_force(lab_output, tmp_path, capsys):
    out = tmp_path / "changed.jsonl"
    assert _generate(out, "--limit", "2") == 0
    capsys.readouterr()

    assert _generate(out, "--temperature", "0.5") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert "temperature (1.0 -> 0.5)" in error
    assert "--force" in error

    assert _generate(out, "--temperature", "0.5", "--force") == 0
    assert len(_rows(out)) == 6
    assert json.loads(meta_path(out).read_text())["settings"]["temperature"] == 0.5


@pytest.mark.parametrize("extra, expected", [
    (["--top-p", "0"], "--top-p 0.0 is invalid"),
    (["--temperature", "-1"], "--temperature -1.0 is invalid"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt 0 is invalid"),
    (["--prompts", "missing.jsonl"], "prompts file not found"),
])
def test_invalid_input_exits_2(tmp_path, capsys, extra, expected):
    assert _generate(tmp_path / "out.jsonl", *extra) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert expected in error


def test_hf_teacher_needs_prompts(tmp_path, llama_dir, capsys):
    assert _generate(tmp_path / "out.jsonl", teacher=str(llama_dir)) == 2
    assert "--prompts is missing" in capsys.readouterr().err


def test_foreign_output_file_rejected(tmp_path, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")
    assert _generate(out) == 2
    assert "meta.json is missing" in capsys.readouterr().err
    assert out.read_text() == "my own notes\n"


def test_missing_teacher_writes_no_meta(tmp_path, llama_prompts, capsys):
    out = tmp_path / "out.jsonl"
    assert _generate(out, "--prompts", str(llama_prompts), teacher=str(tmp_path / "no-such-model")) == 2
    assert "not found" in capsys.readouterr().err
    assert not meta_path(out).exists()


# --- Hugging Face teacher --------------------------------------------------------------------


def test_llama_batch_of_two_equals_batch_of_one(tmp_path, llama_dir, llama_prompts):
    single, paired = tmp_path / "single.jsonl", tmp_path / "paired.jsonl"
    common = ["--prompts", str(llama_prompts), "--max-new-tokens", "8"]
    assert _generate(single, *common, "--batch-size", "1", teacher=str(llama_dir)) == 0
    assert _generate(paired, *common, "--batch-size", "2", teacher=str(llama_dir)) == 0

    rows = _rows(single)
    assert len(rows) == 5
    assert all(set(row) == FIELDS for row in rows)
    assert all(row["response_tokens"] <= 8 for row in rows)
    assert paired.read_bytes() == single.read_bytes()


def test_greedy_ignores_seed_and_batch_size(tmp_path, llama_dir, llama_prompts):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["--prompts", str(llama_prompts), "--max-new-tokens", "8", "--temperature", "0"]
    assert _generate(first, *common, "--seed", "1", "--batch-size", "4", teacher=str(llama_dir)) == 0
    assert _generate(second, *common, "--seed", "2", "--batch-size", "1", teacher=str(llama_dir)) == 0
    assert first.read_bytes() == second.read_bytes()


def test_llama_output_trains_a_student(tmp_path, llama_dir, llama_prompts):
    out = tmp_path / "labels.jsonl"
    assert _generate(out, "--prompts", str(llama_prompts), "--max-new-tokens", "8", teacher=str(llama_dir)) == 0
    config = TrainConfig(
        teacher=str(llama_dir), data=str(out), student="tiny", steps=2, batch_size=2, warmup_steps=1,
        student_hidden=32, student_layers=1, student_heads=2, student_kv_heads=1, student_intermediate=64,
        out=str(tmp_path / "run"), device="cpu", log_every=1,
    )
    folder = train(config)
    assert (Path(folder) / "config.json").is_file()


# --- RowSampler -------------------------------------------------------------------------------


def test_row_sampler_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(4000, 4).clone()
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    chosen = RowSampler(generators, temperature=1.0, top_p=1.0)(None, scores).argmax(dim=1)
    counts = torch.bincount(chosen, minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    assert counts[3] == 0


def test_row_sampler_top_p_drops_tail():
    scores = torch.tensor([0.5, 0.3, 0.2]).log().expand(500, 3).clone()
    generators = [torch.Generator().manual_seed(i) for i in range(500)]
    chosen = RowSampler(generators, temperature=1.0, top_p=0.7)(None, scores).argmax(dim=1)
    assert set(chosen.tolist()) == {0, 1}


def test_row_sampler_row_ignores_neighbours():
    row = torch.randn(1, 10)
    alone = RowSampler([torch.Generator().manual_seed(7)], 1.0, 1.0)(None, row.clone())
    batch = torch.cat([torch.randn(1, 10), row])
    together = RowSampler([torch.Generator().manual_seed(1), torch.Generator().manual_seed(7)], 1.0, 1.0)(None, batch)
    assert torch.equal(together[1], alone[0])

