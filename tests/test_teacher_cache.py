"""The teacher top-k cache: shards, resume, checks, and the cached loss against the online one."""

import json
import math

import pytest
import torch

from bganalysis.cached_loss import cached_token_losses, dense_teacher_logits
from bganalysis.cli import main
from bganalysis.divergences import DIVERGENCES
from bganalysis.errors import UserError
from bganalysis.lab import LabTeacher, lab_tokenizer
from bganalysis.losses import forward_kl, hybrid_token_losses
from bganalysis.teacher_cache import MANIFEST, TeacherCache, build_teacher_cache, topk_with_tail
from bganalysis.train_data import Example, collate, lab_examples
from bganalysis.train_loss import divergence_token_losses, proxy_risk_quantiles
from tests.helpers import tiny_llama

PARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2},
          "ab": {"alpha": 0.7, "beta": 0.4}}
F_DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "total_variation", "skew_forward_kl", "skew_reverse_kl"]
BATCH, SEQ, VOCAB = 2, 6, 13


@pytest.fixture(scope="module")
def logits():
    """Student logits (one -inf), teacher logits (one -inf), targets with masked positions, and λ."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    teacher = 2.0 * torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    student[0, 3, 5] = float("-inf")
    teacher[1, 2, 7] = float("-inf")
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets[0, :2] = -100
    targets[1, -1] = -100
    targets[0, 3] = 4  # a label the student can score
    lam = torch.rand(BATCH, SEQ, generator=generator)
    return student, teacher, targets, lam


def cache_rows(teacher_logits: torch.Tensor, k: int, temperature: float):
    ids, logprobs, tail = topk_with_tail(teacher_logits.reshape(-1, VOCAB), k, temperature)
    return ids.reshape(BATCH, SEQ, k), logprobs.reshape(BATCH, SEQ, k), tail.reshape(BATCH, SEQ)


def losses_and_grad(function, student: torch.Tensor, *args):
    student = student.clone().requires_grad_(True)
    parts = function(student, *args)
    (grad,) = torch.autograd.grad(parts["total"].sum(), student)
    return parts, grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_full_k_equals_online(logits, name, temperature):
    student, teacher, targets, lam = logits
    params = PARAMS.get(name, {})
    cached, cached_grad = losses_and_grad(cached_token_losses, student, *cache_rows(teacher, VOCAB, temperature), targets,
                                          lam, name, params, temperature, 4)
    online, online_grad = losses_and_grad(divergence_token_losses, student, teacher, targets, lam, name, params,
                                          temperature, 4)
    for key in ("soft", "hard", "total"):
        torch.testing.assert_close(cached[key], online[key], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(cached_grad, online_grad, rtol=1e-5, atol=1e-6)


def test_full_k_equals_hybrid_fast_path(logits):
    student, teacher, targets, lam = logits
    finite_student = torch.where(student.isinf(), -30.0, student)  # the fast path's KL has +inf at q = 0 < p
    cached, cached_grad = losses_and_grad(cached_token_losses, finite_student, *cache_rows(teacher, VOCAB, 1.5), targets,
                                          lam, "forward_kl", {}, 1.5, 5)
    online, online_grad = losses_and_grad(hybrid_token_losses, finite_student, teacher, targets, lam, 1.5, 5)
    torch.testing.assert_close(cached["total"], online["total"], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(cached_grad, online_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_top_k_soft_is_lower_bound(logits, name, k):
    student, teacher, targets, lam = logits
    params = PARAMS.get(name, {})
    cached = cached_token_losses(student, *cache_rows(teacher, k, 1.0), targets, lam, name, params)
    online = divergence_token_losses(student, teacher, targets, lam, name, params)
    assert bool((cached["soft"] <= online["soft"] + 1e-5).all())
    torch.testing.assert_close(cached["hard"], online["hard"])


def test_all_masked_batch_is_zero_with_finite_grads(logits):
    student, teacher, targets, lam = logits
    masked = torch.full_like(targets, -100)
    parts, grad = losses_and_grad(cached_token_losses, student, *cache_rows(teacher, 3, 1.0), masked, lam,
                                  "reverse_kl", {})
    assert float(parts["total"].detach().abs().sum()) == 0.0
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) == 0.0


def test_padded_student_columns_are_dropped(logits):
    student, teacher, targets, lam = logits
    padded = torch.cat([student, torch.full((BATCH, SEQ, 3), 50.0)], dim=-1)
    rows = cache_rows(teacher, 4, 1.0)
    cut = cached_token_losses(padded, *rows, targets, lam, "forward_kl", {}, vocab_size=VOCAB)
    plain = cached_token_losses(student, *rows, targets, lam, "forward_kl", {})
    torch.testing.assert_close(cut["total"], plain["total"])


def test_dense_logits_keep_teacher_statistics(logits):
    _, teacher, targets, _ = logits
    dense = dense_teacher_logits(*cache_rows(teacher, VOCAB, 2.0), VOCAB, 2.0)
    torch.testing.assert_close(torch.log_softmax(dense, -1), torch.log_softmax(teacher, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proxy_risk_quantiles(dense, targets, "teacher_margin"),
                               proxy_risk_quantiles(teacher, targets, "teacher_margin"))
    partial = dense_teacher_logits(*cache_rows(teacher, 4, 1.0), VOCAB, 1.0)
    torch.testing.assert_close(torch.logsumexp(partial, -1), torch.zeros(BATCH, SEQ), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def lab_data():
    return lab_tokenizer(), LabTeacher(), lab_examples(8, seed=1, max_len=64)


def test_lab_round_trip(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    vocab = len(tokenizer)
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=vocab, shard_tokens=50))
    batch = cache.collate(examples[2:6], pad_id=0)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["targets"] != -100
    ids, logprobs, tail = topk_with_tail(teacher_logits[valid], vocab, 1.0)
    assert torch.equal(batch["teacher_topk_ids"][valid], ids)
    assert torch.equal(batch["teacher_topk_logprobs"][valid], logprobs)
    assert bool((batch["teacher_tail_logprob"][valid] == float("-inf")).all())

    student = torch.randn(*batch["targets"].shape, vocab, generator=torch.Generator().manual_seed(2))
    cached = cached_token_losses(student, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                 batch["teacher_tail_logprob"], batch["targets"], 0.5, "forward_kl", {})
    online = hybrid_token_losses(student, teacher_logits, batch["targets"], 0.5)
    torch.testing.assert_close(cached["total"], online["total"], rtol=1e-5, atol=1e-5)


def test_filler_positions_are_finite(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=4))
    batch = cache.collate(examples[:3], pad_id=0)
    filler = batch["targets"] == -100
    dense = dense_teacher_logits(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                 batch["teacher_tail_logprob"], len(tokenizer), 1.0)
    assert bool(torch.isfinite(torch.log_softmax(dense[filler], -1).exp()).all())
    assert torch.equal(batch["input_ids"], collate(examples[:3], 0)["input_ids"])


def test_padded_vocab_round_trip(tmp_path):
    tokenizer = lab_tokenizer()
    vocab = len(tokenizer)
    teacher = tiny_llama(vocab + 9, seed=3)
    with torch.no_grad():
        teacher.lm_head.weight[vocab:] = 40.0  # padded rows that would take all the mass if they were kept
    examples = [Example([1, 5, 9, 12, 7, 2], 2), Example([1, 30, 31, 2], 1)]
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=6, batch_size=1))
    batch = cache.collate(examples, pad_id=0)
    valid = batch["targets"] != -100
    with torch.no_grad():
        real = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
    ids, logprobs, tail = topk_with_tail(real[valid], 6, 1.0)
    assert int(batch["teacher_topk_ids"].max()) < vocab
    torch.testing.assert_close(batch["teacher_topk_logprobs"][valid], logprobs)
    torch.testing.assert_close(batch["teacher_tail_logprob"][valid], tail)
    mass = torch.logsumexp(torch.cat([logprobs, tail[:, None]], -1), -1)
    torch.testing.assert_close(mass, torch.zeros_like(mass), rtol=0, atol=1e-5)


def test_resume_skips_finished_shards(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=4, shard_tokens=40)
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    written = {shard.name: shard.stat().st_mtime_ns for shard in shards}
    shards[1].unlink()
    calls = []
    hook = teacher.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=4, shard_tokens=40, batch_size=64)
    finally:
        hook.remove()
    assert len(calls) == 1
    for shard in shards:
        if shard != shards[1]:
            assert shard.stat().st_mtime_ns == written[shard.name]
    assert shards[1].is_file()


def test_other_settings_rebuild_shards(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=4)
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=6))
    assert cache.collate(examples[:1], 0)["teacher_topk_ids"].shape[-1] == 6


@pytest.mark.parametrize("k", [0, -1, 40, True])
def test_bad_k_is_rejected(tmp_path, lab_data, k):
    tokenizer, teacher, examples = lab_data
    with pytest.raises(UserError, match="invalid k"):
        build_teacher_cache(teacher, tokenizer, examples, tmp_path / "cache", k=k)
    assert not (tmp_path / "cache" / MANIFEST).exists()


def test_mismatched_tokenizer_and_temperature(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, tmp_path, k=4, loss_temperature=2.0))
    cache.check_compatible(tokenizer, 2.0)
    with pytest.raises(UserError, match="loss_temperature=2.*loss_temperature=1"):
        cache.check_compatible(tokenizer, 1.0)
    other = lab_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(UserError, match="39 tokens.*40 tokens"):
        cache.check_compatible(other, 2.0)


def test_unknown_example_and_missing_cache(tmp_path, lab_data):
    tokenizer, teacher, examples = lab_data
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples[:2], tmp_path / "cache", k=4))
    with pytest.raises(UserError, match="rebuild the cache for this data"):
        cache.collate(examples[2:3], 0)
    with pytest.raises(UserError, match="not a finished teacher cache"):
        TeacherCache.open(tmp_path / "nothing")


def test_cli_builds_lab_cache(tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache-teacher", "--num-docs", "3", "--max-len", "48", "--k", "5", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["k"], manifest["vocab_size"], manifest["teacher"]) == (5, 39, "lab")
    assert len(manifest["examples"]) == len(lab_examples(3, seed=0, max_len=48))


def test_cli_rejects_bad_k(tmp_path, capsys):
    assert main(["cache-teacher", "--num-docs", "2", "--k", "0", "--out", str(tmp_path / "c")]) == 2
    assert "invalid k=0" in capsys.readouterr().err


def test_cached_forward_kl_matches_direct_formula():
    """A hand-made (k + 1)-outcome case: teacher [0.5, 0.3 | tail 0.2], student [0.4, 0.4 | 0.2]."""
    student = torch.log(torch.tensor([[[0.4, 0.4, 0.1, 0.1]]]))
    ids = torch.tensor([[[0, 1]]])
    teacher = torch.log(torch.tensor([[[0.5, 0.3]]]))
    tail = torch.log(torch.tensor([[0.2]]))
    parts = cached_token_losses(student, ids, teacher, tail, torch.tensor([[2]]), 1.0, "forward_kl", {})
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert parts["soft"].item() == pytest.approx(expected, abs=1e-6)
    assert parts["hard"].item() == pytest.approx(-math.log(0.1), abs=1e-6)
    assert parts["soft"].item() <= forward_kl(torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1])), student[0, 0]).item()
