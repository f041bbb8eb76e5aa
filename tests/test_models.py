"""Tests for bganalysis.models and the derive-student / import-gguf commands, on tiny models."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bganalysis.errors import UserError
from bganalysis.models import (
    check_model_output_folder,
    check_tokenizers_match,
    derive_student,
    load_causal_lm,
    load_tokenizer,
    select_layers,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 64


def make_tokenizer(size: int = VOCAB_SIZE, pad: str | None = "[PAD]", unk: str | None = "[UNK]"):
    """Build a whitespace WordLevel tokenizer with `size` tokens: specials, then word0, word1, ..."""
    specials = [t for t in ("[UNK]", "[PAD]", "<s>", "</s>") if t in (pad, unk, "<s>", "</s>")]
    words = [f"word{i}" for i in range(size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token=unk or "</s>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, pad_token=pad, bos_token="<s>", eos_token="</s>")


def make_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB_SIZE, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def truncated_reference(teacher, kept: list[int], layer_list: str):
    """Return a deep copy of `teacher` whose layer list holds only the layers in `kept`."""
    reference = copy.deepcopy(teacher)
    parent_name, attribute = layer_list.rsplit(".", 1)
    parent = reference.get_submodule(parent_name)
    setattr(parent, attribute, torch.nn.ModuleList([getattr(parent, attribute)[i] for i in kept]))
    reference.config.num_hidden_layers = len(kept)
    return reference


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.tensor([[5, 9, 2, 17, 33, 8, 41, 60], [3, 3, 12, 50, 7, 1, 22, 19]])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "teacher"
    make_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# --- load_causal_lm ----------------------------------------------------------------------


def test_load_causal_lm_round_trip(model_dir: Path, input_ids: torch.Tensor):
    model = load_causal_lm(str(model_dir))
    assert not model.training
    assert torch.equal(logits_of(model, input_ids), logits_of(make_llama(), input_ids))


def test_load_missing_path_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_causal_lm opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    started = time.perf_counter()
    for missing in (str(tmp_path / "absent"), "no-such-model-xyz", "no-such-org/no-such-model"):
        with pytest.raises(UserError, match="not found") as caught:
            load_causal_lm(missing)
        assert missing in str(caught.value)
    assert time.perf_counter() - started < 5


def test_load_folder_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        load_causal_lm(str(tmp_path / "empty"))


def test_load_folder_without_weights(model_dir: Path):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_causal_lm(str(model_dir))


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999, 0.0])
def test_load_truncated_safetensors(model_dir: Path, keep_fraction: float):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(UserError, match="truncated or corrupt") as caught:
        load_causal_lm(str(model_dir))
    assert str(weights) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_corrupt_safetensors_header(model_dir: Path):
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="truncated or corrupt") as caught:
        load_causal_lm(str(model_dir))
    assert "not a valid safetensors header" in str(caught.value)


def test_load_gguf_file_points_to_import(tmp_path: Path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match="bganalysis import-gguf"):
        load_causal_lm(str(fake))
    with pytest.raises(UserError, match="bganalysis import-gguf"):
        load_causal_lm(str(tmp_path))


def test_load_invalid_device(model_dir: Path):
    with pytest.raises(UserError, match="device"):
        load_causal_lm(str(model_dir), device="no-such-device")


def test_load_dtype_override(model_dir: Path):
    assert load_causal_lm(str(model_dir), dtype=torch.bfloat16).dtype == torch.bfloat16


# --- load_tokenizer ----------------------------------------------------------------------


def test_load_tokenizer_keeps_distinct_pad(model_dir: Path):
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.pad_token == "[PAD]"
    assert len(tokenizer) == VOCAB_SIZE


def test_load_tokenizer_replaces_eos_pad_with_unk(tmp_path: Path):
    make_tokenizer(pad="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "[UNK]"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == VOCAB_SIZE


def test_load_tokenizer_without_pad_candidate_adds_nothing(tmp_path: Path):
    make_tokenizer(pad=None, unk=None).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token is None
    assert len(tokenizer) == VOCAB_SIZE


def test_load_tokenizer_missing_files(tmp_path: Path):
    make_llama().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "absent"))


# --- check_tokenizers_match --------------------------------------------------------------


def test_tokenizers_match_accepts_equal():
    check_tokenizers_match(make_tokenizer(), make_tokenizer(), "t", "s")


def test_tokenizers_mismatch_names_sizes():
    with pytest.raises(UserError) as caught:
        check_tokenizers_match(make_tokenizer(64), make_tokenizer(40), "teacher-x", "student-y")
    message = str(caught.value)
    for part in ("teacher-x", "student-y", "64", "40", "derive-student"):
        assert part in message


def test_tokenizers_same_size_different_ids():
    reference = make_tokenizer()
    vocab = reference.get_vocab()
    vocab["word0"], vocab["word1"] = vocab["word1"], vocab["word0"]
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    swapped = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(UserError, match="different ids"):
        check_tokenizers_match(reference, swapped, "teacher-x", "student-y")


# --- derive_student ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_layers", "num_layers", "selection", "expected"),
    [
        (30, 6, "spread", [0, 6, 12, 17, 23, 29]),
        (4, 2, "spread", [0, 3]),
        (4, 3, "spread", [0, 2, 3]),
        (4, 4, "spread", [0, 1, 2, 3]),
        (4, 1, "spread", [0]),
        (30, 3, "first", [0, 1, 2]),
    ],
)
def test_select_layers_table(teacher_layers, num_layers, selection, expected):
    assert select_layers(teacher_layers, num_layers, selection) == expected


def test_derive_copies_kept_layers_exactly():
    teacher = make_llama()
    student = derive_student(teacher, 2, "spread")
    kept = student.config.bganalysis_derived_from_layers
    assert kept == [0, 3]
    assert student.config.num_hidden_layers == 2
    assert student.config.hidden_size == teacher.config.hidden_size
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, tensor in student_state.items():
        if key.startswith("model.layers."):
            index, rest = key.removeprefix("model.layers.").split(".", 1)
            source = f"model.layers.{kept[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(tensor, teacher_state[source]), key
        assert tensor.data_ptr() != teacher_state[source].data_ptr(), f"{key} shares memory with the teacher"


def test_derive_all_layers_equals_teacher(input_ids: torch.Tensor):
    teacher = make_llama()
    student = derive_student(teacher, 4)
    assert torch.equal(logits_of(student, input_ids), logits_of(teacher, input_ids))


@pytest.mark.parametrize("selection", ["spread", "first"])
def test_derive_logits_match_truncated_teacher(selection: str, input_ids: torch.Tensor):
    teacher = make_llama()
    student = derive_student(teacher, 3, selection)
    reference = truncated_reference(teacher, student.config.bganalysis_derived_from_layers, "model.layers")
    assert torch.equal(logits_of(student, input_ids), logits_of(reference, input_ids))


def test_derive_keeps_tied_embeddings(input_ids: torch.Tensor):
    teacher = make_llama(tied=True)
    student = derive_student(teacher, 2)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_derive_keeps_untied_lm_head():
    teacher = make_llama(tied=False)
    student = derive_student(teacher, 2)
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_derive_gpt2_matches_truncated_teacher(input_ids: torch.Tensor):
    teacher = make_gpt2()
    student = derive_student(teacher, 2)
    reference = truncated_reference(teacher, [0, 3], "transformer.h")
    assert student.config.n_layer == 2
    assert torch.equal(logits_of(student, input_ids), logits_of(reference, input_ids))


@pytest.mark.parametrize("num_layers", [0, 5, -1])
def test_derive_rejects_layer_count(num_layers: int):
    with pytest.raises(UserError, match="--layers from 1 to 4"):
        derive_student(make_llama(), num_layers)


def test_derive_rejects_selection():
    with pytest.raises(UserError, match="'spread' or 'first'"):
        derive_student(make_llama(), 2, "middle")


def test_derived_model_reloads(tmp_path: Path, input_ids: torch.Tensor):
    student = derive_student(make_llama(), 2)
    student.save_pretrained(tmp_path)
    reloaded = load_causal_lm(str(tmp_path))
    assert reloaded.config.bganalysis_derived_from_layers == [0, 3]
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(student, input_ids))


def test_output_folder_rejects_non_model_folder(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a model folder"):
        check_model_output_folder(tmp_path)
    with pytest.raises(UserError, match="is a file"):
        check_model_output_folder(tmp_path / "notes.txt")


# --- CLI ---------------------------------------------------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """Run `python -m bganalysis ARGV` in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "bganalysis", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, fragment: str) -> None:
    """Check exit status 2 and one error line last on stderr (progress bars may come before it)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith(f"bganalysis {command}: error:")]
    assert len(error_lines) == 1, result.stderr
    assert lines[-1] == error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in error_lines[0]


def test_cli_derive_student_missing_teacher(tmp_path: Path):
    result = run_cli("derive-student", str(tmp_path / "absent"), "--layers", "2", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "derive-student", "model not found")
    assert not (tmp_path / "out").exists()


def test_cli_derive_student_bad_layer_count(model_dir: Path, tmp_path: Path):
    result = run_cli("derive-student", str(model_dir), "--layers", "9", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "derive-student", "--layers from 1 to 4")
    assert not (tmp_path / "out").exists()


def test_cli_derive_student_writes_model(model_dir: Path, tmp_path: Path):
    out = tmp_path / "student"
    result = run_cli("derive-student", str(model_dir), "--layers", "2", "--selection", "first", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stderr
    student = load_causal_lm(str(out))
    assert student.config.bganalysis_derived_from_layers == [0, 1]
    check_tokenizers_match(load_tokenizer(str(model_dir)), load_tokenizer(str(out)), "teacher", "student")


def test_cli_import_gguf_rejects_non_gguf(tmp_path: Path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    result = run_cli("import-gguf", str(not_gguf), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "import-gguf", "not a GGUF file")
