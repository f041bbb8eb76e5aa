"""`--model` values: run folders, model folders, hub ids and GGUF files."""

from __future__ import annotations

import pytest

from bganalysis.evaluation import sources
from bganalysis.evaluation.runner import default_out
from tests.eval_helpers import tiny_byte_model


def test_run_folder_lists_students_and_owns_the_output(tmp_path):
    for name in ("soft", "hard"):
        tiny_byte_model(tmp_path / "run" / "students" / name)
    found = sources.resolve_models([str(tmp_path / "run")])
    assert [s.name for s in found] == ["hard", "soft"]
    assert default_out(found) == (tmp_path / "run").resolve() / "eval"


def test_student_folder_belongs_to_its_run(tmp_path):
    tiny_byte_model(tmp_path / "run" / "students" / "hard")
    found = sources.resolve_models([str(tmp_path / "run" / "students" / "hard"), "org/some-model"])
    assert found[0].run_dir == (tmp_path / "run").resolve() and found[1].name == "some-model"
    assert str(default_out(found)) == "runs/eval"  # models of different runs


def test_duplicate_names_get_suffixes(tmp_path):
    tiny_byte_model(tmp_path / "a" / "tiny")
    tiny_byte_model(tmp_path / "b" / "tiny")
    names = [s.name for s in sources.resolve_models([str(tmp_path / "a" / "tiny"), str(tmp_path / "b" / "tiny")])]
    assert names == ["tiny", "tiny-2"]


def test_model_hash_follows_the_weights():
    model, tokenizer = tiny_byte_model(seed=0)
    same, _ = tiny_byte_model(seed=0)
    other, _ = tiny_byte_model(seed=1)
    assert sources.model_hash(model, tokenizer) == sources.model_hash(same, tokenizer)
    assert sources.model_hash(model, tokenizer) != sources.model_hash(other, tokenizer)


@pytest.mark.slow
def test_gguf_file_is_imported_once(tmp_path, monkeypatch):
    from bganalysis.models import smollm2_gguf_path

    monkeypatch.setattr(sources, "GGUF_CACHE", tmp_path / "gguf")
    first = sources.resolve_models([str(smollm2_gguf_path())])[0]
    config = tmp_path.joinpath("gguf").glob("*/config.json")
    written = {path: path.stat().st_mtime_ns for path in config}
    assert len(written) == 1 and first.name.startswith("SmolLM2")
    again = sources.resolve_models([str(smollm2_gguf_path())])[0]
    assert again.path == first.path
    assert {path: path.stat().st_mtime_ns for path in written} == written
