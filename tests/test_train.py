"""Tests for the trainer: config validation, data masking, training runs and the CLI command."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bganalysis.commands import train as train_command
from bganalysis.errors import UserError
from bganalysis.losses import masked_mean
from bganalysis.train import TrainConfig, _lr_factor, train
from bganalysis.train_loss import SoftWeights
from bganalysis.trainer import micro_batch_parts
from bganalysis.train_data import Example, collate, jsonl_examples, truncate

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat dog sat ran on a mat log big small red blue and then".split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama teacher with its word-level tokenizer, saved like any HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = _tokenizer()
    torch.manual_seed(123)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"prompt": "the cat sat", "response": "on a mat"},
        {"prompt": "the dog ran", "response": "on a log and then sat"},
        {"prompt": "a big red cat", "response": "sat on the small blue mat"},
        {"prompt": "the small dog", "response": "ran"},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _small_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        student_hidden=32, student_layers=1, student_heads=2, student_kv_heads=1, student_intermediate=64,
        num_docs=64, steps=4, batch_size=4, warmup_steps=1, log_every=2, out=str(tmp_path), device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


# --- config ----------------------------------------------------------------------------------


def test_config_lam_follows_method():
    assert TrainConfig().lam == 0.5
    assert TrainConfig(method="hard").lam == 0.0
    assert TrainConfig(method="soft").lam == 1.0
    assert TrainConfig(method="soft").name == "soft"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"lam": 2}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"method": "hard", "lam": 0.5}, "lam"),
        ({"method": "soft", "lam": 0.0}, "lam"),
        ({"method": "distill"}, "method"),
        ({"hard_target": "greedy"}, "hard_target"),
        ({"loss_temperature": 0}, "loss_temperature"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": "two"}, "grad_accum"),
        ({"lr": "fast"}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"max_grad_norm": -1}, "max_grad_norm"),
        ({"device": "gpu"}, "device"),
        ({"name": "../escape"}, "name"),
        ({"student_hidden": 130}, "student_hidden"),
        ({"student_kv_heads": 3}, "student_kv_heads"),
        ({"data": "missing.jsonl"}, "data"),
        ({"chat_template": "maybe"}, "chat_template"),
    ],
)
def test_config_rejects_invalid(overrides, key):
    with pytest.raises(UserError) as caught:
        TrainConfig(**overrides)
    message = str(caught.value)
    assert f"invalid {key}=" in message
    assert "--" + key.replace("_", "-") in message
    assert "\n" not in message


def test_config_converts_strings():
    config = TrainConfig(lr="1e-3", steps="5", lam="0.25", chat_template="false", warmup_steps="0")
    assert config.lr == 0.001
    assert config.steps == 5
    assert config.lam == 0.25
    assert config.chat_template is False


def test_lr_schedule_warmup_then_cosine():
    factor = _lr_factor(warmup_steps=4, steps=10)
    factors = [factor(update) for update in range(10)]
    assert factors[0] == 0.25  # the first update already learns
    assert factors[3] == 1.0
    assert factors[4] == 1.0
    assert all(later < earlier for earlier, later in zip(factors[4:], factors[5:]))
    assert factors[-1] > 0.0


# --- data --------------------------------------------------------------------------------------


def test_collate_masks_prompt_and_padding():
    batch = collate([Example([1, 5, 6, 7, 2], 2), Example([1, 8, 2], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Position t predicts token t + 1; only response tokens (with the final EOS) are targets.
    assert batch["targets"].tolist() == [[-100, 6, 7, 2, -100], [8, 2, -100, -100, -100]]


def test_collate_pad_with_eos_keeps_eos_target():
    batch = collate([Example([1, 5, 2], 1), Example([1, 2], 1)], pad_id=2)
    assert batch["targets"].tolist() == [[5, 2, -100], [2, -100, -100]]


def test_truncate_cuts_prompt_from_left():
    example, cut = truncate([1, 10, 11, 12, 13], [20, 21, 2], max_len=5)
    assert cut == "prompt"
    assert example.ids == [12, 13, 20, 21, 2]
    assert example.prompt_length == 2


def test_truncate_keeps_one_prompt_token():
    example, cut = truncate([1, 10], [20, 21, 22, 2], max_len=3)
    assert cut == "response"
    assert example.ids == [10, 20, 21]
    assert example.prompt_length == 1


def test_jsonl_examples_end_with_eos(data_file):
    tokenizer = _tokenizer()
    examples = jsonl_examples(str(data_file), tokenizer, max_len=64, chat_template=True)
    first = examples[0]
    assert first.ids[: first.prompt_length] == tokenizer("the cat sat")["input_ids"]
    assert first.ids[first.prompt_length :] == tokenizer("on a mat", add_special_tokens=False)["input_ids"] + [2]


def test_jsonl_examples_use_chat_template(data_file):
    tokenizer = _tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}then{% endif %}"
    with_template = jsonl_examples(str(data_file), tokenizer, max_len=64, chat_template=True)[0]
    without = jsonl_examples(str(data_file), tokenizer, max_len=64, chat_template=False)[0]
    assert with_template.ids[: with_template.prompt_length] == tokenizer("the cat sat then")["input_ids"]
    assert without.ids[: without.prompt_length] == tokenizer("the cat sat")["input_ids"]


def test_jsonl_without_response_rejected(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the cat"}\n')
    with pytest.raises(UserError, match="response"):
        jsonl_examples(str(path), _tokenizer(), max_len=64, chat_template=True)


# --- training runs ---------------------------------------------------------------------------


def test_train_on_lab_reduces_loss(tmp_path):
    folder = train(_small_config(tmp_path, steps=30, log_every=5, lr=1e-2, warmup_steps=2))
    log = _log(folder)
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    assert log[-1]["step"] == 30


def test_train_output_loads_as_hf_model(tmp_path, teacher_dir, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = train(_small_config(tmp_path, teacher=str(teacher_dir), data=str(data_file), name="student-a"))
    assert folder == tmp_path / "students" / "student-a"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == len(SPECIAL) + len(WORDS)

    saved = yaml.safe_load((folder / "train_config.yaml").read_text())
    assert saved["seed"] == 0
    assert saved["provenance"]["versions"]["torch"] == str(torch.__version__)
    # The saved config is a valid recipe that rebuilds the same settings.
    recipe = train_command.load_recipe(folder / "train_config.yaml")
    assert TrainConfig(**recipe) == _small_config(tmp_path, teacher=str(teacher_dir), data=str(data_file), name="student-a")


def test_train_same_seed_same_weights(tmp_path, teacher_dir, data_file):
    def weights(out, seed):
        folder = train(_small_config(out, teacher=str(teacher_dir), data=str(data_file), seed=seed))
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder).state_dict()

    first, second = weights(tmp_path / "a", 0), weights(tmp_path / "b", 0)
    other = weights(tmp_path / "c", 1)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_train_hard_sample_skips_teacher(tmp_path):
    folder = train(_small_config(tmp_path, method="hard", steps=2))
    record = _log(folder)[-1]
    assert record["soft"] is None
    assert record["loss"] == pytest.approx(record["hard"])
    assert record["lam_mean"] == 0.0


def test_train_argmax_targets_and_temperature(tmp_path, teacher_dir, data_file):
    config = _small_config(tmp_path, teacher=str(teacher_dir), data=str(data_file), hard_target="argmax", loss_temperature=2.0, steps=2)
    record = _log(train(config))[-1]
    assert record["loss"] == pytest.approx(0.5 * record["soft"] + 0.5 * record["hard"], rel=1e-6)


def test_micro_batches_match_full_batch(teacher_dir, data_file, tmp_path):
    """Grad accumulation: 2 micro-batches of 2 give the gradient of one batch of 4."""
    from bganalysis.train import _load_student, _load_teacher

    config = _small_config(tmp_path, teacher=str(teacher_dir), data=str(data_file), loss_temperature=2.0)
    tokenizer, teacher, _ = _load_teacher(config)
    student = _load_student(config, tokenizer, teacher)
    examples = jsonl_examples(str(data_file), tokenizer, max_len=64, chat_template=True)
    step_valid_tokens = int((collate(examples, 0)["targets"] != -100).sum())

    def gradients(micro_batches):
        student.zero_grad()
        for part in micro_batches:
            parts, valid, _ = micro_batch_parts(config, teacher, student, collate(part, 0), SoftWeights(config), 1, len(tokenizer))
            masked_mean(parts["total"], valid, step_valid_tokens).backward()
        return [p.grad.clone() for p in student.parameters()]

    full = gradients([examples])
    accumulated = gradients([examples[:2], examples[2:]])
    for full_grad, accumulated_grad in zip(full, accumulated):
        assert torch.allclose(full_grad, accumulated_grad, atol=1e-6)


def test_train_lab_data_needs_lab_vocabulary(tmp_path, teacher_dir):
    with pytest.raises(UserError, match="lab vocabulary"):
        train(_small_config(tmp_path, teacher=str(teacher_dir), data="lab"))


# --- CLI ---------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_invalid_lam_raises_user_error():
    args = _parse(["train", "--lam", "2"])
    with pytest.raises(UserError, match=r"invalid lam=2\.0"):
        args.func(args)


def test_cli_flags_override_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: soft\nsteps: 7\nloss-temperature: 2.0\n")
    seen = {}
    monkeypatch.setattr("bganalysis.train.train", lambda config: seen.setdefault("config", config))
    args = _parse(["train", "--recipe", str(recipe), "--steps", "3", "--no-chat-template"])
    args.func(args)
    config = seen["config"]
    assert (config.method, config.steps, config.loss_temperature, config.chat_template) == ("soft", 3, 2.0, False)


def test_cli_unknown_recipe_key_lists_valid_keys(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: soft\nlambda: 0.3\n")
    with pytest.raises(UserError, match="unknown keys lambda; valid keys are method, lam,"):
        train_command.load_recipe(recipe)


@pytest.mark.skipif(
    any(importlib.util.find_spec(f"bganalysis.commands.{name}") is None for name in ("analyze", "demo", "import_gguf", "derive_student")),
    reason="bganalysis.cli imports every command module, and some do not exist yet",
)
def test_cli_subprocess_invalid_lam_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "bganalysis", "train", "--lam", "2"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid lam=2.0" in result.stderr


# --- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hard", "soft", "hybrid"])
def test_recipe_builds_config(method):
    path = REPO / "training" / f"{method}.yaml"
    assert path.read_text().startswith("# Launch: bganalysis train --recipe training/")
    config = TrainConfig(**train_command.load_recipe(path))
    assert config.method == method


def test_hybrid_recipe_matches_defaults():
    """`bganalysis train` with no arguments must use the settings in training/hybrid.yaml."""
    assert TrainConfig(**train_command.load_recipe(REPO / "training" / "hybrid.yaml")) == TrainConfig()
