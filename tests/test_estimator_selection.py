"""`analyze --estimators` and `--kappa-random`: which kappa estimators run, and random tokens in the action set."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bganalysis.analysis.kappa import select_actions
from bganalysis.analysis.labels import label_frame
from bganalysis.analysis.pipeline import AnalyzeConfig
from bganalysis.cli import main
from bganalysis.errors import UserError
from bganalysis.lab import lab_tokenizer
from tests.helpers import tiny_llama

ANALYZE = ["--teacher", "lab", "--lab-docs", "4", "--kappa-k", "2", "--kappa-rollouts", "2", "--kappa-horizon", "2",
           "--ro-samples", "1", "--max-new-tokens", "8", "--bootstrap", "20"]


def test_random_actions_outside_the_top_k():
    logprobs = torch.log_softmax(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, float("-inf")]), dim=0)
    actions = select_actions(logprobs, 2, observed=5, random=3, generator=torch.Generator().manual_seed(0))
    assert actions[:3].tolist() == [0, 1, 5]
    extra = actions[3:].tolist()
    assert len(extra) == 3
    assert extra == sorted(extra)
    assert set(extra) <= {2, 3, 4, 6}  # never the set's tokens, never a token of probability 0


def test_random_actions_skip_excluded_tokens():
    logprobs = torch.log_softmax(torch.zeros(6), dim=0)
    actions = select_actions(logprobs, 1, random=10, generator=torch.Generator().manual_seed(0), exclude=(1, 2))
    assert actions.tolist() == [0, 3, 4, 5]


def test_random_actions_follow_the_generator():
    logprobs = torch.log_softmax(torch.randn(200, generator=torch.Generator().manual_seed(1)), dim=0)

    def draw(seed):
        return select_actions(logprobs, 4, random=5, generator=torch.Generator().manual_seed(seed)).tolist()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_random_actions_capped_by_the_vocabulary():
    logprobs = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), dim=0)
    actions = select_actions(logprobs, 2, random=5, generator=torch.Generator().manual_seed(0))
    assert actions.tolist() == [0, 1, 2]


@pytest.mark.parametrize("estimators", [[], ["monte_carlo", "rollout"]])
def test_unknown_estimator_lists_the_valid_names(estimators):
    with pytest.raises(UserError, match="monte_carlo, teacher_only"):
        AnalyzeConfig(teacher="lab", students=["s"], out="o", estimators=estimators)


def test_estimators_kept_in_one_order_without_repeats():
    requested = ["teacher_only", "monte_carlo", "teacher_only"]
    config = AnalyzeConfig(teacher="lab", students=["s"], out="o", estimators=requested)
    assert config.estimators == ["monte_carlo", "teacher_only"]


@pytest.fixture(scope="module")
def lab_student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("selection") / "student"
    tiny_llama(39, seed=3).save_pretrained(folder)
    lab_tokenizer().save_pretrained(folder)
    return folder


def _analyse(student, out, *extra) -> tuple[pd.DataFrame, dict]:
    assert main(["analyze", *ANALYZE, "--student", str(student), "--out", str(out), *extra]) == 0
    tokens = pd.read_parquet(out / "analysis" / "tokens.parquet")
    return tokens, json.loads((out / "analysis" / "summary.json").read_text())


def test_teacher_only_run_labels_by_teacher_only(lab_student, tmp_path):
    tokens, summary = _analyse(lab_student, tmp_path / "run", "--estimators", "teacher_only")
    assert tokens.kappa.isna().all()
    assert tokens.kappa_se.isna().all()
    assert tokens.teacher_only_kappa.notna().all()
    assert all(pd.isna(q) for qs in tokens.action_q for q in qs)  # no rollout ran
    assert summary["labels"]["estimator"] == "teacher_only"
    assert summary["agreement"]["estimators"] == ["teacher_only", "exact", "teacher_pmax", "teacher_margin",
                                                  "teacher_entropy"]

    positions = tokens[tokens.model == tokens.model.iloc[0]].reset_index(drop=True)
    expected, _ = label_frame(positions, "teacher_only_kappa", 0.3, 0.3, "document")
    assert positions.region.tolist() == expected.tolist()
    assert summary["kappa_spearman_vs_exact"] == pytest.approx(summary["kappa"]["teacher_only"]["spearman_vs_exact"])
    assert main(["plot", str(tmp_path / "run")]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "κ: teacher-only counterfactual" in report
    assert "2 teacher top tokens" in report


def test_both_estimators_by_default_and_random_actions(lab_student, tmp_path):
    tokens, summary = _analyse(lab_student, tmp_path / "run", "--kappa-random", "2")
    assert tokens.kappa.notna().all()
    assert tokens.teacher_only_kappa.notna().all()
    assert summary["labels"]["estimator"] == "monte_carlo"
    assert (tokens.action_set_size == 4).all()
    special = set(lab_tokenizer().all_special_ids)
    assert not any(special & set(ids[2:]) for ids in tokens.action_ids)  # the random tokens are never special
    assert all(len(ids) == len(qs) == 4 for ids, qs in zip(tokens.action_ids, tokens.action_q))
    assert all(len(set(ids)) == 4 for ids in tokens.action_ids)


def test_teacher_only_run_in_the_app(lab_student, tmp_path):
    from tests.test_app import open_page

    _analyse(lab_student, tmp_path / "runs" / "run", "--estimators", "teacher_only")
    for page in ("Token map", "Risk", "Exposure bias"):
        app = open_page(tmp_path / "runs", page, "run")
        assert not app.exception
    app = open_page(tmp_path / "runs", "Token map", "run")
    app.radio(key="colour").set_value("teacher-only kappa").run()
    assert not app.exception


def test_random_actions_beyond_the_vocabulary_warn(lab_student, tmp_path, caplog):
    tokens, _ = _analyse(lab_student, tmp_path / "run", "--kappa-random", "1000", "--estimators", "teacher_only")
    assert "exceeds the vocabulary of 39 tokens" in caplog.text
    assert (tokens.action_set_size <= 39).all()
