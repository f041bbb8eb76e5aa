"""Teacher-only counterfactual kappa, windowed EB and action sets against plain computations."""

import math

import numpy as np
import pytest
import torch

from bganalysis.analysis import documents as docs_module
from bganalysis.analysis.documents import AnalysisDocument, attach_lab_roles, generator_for
from bganalysis.analysis.kappa import (action_weights, kappa_from_q, monte_carlo_kappa, select_actions,
                                      teacher_only_kappa)
from bganalysis.analysis.kappa_sampling import RolloutSpread, allocate_rollouts, kappa_standard_error, latin_hypercube
from bganalysis.analysis.pipeline import AnalyzeConfig, windowed_losses
from bganalysis.lab import LabTeacher, sample_documents
from bganalysis.losses import kl_from_logprobs
from bganalysis.reference import next_logprobs, reference_continuation
from bganalysis.rollout import ModelRunner
from tests.helpers import tiny_llama

VOCAB = 39
EOS = {2}


@pytest.fixture(scope="module")
def lab_doc():
    lab = sample_documents(1, seed=11)[0]
    doc = AnalysisDocument("d0", lab.prompt_ids, lab.response_ids, "given")
    teacher = LabTeacher()
    attach_lab_roles([doc], teacher.process)
    return doc, teacher


def test_select_actions_appends_missing_observed():
    logprobs = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert select_actions(logprobs, 2).tolist() == [0, 1]
    assert select_actions(logprobs, 2, observed=3).tolist() == [0, 1, 3]
    assert select_actions(logprobs, 2, observed=1).tolist() == [0, 1]


@pytest.mark.parametrize("cached", [False, True])
def test_teacher_only_kappa_matches_full_forwards(lab_doc, cached):
    doc, teacher = lab_doc
    if cached:  # a KV-cached teacher takes the whole-prefix cache path
        teacher = tiny_llama(VOCAB, seed=8)
    runner = ModelRunner(teacher, VOCAB)
    prompt_length = len(doc.prompt_ids)
    doc_logprobs = runner.encode_document(torch.tensor(doc.ids))[prompt_length - 1:prompt_length - 1 + len(doc.response_ids)]
    t, horizon = 3, 4
    actions = select_actions(doc_logprobs[t], 4)
    weights = action_weights(doc_logprobs[t], actions)

    fast = teacher_only_kappa(runner, prompt_length + t, actions, weights, doc.response_ids[t + 1:t + horizon],
                              doc_logprobs[t + 1:t + 1 + horizon], EOS)

    q = []
    for action in actions.tolist():
        sequence = doc.ids[:prompt_length + t] + [action]
        total = 0.0
        for k in range(horizon):
            original = next_logprobs(teacher, doc.ids[:prompt_length + t + 1 + k], VOCAB)
            swapped = next_logprobs(teacher, sequence, VOCAB)
            total += float(kl_from_logprobs(original, swapped))
            sequence = sequence + [doc.response_ids[t + 1 + k]]
        q.append(0.0 if action in EOS else total)
    plain = kappa_from_q(np.array(q), weights)
    assert fast["kappa"] == pytest.approx(float(plain["kappa"]), abs=1e-4)
    assert fast["kappa_abs"] == pytest.approx(float(plain["kappa_abs"]), abs=1e-4)


def test_teacher_only_kappa_ranks_bridge_over_garden(lab_doc):
    doc, teacher = lab_doc
    runner = ModelRunner(teacher, VOCAB)
    prompt_length, length = len(doc.prompt_ids), len(doc.response_ids)
    doc_logprobs = runner.encode_document(torch.tensor(doc.ids))[prompt_length - 1:prompt_length - 1 + length]
    values = {"bridge": [], "garden": []}
    for t in range(length - 4):
        actions = select_actions(doc_logprobs[t], 4)
        result = teacher_only_kappa(runner, prompt_length + t, actions, action_weights(doc_logprobs[t], actions),
                                    doc.response_ids[t + 1:t + 4], doc_logprobs[t + 1:t + 5], EOS)
        values[doc.roles[t]].append(result["kappa"])
    assert np.mean(values["bridge"]) > np.mean(values["garden"])


def test_windowed_losses_match_plain_reference(lab_doc):
    doc, teacher = lab_doc
    student = tiny_llama(VOCAB, seed=6)
    config = AnalyzeConfig(teacher="lab", students=["s"], out="unused", ro_samples=2, seed=9, windows=[2])
    teacher_runner, student_runner = ModelRunner(teacher, VOCAB), ModelRunner(student, VOCAB)
    teacher_runner.encode_document(torch.tensor(doc.ids))
    student_runner.encode_document(torch.tensor(doc.ids))
    setup = type("Setup", (), {"teacher": teacher_runner, "eos_ids": EOS})()

    fast = windowed_losses(config, setup, student_runner, 0, doc, window=2)

    prompt_length = len(doc.prompt_ids)
    for t in (2, 5):
        generator = generator_for(9, 0, docs_module.PURPOSE_WINDOW * 100_003 + 2 * 1_009 + t)
        uniforms = torch.rand(2, 3, generator=generator)
        prefix = doc.ids[:prompt_length + t - 2]
        tokens, alive, _ = reference_continuation(student, prefix, uniforms, EOS, VOCAB)
        for row in range(2):
            written = tokens[row, :2].tolist()
            if any(token in EOS for token in written):
                assert math.isnan(fast[row, t])
                continue
            expected = kl_from_logprobs(next_logprobs(teacher, prefix + written, VOCAB),
                                        next_logprobs(student, prefix + written, VOCAB))
            assert fast[row, t] == pytest.approx(float(expected), abs=1e-4)
    assert np.isnan(fast[:, :2]).all()


def test_analysis_writes_windowed_and_teacher_only(tmp_path):
    from bganalysis.analysis.pipeline import run_analysis
    from bganalysis.lab import lab_tokenizer

    student = tmp_path / "student"
    tiny_llama(VOCAB, seed=3).save_pretrained(student)
    lab_tokenizer().save_pretrained(student)
    summary = run_analysis(AnalyzeConfig(teacher="lab", students=[str(student)], out=str(tmp_path / "run"),
                                         num_lab_docs=2, kappa_k=2, kappa_rollouts=2, kappa_horizon=2, ro_samples=1,
                                         max_new_tokens=8, bootstrap=20, windows=[1], kappa_include_observed=True))

    import pandas as pd

    steps = pd.read_parquet(tmp_path / "run" / "analysis" / "steps.parquet")
    tokens = pd.read_parquet(tmp_path / "run" / "analysis" / "tokens.parquet")
    assert {"ro_w1", "eb_w1", "eb_w1_low", "eb_w1_high"} <= set(steps.columns)
    assert "eb_w1_overall" in summary["students"]["student"]
    assert "spearman_vs_exact" in summary["kappa"]["teacher_only"]
    assert tokens.teacher_only_kappa.notna().all()
    assert (tokens.action_set_size >= 2).all()


# Variance-reduced Monte-Carlo kappa


def test_latin_hypercube_one_value_per_stratum():
    uniforms = latin_hypercube(5, 7, torch.Generator().manual_seed(0))
    strata = torch.floor(uniforms * 5).long()
    for column in range(7):
        assert sorted(strata[:, column].tolist()) == [0, 1, 2, 3, 4]


def test_allocation_favours_large_coefficients():
    weights = np.array([0.9, 0.05, 0.05])  # c = [-1.7, 0.85, 0.85]
    counts = allocate_rollouts(weights, total=12)
    assert counts.sum() == 12
    assert counts.min() >= 2
    assert counts[0] > counts[1]


def test_allocation_follows_spread_guess():
    weights = np.array([0.9, 0.05, 0.05])
    quiet_top = allocate_rollouts(weights, total=12, spread=np.array([0.1, 1.0, 1.0]))
    assert quiet_top.tolist() == [2, 5, 5]


def test_rollout_spread_floors_and_fills_ranks():
    spread = RolloutSpread(floor=0.5)
    assert spread.guess(3) is None
    spread.add([np.array([1.0, 1.0]), np.array([0.0, 4.0])])  # variances 0 and 8
    assert spread.guess(3).tolist() == pytest.approx([math.sqrt(8) / 2, math.sqrt(8), math.sqrt(8) / 2])


def test_standard_error_paired_cancels_shared_noise():
    weights = np.array([0.5, 0.3, 0.2])
    shared_noise = np.random.default_rng(0).normal(size=(8, 1))
    q = np.array([[1.0, 2.0, 3.0]]) + shared_noise  # every action moves with the same rollout noise
    assert kappa_standard_error(list(q.T), weights, paired=True) < 1e-12
    assert kappa_standard_error(list(q.T), weights, paired=False) > 0.1


def test_standard_error_independent_by_hand():
    weights = np.array([0.75, 0.25])  # c = [-0.5, 0.5]
    rows = [np.array([1.0, 3.0]), np.array([0.0, 0.0, 6.0])]  # variances 2 and 12
    expected = math.sqrt(0.25 * 2 / 2 + 0.25 * 12 / 3)
    assert kappa_standard_error(rows, weights, paired=False) == pytest.approx(expected)


def _lab_kappa_runs(lab_doc, sampling: str, seeds: int, positions: range) -> np.ndarray:
    """Kappa [seeds, positions] at K = 4, R = 4, H = 6 with a random student, one document pass per seed."""
    doc, teacher = lab_doc
    teacher_runner, student_runner = ModelRunner(teacher, VOCAB), ModelRunner(tiny_llama(VOCAB, seed=1), VOCAB)
    prompt_length = len(doc.prompt_ids)
    logprobs = teacher_runner.encode_document(torch.tensor(doc.ids))
    student_runner.encode_document(torch.tensor(doc.ids))
    values = np.zeros((seeds, len(positions)))
    for seed in range(seeds):
        spread = RolloutSpread()
        for column, t in enumerate(positions):
            prefix = prompt_length + t
            actions = select_actions(logprobs[prefix - 1], 4)
            values[seed, column] = monte_carlo_kappa(
                teacher_runner, student_runner, prefix, logprobs[prefix - 1], actions, 4, 6,
                torch.Generator().manual_seed(1_000 * seed + t), EOS, sampling, spread)["kappa"]
    return values


def test_stratified_kappa_unbiased_with_lower_se_on_lab(lab_doc):
    positions = range(0, min(12, len(lab_doc[0].response_ids) - 1))
    plain = _lab_kappa_runs(lab_doc, "independent", 24, positions)
    stratified = _lab_kappa_runs(lab_doc, "stratified", 24, positions)

    plain_variance, stratified_variance = plain.var(axis=0, ddof=1), stratified.var(axis=0, ddof=1)
    difference = (stratified.mean(axis=0) - plain.mean(axis=0)).mean()
    difference_se = math.sqrt((plain_variance + stratified_variance).sum() / 24) / len(positions)
    se_ratio = math.sqrt(stratified_variance.mean() / plain_variance.mean())
    print(f"stratified - plain: {difference:.4f} (se {difference_se:.4f}); se ratio {se_ratio:.3f}")
    assert abs(difference) < 4 * difference_se
    assert se_ratio < 1.0
