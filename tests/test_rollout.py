"""The batched, KV-cached rollout engine against the plain reference."""

import pytest
import torch

from bganalysis.lab import LabTeacher, sample_documents
from bganalysis.reference import reference_continuation, reference_rollouts
from bganalysis.rollout import ModelRunner, alive_mask, rollouts_after_actions, sample_continuation, sample_from_logprobs
from tests.helpers import tiny_llama

VOCAB = 39
EOS = {2}


def _document():
    doc = sample_documents(1, seed=3)[0]
    return doc.prompt_ids + doc.response_ids, len(doc.prompt_ids)


def test_inverse_cdf_sampling_follows_uniforms():
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    picks = [int(sample_from_logprobs(logprobs, torch.tensor([u]))[0]) for u in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999)]
    assert picks == [0, 0, 1, 1, 2, 2]


def test_head_order_sampling_follows_uniforms():
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    uniforms = (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)
    for head in (2, 3):  # the tail after the head keeps id order; a head of 3 sorts everything
        picks = [int(sample_from_logprobs(logprobs, torch.tensor([u]), head=head)[0]) for u in uniforms]
        assert picks == [1, 1, 2, 2, 0, 0], head


def test_head_order_keeps_token_probabilities():
    probs = torch.tensor([0.05, 0.1, 0.4, 0.15, 0.3])
    grid = (torch.arange(10_000) + 0.5) / 10_000
    picks = sample_from_logprobs(probs.log().expand(len(grid), 5), grid, head=2)
    assert torch.allclose(torch.bincount(picks, minlength=5) / len(grid), probs, atol=2e-4)


def test_head_order_breaks_ties_by_id():
    logprobs = torch.log(torch.tensor([[0.1, 0.3, 0.3, 0.3]]))
    picks = [int(sample_from_logprobs(logprobs, torch.tensor([u]), head=2)[0]) for u in (0.1, 0.4, 0.65, 0.95)]
    assert picks == [1, 2, 0, 3]


def test_alive_mask_conventions():
    tokens = torch.tensor([[5, 2, 7, 2]])
    assert alive_mask(tokens, EOS, include_current=True).tolist() == [[True, False, False, False]]
    assert alive_mask(tokens, EOS, include_current=False).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("head", [0, 5])
@pytest.mark.parametrize("cached_teacher", [False, True])
def test_rollouts_match_reference_with_kv_cache(head, cached_teacher):
    ids, prompt_length = _document()
    teacher = tiny_llama(VOCAB, seed=5, layers=3) if cached_teacher else LabTeacher()
    student = tiny_llama(VOCAB, seed=1)
    prefix_length = prompt_length + 3
    actions = torch.tensor([7, 2, 12])
    uniforms = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0))

    teacher_runner, student_runner = ModelRunner(teacher, VOCAB), ModelRunner(student, VOCAB)
    teacher_runner.encode_document(torch.tensor(ids))
    student_runner.encode_document(torch.tensor(ids))
    fast = rollouts_after_actions(teacher_runner, {"s": student_runner}, prefix_length, actions, uniforms, EOS, head)
    plain = reference_rollouts(teacher, {"s": student}, ids[:prefix_length], actions, uniforms, EOS, VOCAB, head)

    assert torch.equal(fast.alive, plain.alive)
    assert torch.equal(fast.tokens * fast.alive, plain.tokens * plain.alive)
    assert torch.allclose(fast.losses["s"], plain.losses["s"], atol=1e-4)


def test_student_continuation_matches_reference():
    ids, prompt_length = _document()
    student = tiny_llama(VOCAB, seed=2)
    runner = ModelRunner(student, VOCAB)
    runner.encode_document(torch.tensor(ids))
    uniforms = torch.rand(3, 12, generator=torch.Generator().manual_seed(1))

    tokens, alive, states = sample_continuation(runner, prompt_length, uniforms, EOS)
    ref_tokens, ref_alive, ref_states = reference_continuation(student, ids[:prompt_length], uniforms, EOS, VOCAB)

    width = ref_tokens.shape[1]
    assert torch.equal(alive[:, :width], ref_alive)
    assert torch.equal(tokens[:, :width] * alive[:, :width], ref_tokens * ref_alive)
    mask = ref_alive[..., None]
    assert torch.allclose(states[:, :width] * mask, ref_states * mask, atol=1e-4)
