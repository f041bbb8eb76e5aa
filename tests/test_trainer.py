"""The Trainer-based `bganalysis train`: resume, step invariance across processes, students, on-policy KD."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from bganalysis.errors import UserError
from bganalysis.lab import lab_tokenizer
from bganalysis.train import TrainConfig, train
from tests.helpers import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    student_hidden=32, student_layers=1, student_heads=2, student_kv_heads=1, student_intermediate=64,
    num_docs=32, batch_size=4, warmup_steps=1, device="cpu", log_every=1,
)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama over the lab vocabulary with 8 padded embedding rows, saved like any HF model."""
    folder = tmp_path_factory.mktemp("lab_llama")
    tokenizer = lab_tokenizer()
    model = tiny_llama(len(tokenizer) + 8, seed=5, layers=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class _SignalAt(TrainerCallback):
    """Send SIGINT to this process at the end of optimiser step `step`, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_after_interrupt_gives_the_same_loss_curve(tmp_path):
    config = dict(TINY, steps=6, save_every=0)
    plain = _log(train(TrainConfig(**config, out=str(tmp_path / "plain"))))

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config, out=str(out)), callbacks=(_SignalAt(3),))
    assert (out / "checkpoints" / "hybrid" / "checkpoint-3").is_dir()
    assert not (out / "students" / "hybrid").exists()

    with pytest.raises(UserError, match="--resume"):
        train(TrainConfig(**config, out=str(out)))
    with pytest.raises(UserError, match="settings differ.*lr"):
        train(TrainConfig(**config, out=str(out), resume=True, lr=2e-3))

    resumed = _log(train(TrainConfig(**config, out=str(out), resume=True)))
    assert [record["step"] for record in resumed] == [1, 2, 3, 4, 5, 6]
    for first, second in zip(plain, resumed):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)
        assert second["lr"] == pytest.approx(first["lr"])
    assert not (out / "checkpoints").exists()


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no checkpoint"):
        train(TrainConfig(**TINY, steps=1, out=str(tmp_path), resume=True))


_GRADIENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from transformers import TrainerCallback
    from bganalysis.train import TrainConfig, train

    class DumpGradients(TrainerCallback):
        def __init__(self):
            self.done = False
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not self.done and state.is_world_process_zero:
                torch.save({name: p.grad.detach().clone() for name, p in model.named_parameters()}, sys.argv[1])
            self.done = True

    batch_size, grad_accum, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    config = TrainConfig(student_hidden=32, student_layers=1, student_heads=2, student_kv_heads=1,
                         student_intermediate=64, num_docs=16, steps=1, warmup_steps=0, device="cpu",
                         max_grad_norm=0, batch_size=batch_size, grad_accum=grad_accum, out=out, loss_temperature=2.0)
    train(config, callbacks=(DumpGradients(),))
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_gradient_invariant_to_step_split(tmp_path):
    """One process × 4 sequences, one × 2 × 2 accumulation, and two gloo processes × 2 give one gradient."""
    script = tmp_path / "gradients.py"
    script.write_text(_GRADIENT_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def run(name: str, batch_size: int, grad_accum: int, processes: int = 1) -> dict:
        target = tmp_path / f"{name}.pt"
        arguments = [str(script), str(target), str(batch_size), str(grad_accum), str(tmp_path / name)]
        if processes == 1:
            command = [sys.executable, *arguments]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *arguments]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(target)

    whole = run("whole", 4, 1)
    accumulated = run("accumulated", 2, 2)
    distributed = run("distributed", 2, 1, processes=2)
    assert whole.keys() == accumulated.keys() == distributed.keys()
    for name, gradient in whole.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(distributed[name], gradient, rtol=1e-5, atol=1e-7)


def test_padded_teacher_and_student_vocabularies_train(tmp_path, model_dir):
    """Teacher and student with 8 padded embedding rows over the 39-token lab tokenizer."""
    folder = train(TrainConfig(**TINY, steps=2, teacher=str(model_dir), student=str(model_dir), out=str(tmp_path)))
    record = _log(folder)[-1]
    assert record["soft"] is not None and record["soft"] >= 0
    assert record["loss"] == pytest.approx(0.5 * record["soft"] + 0.5 * record["hard"], rel=1e-6)


def test_derived_student_keeps_teacher_layers(tmp_path, model_dir):
    folder = train(TrainConfig(**dict(TINY, student_layers=1), steps=1, teacher=str(model_dir), student="derived", out=str(tmp_path)))
    saved = json.loads((folder / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1
    assert saved["hidden_size"] == 32  # width kept


def test_student_from_config_file_starts_random(tmp_path, model_dir):
    folder = train(TrainConfig(**TINY, steps=1, teacher=str(model_dir), student=str(model_dir / "config.json"), out=str(tmp_path)))
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2


def test_lora_student_trains_adapters_and_saves_merged_weights(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    folder = train(TrainConfig(**TINY, steps=2, lr=1e-2, teacher=str(model_dir), student=str(model_dir),
                               lora=True, lora_rank=4, out=str(tmp_path)))
    assert not (folder / "adapter_config.json").exists()  # merged into a plain model
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(folder)
    changed = [name for name, weight in after.state_dict().items() if not torch.equal(weight, before.state_dict()[name])]
    assert changed and all("proj" in name for name in changed)  # only the adapted linear layers moved


def test_lora_on_a_random_student_is_refused():
    with pytest.raises(UserError, match="invalid lora=True"):
        TrainConfig(lora=True)


def test_onpolicy_sequences_use_the_soft_loss_only(tmp_path):
    folder = train(TrainConfig(**TINY, steps=2, onpolicy_fraction=1.0, onpolicy_max_new_tokens=12, out=str(tmp_path)))
    assert folder.name == "hybrid-onpolicy"
    for record in _log(folder):
        assert record["lam_mean"] == pytest.approx(1.0)
        assert record["loss"] == pytest.approx(record["soft"], rel=1e-6)


def test_onpolicy_draws_are_reproducible():
    from bganalysis.lab import LabTeacher
    from bganalysis.onpolicy import mix_onpolicy, step_generator
    from bganalysis.train_data import collate, lab_examples

    tokenizer = lab_tokenizer()
    config = TrainConfig(onpolicy_fraction=0.5, onpolicy_max_new_tokens=8)
    student = tiny_llama(len(tokenizer), seed=1)
    batch = collate(lab_examples(6, 0, 128), tokenizer.pad_token_id)
    first = mix_onpolicy(batch, student, config, step_generator(0, 1, 0, 0), tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer), 128)
    second = mix_onpolicy(batch, student, config, step_generator(0, 1, 0, 0), tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer), 128)
    assert torch.equal(first["input_ids"], second["input_ids"])
    rows = first["onpolicy"]
    assert 0 < int(rows.sum()) < 6
    kept = ~rows
    assert torch.equal(first["targets"][kept][:, : batch["targets"].shape[1]], batch["targets"][kept][:, : first["targets"].shape[1]])
    with torch.no_grad():  # the lab teacher scores any student sequence
        logits = LabTeacher()(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    assert torch.isfinite(logits.logsumexp(-1)).all()


def test_bfloat16_training_gives_finite_losses(tmp_path):
    folder = train(TrainConfig(**TINY, steps=2, dtype="bfloat16", out=str(tmp_path)))
    for record in _log(folder):
        assert record["soft"] >= 0
        assert torch.isfinite(torch.tensor(record["loss"]))


@pytest.mark.parametrize("scheme", ["static", "entropy"])
def test_full_vocabulary_cache_matches_online(tmp_path, scheme):
    from bganalysis.lab import LabTeacher
    from bganalysis.teacher_cache import build_teacher_cache
    from bganalysis.train_data import lab_examples

    config = dict(TINY, steps=3, weight_scheme=scheme, loss_temperature=2.0)
    tokenizer = lab_tokenizer()
    examples = lab_examples(config["num_docs"], 0, 512)
    cache = build_teacher_cache(LabTeacher(), tokenizer, examples, tmp_path / "cache", k=len(tokenizer), loss_temperature=2.0)

    online = _log(train(TrainConfig(**config, out=str(tmp_path / "online"))))
    cached = _log(train(TrainConfig(**config, teacher_cache=str(cache), out=str(tmp_path / "cached"))))
    for first, second in zip(online, cached, strict=True):
        for key in ("loss", "soft", "hard", "lam_mean"):
            assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_cache_built_at_another_temperature_is_refused(tmp_path):
    from bganalysis.lab import LabTeacher
    from bganalysis.teacher_cache import build_teacher_cache
    from bganalysis.train_data import lab_examples

    cache = build_teacher_cache(LabTeacher(), lab_tokenizer(), lab_examples(4, 0, 512), tmp_path / "cache", k=4)
    with pytest.raises(UserError, match="temperature"):
        train(TrainConfig(**TINY, steps=1, loss_temperature=2.0, teacher_cache=str(cache), out=str(tmp_path)))


@pytest.mark.parametrize("overrides", [{}, {"method": "hard", "hard_target": "argmax"}, {"weight_scheme": "entropy"}])
def test_fused_loss_trains_like_the_plain_loss(tmp_path, overrides):
    config = dict(TINY, steps=3, loss_temperature=2.0, **overrides)
    plain = _log(train(TrainConfig(**config, fused_loss=False, out=str(tmp_path / "plain"))))
    fused = _log(train(TrainConfig(**config, out=str(tmp_path / "fused"))))
    for first, second in zip(plain, fused, strict=True):
        for key in ("loss", "hard", "lam_mean", "grad_norm"):
            assert second[key] == pytest.approx(first[key], rel=1e-4), key


def test_fused_path_covers_forward_kl_only():
    from bganalysis.trainer import fused_path_applies

    student = tiny_llama(len(lab_tokenizer()))
    assert fused_path_applies(TrainConfig(), student, cached=False)
    assert not fused_path_applies(TrainConfig(), student, cached=True)
    assert not fused_path_applies(TrainConfig(divergence="reverse_kl"), student, cached=False)
    assert not fused_path_applies(TrainConfig(weight_scheme="risk_guided"), student, cached=False)
    assert not fused_path_applies(TrainConfig(fused_loss=False), student, cached=False)


def test_resume_without_saved_settings_is_refused(tmp_path):
    config = dict(TINY, steps=4, save_every=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config, out=str(out)), callbacks=(_SignalAt(2),))
    (out / "checkpoints" / "hybrid" / "train_config.yaml").unlink()
    with pytest.raises(UserError, match="train_config.yaml is missing"):
        train(TrainConfig(**config, out=str(out), resume=True))
