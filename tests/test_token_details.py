"""The explorer's detail tables: top-k next tokens, loss-to-go per forced action, own continuations."""

import numpy as np
import pandas as pd
import pytest
import torch

from bganalysis.analysis.details import continuation_frame, first_difference, next_token_frame
from bganalysis.analysis.kappa import kappa_from_q
from bganalysis.demo import DemoSize, run_demo

TINY = DemoSize(train_steps=5, train_docs=16, batch_size=4, analysis_docs=3, ro_samples=1,
                kappa_k=3, kappa_rollouts=2, kappa_horizon=2, bootstrap=20)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("details") / "run"
    run_demo(folder, TINY)
    torch.set_num_threads(threads)
    analysis = folder / "analysis"
    return {name: pd.read_parquet(analysis / f"{name}.parquet") for name in ("tokens", "next_tokens", "continuations")}


def test_teacher_top_next_token_is_pmax(run):
    tokens = run["tokens"]
    first = tokens[tokens.model == tokens.model.iloc[0]]
    teacher = run["next_tokens"].query("model == 'teacher'")
    merged = first.merge(teacher, on=["doc_id", "position"], suffixes=("", "_next"))
    assert len(merged) == len(first)
    top = np.array([probs[0] for probs in merged.probs])
    np.testing.assert_allclose(top, merged.teacher_pmax, rtol=1e-4)


def test_next_tokens_sorted_for_every_model(run):
    frame = run["next_tokens"]
    assert set(frame.model) == {"teacher", *run["tokens"].model.unique()}
    for probs in frame.probs:
        assert np.all(np.diff(probs) <= 0) and 0 < sum(probs) <= 1 + 1e-5


def test_action_q_reproduces_exact_kappa(run):
    """kappa is linear in Q, so the stored Q per action must give back the stored kappa."""
    tokens = run["tokens"]
    first = tokens[tokens.model == tokens.model.iloc[0]]
    teacher = run["next_tokens"].query("model == 'teacher'").set_index(["doc_id", "position"])
    checked = 0
    for row in first.itertuples():
        ids, probs = teacher.loc[(row.doc_id, row.position), ["token_ids", "probs"]]
        lookup = dict(zip(ids, probs))
        if not all(a in lookup for a in row.action_ids) or min(lookup[a] for a in row.action_ids) < 1e-3:
            continue  # an action tied with others at a tiny probability: its weight is not recoverable
        weights = np.array([lookup[a] for a in row.action_ids], dtype=np.float64)
        weights /= weights.sum()
        assert kappa_from_q(np.array(row.exact_action_q), weights)["kappa"] == pytest.approx(row.exact_kappa, abs=1e-3)
        assert kappa_from_q(np.array(row.action_q), weights)["kappa"] == pytest.approx(row.kappa, abs=1e-3)
        checked += 1
    assert checked >= 3


def test_continuation_diverges_where_stated(run):
    tokens = run["tokens"]
    for row in run["continuations"].itertuples():
        response = tokens.query("model == @row.model and doc_id == @row.doc_id").sort_values("position").token_id.tolist()
        own = list(row.own_ids)
        assert row.diverge_at == first_difference(own, response)
        stop = row.diverge_at if row.diverge_at >= 0 else len(own)
        assert own[:stop] == response[:stop]
        assert len(row.own_tokens) == len(own)


def test_first_difference_cases():
    assert first_difference([1, 2, 3], [1, 2, 3]) == -1
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


class _OldResult:
    """A document result pickled before the detail fields existed: no such attributes."""

    def __init__(self, doc):
        self.doc = doc


def test_results_without_details_give_no_table():
    results = [_OldResult(doc=None)]
    assert next_token_frame(results, str) is None
    assert continuation_frame(results, str) is None
