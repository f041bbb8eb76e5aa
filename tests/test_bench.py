"""`bganalysis bench analysis`: the measurements on tiny models, and the CLI."""

import math

import pytest
import torch

from bganalysis.bench.analysis import BenchSize, centred_subset, flops_per_token, measure_continuation, measure_kappa
from bganalysis.bench.lab_validation import lab_validation, train_lab_student
from bganalysis.cli import build_parser
from bganalysis.lab import sample_documents
from tests.helpers import tiny_llama

VOCAB = 39
EOS = {2}
TINY = BenchSize(kappa_k=3, kappa_rollouts=3, kappa_horizon=3, engine_positions=3, reference_positions=2,
                 reference_rollouts=2, eb_new_tokens=6, eb_engine_rows=3, eb_reference_rows=2, grid=False)
KAPPA_KEYS = ["kappa_engine_seconds_per_position", "kappa_reference_seconds_per_position", "kappa_speedup_vs_reference",
              "kappa_max_abs_diff_vs_reference_in_se", "kappa_se_ratio_vs_plain", "tokens_per_second",
              "matmul_gflops", "flop_bound_tokens_per_second", "fraction_of_flop_bound"]
CONTINUATION_KEYS = ["eb_engine_seconds_per_row", "eb_reference_seconds_per_row", "eb_speedup_vs_reference",
                     "eb_max_abs_diff_vs_reference", "eb_rollout_loss_mean"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one thread: tiny matrices gain nothing from a second one on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=0, layers=3), tiny_llama(VOCAB, seed=1, layers=1)


@pytest.fixture(scope="module")
def document():
    doc = sample_documents(1, seed=3)[0]
    return doc.prompt_ids + doc.response_ids


@pytest.fixture(scope="module")
def kappa_result(models, document):
    return measure_kappa(*models, document, TINY, EOS, VOCAB, seed=0)


def test_kappa_keys_are_finite(kappa_result):
    for key in KAPPA_KEYS:
        assert math.isfinite(kappa_result[key]), key


def test_kappa_engine_matches_reference(kappa_result):
    # float rounding only: a cached batch and a full forward differ by about 1e-7 nats
    assert kappa_result["kappa_max_abs_diff_vs_reference_in_se"] < 1e-2
    assert kappa_result["kappa_identical_rollouts_vs_reference"] == 1.0


def test_kappa_counts_positions(kappa_result):
    assert kappa_result["kappa_engine_positions"] == 3
    assert kappa_result["kappa_reference_positions"] == 2


def test_continuation_matches_reference(models, document):
    result = measure_continuation(*models, document[:20], TINY, EOS, VOCAB, seed=0)
    for key in CONTINUATION_KEYS:
        assert math.isfinite(result[key]), key
    assert result["eb_max_abs_diff_vs_reference"] < 1e-4
    assert result["eb_identical_tokens_vs_reference"] == 6
    assert result["eb_reference_rows"] == 2


def test_flops_per_token_counts_tied_head_once():
    model = tiny_llama(VOCAB, layers=2, hidden=32)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected_non_embedding = total - embedding - (0 if tied else embedding)
    assert flops_per_token(model) == 2.0 * (expected_non_embedding + embedding)


def test_centred_subset_spreads_indices():
    assert centred_subset(1, 6) == [3]
    assert centred_subset(2, 6) == [1, 4]
    assert centred_subset(3, 3) == [0, 1, 2]


def test_bench_size_rejects_too_few_reference_rollouts():
    with pytest.raises(ValueError, match="reference_rollouts"):
        BenchSize(reference_rollouts=1)


def test_bench_size_rejects_one_se_replicate():
    with pytest.raises(ValueError, match="se_replicates"):
        BenchSize(se_replicates=1)


def test_se_ratio_measured_by_replicates(kappa_result):
    assert kappa_result["kappa_se_ratio_replicates"] == TINY.se_replicates
    assert 0.0 < kappa_result["kappa_se_ratio_vs_plain"] < 5.0
    assert abs(kappa_result["kappa_stratified_minus_plain_in_se"]) < 5.0


def test_cli_bench_analysis_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "analysis", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_cli_bench_rejects_unknown_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "training"])
    assert exit_info.value.code == 2


def test_lab_validation_in_range(tmp_path):
    student = train_lab_student(tmp_path, steps=3, num_docs=16)
    result = lab_validation(student, tmp_path / "analysis", docs=3, k=2, rollouts=2, horizon=2)
    for key in ("rho", "teacher_only_rho", "teacher_entropy_rho"):
        assert -1.0 <= result[key] <= 1.0, key
    for key in ("bridge_f1", "garden_f1", "exact_bridge_f1", "teacher_only_garden_f1"):
        assert 0.0 <= result[key] <= 1.0, key


def test_budget_grid_figure_written(tmp_path):
    import pandas as pd

    from bganalysis.analysis.validation_figures import plot_budget_grid

    frame = pd.DataFrame([{"kappa_k": k, "kappa_rollouts": r, "kappa_horizon": 8, "rho": 0.8 + 0.01 * r,
                           "bridge_f1": 0.9, "garden_f1": 0.85} for k in (2, 4) for r in (2, 4)])
    plot_budget_grid(frame, tmp_path)
    assert (tmp_path / "rho_vs_budget.png").stat().st_size > 0
    assert (tmp_path / "rho_vs_budget.svg").stat().st_size > 0
