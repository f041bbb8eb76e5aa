"""Tests for the trainer's divergences and soft-weight schemes: recipes, λ values, errors."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bganalysis.commands import train as train_command
from bganalysis.errors import UserError
from bganalysis.lab import LabTeacher, lab_tokenizer, sample_documents
from bganalysis.losses import align_vocab, hybrid_token_losses
from bganalysis.region_map import RegionMap
from bganalysis.train import TrainConfig, make_trainer, train
from bganalysis.train_data import collate, lab_examples, step_batches
from bganalysis.train_loss import divergence_token_losses, proxy_risk_quantiles

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "training").glob("*.yaml"))
TINY = dict(
    student_hidden=32, student_layers=1, student_heads=2, student_kv_heads=1, student_intermediate=64,
    num_docs=32, batch_size=4, warmup_steps=1, device="cpu",
)


def _config(tmp_path, **overrides) -> TrainConfig:
    values = dict(TINY, steps=1, log_every=1, out=str(tmp_path))
    values.update(overrides)
    return TrainConfig(**values)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _first_batch(config: TrainConfig):
    """Return the first micro-batch the trainer sees, with the lab teacher's aligned logits."""
    trainer, _ = make_trainer(config, Path(config.out) / "first_batch")
    batch = next(iter(trainer.get_train_dataloader()))
    targets = batch.pop("targets")
    with torch.no_grad():
        logits = LabTeacher()(**batch, use_cache=False).logits
    teacher_logits, _ = align_vocab(logits, logits, len(lab_tokenizer()))
    return teacher_logits.float(), targets


# --- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_trains_three_steps(path, tmp_path):
    assert path.read_text().startswith(f"# Launch: bganalysis train --recipe training/{path.name}")
    values = train_command.load_recipe(path)
    values.update(TINY, steps=3, log_every=1, out=str(tmp_path))
    folder = train(TrainConfig(**values))

    assert folder == tmp_path / "students" / values["name"]
    assert (folder / "config.json").is_file()
    log = _log(folder)
    assert [record["step"] for record in log] == [1, 2, 3]
    assert all(math.isfinite(record["loss"]) for record in log)


def test_new_recipes_exist():
    names = {path.stem for path in RECIPES}
    assert {"confidence", "entropy", "curriculum", "bridge_garden", "risk_guided", "reverse_kl", "jsd"} <= names


# --- mean λ per scheme -----------------------------------------------------------------------------


def test_static_lambda_logged(tmp_path):
    record = _log(train(_config(tmp_path, lam=0.3)))[-1]
    assert record["lam_mean"] == pytest.approx(0.3)
    assert record["risk"] is None


@pytest.mark.parametrize(
    "scheme, expected",
    [("curriculum", [0.0, 0.8 / 1.5, 0.8]), ("reverse_curriculum", [0.8, 0.8 * (1 - 1 / 1.5), 0.0])],
)
def test_curriculum_lambda_per_step(tmp_path, scheme, expected):
    config = _config(tmp_path, weight_scheme=scheme, steps=3, lam_max=0.8, ramp_fraction=0.5)
    log = _log(train(config))
    assert [record["lam_mean"] for record in log] == pytest.approx(expected, abs=1e-6)


def test_confidence_lambda_is_one_minus_label_probability(tmp_path):
    config = _config(tmp_path, weight_scheme="confidence")
    teacher_logits, targets = _first_batch(config)
    valid = targets != -100
    label_probability = teacher_logits.softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = 1.0 - float(label_probability[valid].mean())

    record = _log(train(config))[-1]
    assert record["lam_mean"] == pytest.approx(expected, rel=1e-5)


def test_entropy_lambda_is_normalised_entropy(tmp_path):
    config = _config(tmp_path, weight_scheme="entropy")
    teacher_logits, targets = _first_batch(config)
    probs = teacher_logits.softmax(-1)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1) / math.log(teacher_logits.shape[-1])
    expected = float(entropy[targets != -100].mean())

    record = _log(train(config))[-1]
    assert record["lam_mean"] == pytest.approx(expected, rel=1e-4)


def test_bridge_garden_proxy_mean_is_midpoint(tmp_path):
    """Average ranks make the mean quantile 0.5, so the mean λ is halfway between lam_bridge and lam_garden."""
    record = _log(train(_config(tmp_path, weight_scheme="bridge_garden", lam_bridge=0.2, lam_garden=0.6)))[-1]
    assert record["lam_mean"] == pytest.approx(0.4, abs=1e-6)


def test_bridge_garden_map_sets_bridge_lambda(tmp_path):
    vocab = len(lab_tokenizer())
    map_path = tmp_path / "tokens.parquet"
    rows = {"doc_id": list(range(vocab)), "position": [0] * vocab, "token_id": list(range(vocab)), "region": ["bridge"] * vocab}
    pd.DataFrame(rows).to_parquet(map_path)

    config = _config(tmp_path, weight_scheme="bridge_garden", bridge_garden_map=str(map_path), lam_bridge=0.2, lam_middle=0.7)
    record = _log(train(config))[-1]
    assert record["lam_mean"] == pytest.approx(0.2, abs=1e-6)


def test_proxy_quantiles_rank_confident_as_risky():
    # Position 0: a confident teacher (low entropy, Bridge-like); position 1: uniform (Garden-like).
    logits = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1, -100]])
    quantiles = proxy_risk_quantiles(logits, targets, "teacher_entropy")
    assert quantiles[0, :2].tolist() == [1.0, 0.0]


def test_region_map_prefers_longer_context():
    # Token 7 is a Bridge after token 3 and a Garden elsewhere, with Gardens the majority.
    documents = [
        [(0, 3, ""), (1, 7, "bridge")],
        [(0, 4, ""), (1, 7, "garden")],
        [(0, 5, ""), (1, 7, "garden")],
    ]
    region_map = RegionMap.from_documents(documents)
    targets = torch.tensor([[-100, 3, 7, -100], [-100, 9, 7, -100]])
    assert region_map.lookup(targets).tolist() == [[0, 0, 1, 0], [0, 0, 2, 0]]


def test_region_map_context_beats_token_id_on_lab():
    """On the lab's true roles, the context lookup recovers far more roles than the token id alone."""
    build, held_out = sample_documents(100, seed=0), sample_documents(100, seed=1)
    region_map = RegionMap.from_documents(
        [list(zip(range(len(doc.response_ids)), doc.response_ids, doc.roles)) for doc in build]
    )
    token_only = RegionMap(region_map.tables[:1], "token id only")
    hits = {"context": 0, "token": 0}
    total = 0
    for doc in held_out:
        targets = torch.tensor([doc.response_ids])
        truth = torch.tensor([[{"bridge": 1, "garden": 2}[role] for role in doc.roles]])
        hits["context"] += int((region_map.lookup(targets) == truth).sum())
        hits["token"] += int((_token_only_lookup(token_only, targets) == truth).sum())
        total += targets.numel()
    assert hits["context"] / total > 0.9
    assert hits["context"] / total > hits["token"] / total + 0.1


def _token_only_lookup(region_map: RegionMap, targets: torch.Tensor) -> torch.Tensor:
    table = region_map.tables[0]
    return torch.tensor([[table.get((token,), 0) for token in row] for row in targets.tolist()])


# --- divergences and risk --------------------------------------------------------------------------


def test_divergence_changes_soft_loss(tmp_path):
    forward = _log(train(_config(tmp_path / "f", lam=0.5)))[-1]
    reverse = _log(train(_config(tmp_path / "r", lam=0.5, divergence="reverse_kl")))[-1]
    assert forward["hard"] == pytest.approx(reverse["hard"])
    assert abs(forward["soft"] - reverse["soft"]) > 1e-3


def test_generic_path_matches_fast_forward_kl():
    """The chunked autograd path with forward_kl equals the hand-written fast path, in values and gradients."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    student = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = targets[1, 4] = -100
    lam = torch.rand(2, 5)

    fast = hybrid_token_losses(student, teacher, targets, lam, temperature=2.0, chunk_tokens=3)
    (fast_grad,) = torch.autograd.grad(fast["total"].sum(), student)
    plain = divergence_token_losses(student, teacher, targets, lam, "forward_kl", {}, temperature=2.0, chunk_tokens=3)
    (plain_grad,) = torch.autograd.grad(plain["total"].sum(), student)

    for key in ("soft", "hard", "total"):
        assert torch.allclose(fast[key], plain[key], atol=1e-5), key
    assert torch.allclose(fast_grad, plain_grad, atol=1e-5)


def test_risk_guided_adds_penalty_to_hard(tmp_path):
    record = _log(train(_config(tmp_path, weight_scheme="risk_guided", lam=0.3, risk_alpha=0.5)))[-1]
    assert record["risk"] > 0
    expected = 0.3 * record["soft"] + 0.7 * (record["hard"] + record["risk"])
    assert record["loss"] == pytest.approx(expected, rel=1e-5)


# --- invalid settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ({"divergence": "kl"}, "divergence", "forward_kl, reverse_kl, jsd"),
        ({"divergence": "jsd", "divergence_beta": 1.5}, "divergence_beta", "[0, 1]"),
        ({"divergence": "reverse_kl", "divergence_beta": 0.5}, "divergence_beta", "takes no beta"),
        ({"divergence": "skew_forward_kl", "divergence_alpha": -0.1}, "divergence_alpha", "[0, 1]"),
        ({"divergence": "ab", "divergence_alpha": 1.0}, "divergence_beta", "needs both alpha and beta"),
        ({"weight_scheme": "adaptive"}, "weight_scheme", "static, confidence, entropy"),
        ({"weight_scheme": "confidence", "method": "soft"}, "weight_scheme", "method hybrid"),
        ({"weight_scheme": "risk_guided", "hard_target": "argmax"}, "hard_target", "hard_target sample"),
        ({"weight_scheme": "risk_guided", "method": "soft"}, "weight_scheme", "method hybrid or hard"),
        ({"lam_bridge": 1.5}, "lam_bridge", "[0, 1]"),
        ({"lam_max": -0.2}, "lam_max", "[0, 1]"),
        ({"ramp_fraction": 0}, "ramp_fraction", "(0, 1]"),
        ({"tsallis_order": 0}, "tsallis_order", "> 0"),
        ({"risk_alpha": -1}, "risk_alpha", ">= 0"),
        ({"bridge_garden_proxy": "kappa"}, "bridge_garden_proxy", "teacher_entropy"),
        ({"bridge_garden_map": "tokens.parquet"}, "bridge_garden_map", "only the bridge_garden scheme"),
        ({"weight_scheme": "bridge_garden", "bridge_garden_map": "missing.parquet"}, "bridge_garden_map", "is not a file"),
    ],
)
def test_config_rejects_invalid_scheme_settings(overrides, key, fragment):
    with pytest.raises(UserError) as caught:
        TrainConfig(**overrides)
    message = str(caught.value)
    assert f"invalid {key}=" in message
    assert fragment in message
    assert "--" + key.replace("_", "-") in message


def test_bridge_garden_map_missing_columns(tmp_path):
    map_path = tmp_path / "tokens.parquet"
    pd.DataFrame({"doc_id": [0], "position": [0]}).to_parquet(map_path)
    config = _config(tmp_path, weight_scheme="bridge_garden", bridge_garden_map=str(map_path))
    with pytest.raises(UserError, match="token_id, region"):
        train(config)


def test_scheme_sets_default_name():
    assert TrainConfig(weight_scheme="entropy").name == "entropy"
    assert TrainConfig(divergence="reverse_kl").name == "hybrid"
