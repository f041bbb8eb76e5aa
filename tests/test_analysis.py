"""The analysis: EB per step against a plain reference, statistics, labels, kappa, outputs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bganalysis.analysis.documents import PURPOSE_RESPONSE, PURPOSE_ROLLOUT, generator_for
from bganalysis.analysis.labels import label_by_rank, label_frame, set_agreement
from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis
from bganalysis.analysis.setup import lab_prompt_rows
from bganalysis.analysis.statistics import StepArrays, bootstrap_weights, region_summary, step_table
from bganalysis.lab import LabTeacher, lab_tokenizer
from bganalysis.losses import kl_from_logprobs
from bganalysis.reference import next_logprobs, reference_continuation
from bganalysis.train import TrainConfig, train
from tests.helpers import tiny_llama

VOCAB = 39
EOS = {2}
TOLERANCE = 1e-4
SMALL = dict(kappa_k=2, kappa_rollouts=2, kappa_horizon=2, ro_samples=2, max_new_tokens=12, bootstrap=20)
STUDENT_SEEDS = {"s1": 1, "s2": 2}
GIVEN_PROMPTS = [
    {"id": "given", "prompt": "calc 3 + 5 :", "response": "3 + 5 = 8 ; answer 8"},
    {"id": "sampled", "prompt": "prog 2 :"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one thread: tiny matrices gain nothing from more threads, and on a
    shared 2-core machine two OpenMP threads made the kappa test 4 to 6 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_model(model, folder):
    model.save_pretrained(folder)
    lab_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def student_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {name: _save_model(tiny_llama(VOCAB, seed=seed), root / name) for name, seed in STUDENT_SEEDS.items()}


def _read_run(folder) -> dict:
    analysis = folder / "analysis"
    return {
        "tokens": pd.read_parquet(analysis / "tokens.parquet"),
        "steps": pd.read_parquet(analysis / "steps.parquet"),
        "summary_text": (analysis / "summary.json").read_text(),
        "out": folder,
    }


def _lab_config(student_dirs, out) -> AnalyzeConfig:
    return AnalyzeConfig(teacher="lab", students=list(student_dirs.values()), out=str(out), num_lab_docs=3, **SMALL)


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory, student_dirs):
    """Run one small analysis with the exact lab teacher, sampled lab prompts and two random students."""
    out = tmp_path_factory.mktemp("lab_run")
    config = _lab_config(student_dirs, out)
    summary = run_analysis(config)
    prompts = [lab_tokenizer()(row["prompt"]).input_ids for row in lab_prompt_rows(3, seed=10_000 + config.seed)]
    return {"config": config, "summary": summary, "teacher": LabTeacher(),
            "rows": [{"id": f"lab{i}", "prompt_ids": ids, "response": None} for i, ids in enumerate(prompts)],
            **_read_run(out)}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, student_dirs):
    """Run one small analysis with a KV-cached random Llama teacher, a prompts file (one row with a
    given response) and a sampling temperature other than 1."""
    out = tmp_path_factory.mktemp("llama_run")
    teacher_dir = _save_model(tiny_llama(VOCAB, seed=7), out / "teacher")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in GIVEN_PROMPTS))
    config = AnalyzeConfig(teacher=teacher_dir, students=list(student_dirs.values()), out=str(out / "run"),
                           prompts=str(prompts), sample_temperature=0.7, **SMALL)
    summary = run_analysis(config)
    tokenizer = lab_tokenizer()
    rows = [{"id": row["id"], "prompt_ids": tokenizer(row["prompt"]).input_ids,
             "response": (tokenizer(row["response"], add_special_tokens=False).input_ids + [2]
                          if row.get("response") else None)}
            for row in GIVEN_PROMPTS]
    return {"config": config, "summary": summary, "teacher": tiny_llama(VOCAB, seed=7),
            "rows": rows, **_read_run(out / "run")}


# Plain step-by-step reference of TF, RO and EB


@torch.no_grad()
def _full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :, :VOCAB]
    return torch.log_softmax(logits.float(), dim=-1)


def _teacher_response(teacher, prompt_ids: list[int], config: AnalyzeConfig, index: int) -> list[int]:
    uniforms = torch.rand(1, config.max_new_tokens, generator=generator_for(config.seed, index, PURPOSE_RESPONSE))
    tokens, _, _ = reference_continuation(teacher, prompt_ids, uniforms, EOS, VOCAB)
    response = []
    for token in tokens[0].tolist():
        response.append(token)
        if token in EOS:
            break
    return response


def _reference_losses(run: dict) -> dict:
    """Compute the response of each document, and per student TF [L] and RO [R, M] (NaN after EOS).

    Each RO state is scored with one full forward of the teacher over prompt + own tokens.
    """
    config, teacher = run["config"], run["teacher"]
    students = {name: tiny_llama(VOCAB, seed=seed) for name, seed in STUDENT_SEEDS.items()}
    documents = {}
    for index, row in enumerate(run["rows"]):
        prompt = row["prompt_ids"]
        response = row["response"] or _teacher_response(teacher, prompt, config, index)
        states = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
        teacher_logprobs = _full_forward_logprobs(teacher, prompt + response)[states]
        uniforms = torch.rand(config.ro_samples, config.max_new_tokens,
                              generator=generator_for(config.seed, index, PURPOSE_ROLLOUT))
        tf, ro = {}, {}
        for name, student in students.items():
            student_logprobs = _full_forward_logprobs(student, prompt + response)[states]
            tf[name] = kl_from_logprobs(teacher_logprobs, student_logprobs).double().numpy()
            ro[name] = _reference_ro(teacher, student, prompt, uniforms, config.sample_temperature)
        documents[row["id"]] = {"response": response, "tf": tf, "ro": ro}
    return documents


def _reference_ro(teacher, student, prompt: list[int], uniforms: torch.Tensor, temperature: float) -> np.ndarray:
    tokens, alive, student_states = reference_continuation(student, prompt, uniforms, EOS, VOCAB, temperature)
    losses = np.full(uniforms.shape, math.nan)
    for r in range(tokens.shape[0]):
        for k in range(tokens.shape[1]):
            if alive[r, k]:
                teacher_state = next_logprobs(teacher, prompt + tokens[r, :k].tolist(), VOCAB)
                losses[r, k] = float(kl_from_logprobs(teacher_state, student_states[r, k]))
    return losses


def _reference_steps(documents: dict, name: str, max_steps: int) -> pd.DataFrame:
    """Average TF, RO and EB per step, with counts, for every step that a document or sample reaches."""
    rows = []
    for step in range(max_steps):
        tf = [doc["tf"][name][step] for doc in documents.values() if step < len(doc["tf"][name])]
        ro = [value for doc in documents.values() for value in doc["ro"][name][:, step] if not math.isnan(value)]
        if not tf and not ro:
            continue
        tf_mean = float(np.mean(tf)) if tf else math.nan
        ro_mean = float(np.mean(ro)) if ro else math.nan
        rows.append({"step": step, "tf": tf_mean, "ro": ro_mean, "eb": ro_mean - tf_mean,
                     "tf_count": float(len(tf)), "ro_count": float(len(ro))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", params=["lab", "llama"])
def parity(request):
    run = request.getfixturevalue(f"{request.param}_run")
    return run, _reference_losses(run)


def test_teacher_responses_match_reference(parity):
    run, documents = parity
    tokens = run["tokens"]
    for doc_id, doc in documents.items():
        rows = tokens[(tokens.doc_id == doc_id) & (tokens.model == "s1")].sort_values("position")
        assert rows.token_id.tolist() == doc["response"], doc_id


def test_step_table_matches_reference(parity):
    run, documents = parity
    max_steps = max(run["config"].max_new_tokens, max(len(doc["response"]) for doc in documents.values()))
    for name in STUDENT_SEEDS:
        expected = _reference_steps(documents, name, max_steps)
        actual = run["steps"][run["steps"].model == name].reset_index(drop=True)
        assert actual.step.tolist() == expected.step.tolist(), name
        assert actual.tf_count.tolist() == expected.tf_count.tolist(), name
        assert actual.ro_count.tolist() == expected.ro_count.tolist(), name
        assert np.allclose(actual.tf, expected.tf, atol=TOLERANCE, equal_nan=True), name
        assert np.allclose(actual.ro, expected.ro, atol=TOLERANCE, equal_nan=True), name
        assert np.allclose(actual.eb, expected.eb, atol=TOLERANCE, equal_nan=True), name


def _mean_alive(losses: np.ndarray) -> np.ndarray:
    """Return column means over the non-NaN entries of [R, L] losses, NaN where none is left."""
    alive = ~np.isnan(losses)
    totals = np.where(alive, losses, 0.0).sum(axis=0)
    counts = alive.sum(axis=0)
    return np.where(counts > 0, totals / np.maximum(counts, 1), math.nan)


def test_token_losses_match_reference(parity):
    run, documents = parity
    tokens = run["tokens"]
    for name in STUDENT_SEEDS:
        for doc_id, doc in documents.items():
            rows = tokens[(tokens.doc_id == doc_id) & (tokens.model == name)].sort_values("position")
            expected_ro = _mean_alive(doc["ro"][name][:, : len(doc["response"])])
            assert np.allclose(rows.tf_loss, doc["tf"][name], atol=TOLERANCE), (name, doc_id)
            assert np.allclose(rows.ro_loss, expected_ro, atol=TOLERANCE, equal_nan=True), (name, doc_id)


# Bootstrap intervals and the statistics tables


def test_step_intervals_contain_estimate(lab_run):
    steps = lab_run["steps"]
    for metric in ("tf", "ro", "eb"):
        finite = steps[np.isfinite(steps[metric])]
        assert (finite[f"{metric}_low"] <= finite[metric] + 1e-12).all(), metric
        assert (finite[metric] <= finite[f"{metric}_high"] + 1e-12).all(), metric


def test_summary_intervals_contain_estimate(lab_run):
    for name, entry in lab_run["summary"]["students"].items():
        for key in ("eb_overall", "eb_bridge", "eb_garden", "tf_overall", "tf_bridge", "tf_garden"):
            low, high = entry[f"{key}_ci"]
            assert low <= entry[key] + 1e-12, (name, key)
            assert entry[key] <= high + 1e-12, (name, key)


def _hand_arrays() -> StepArrays:
    """Build sums and counts for three documents and three steps. RO sums cover each document's alive samples."""
    return StepArrays(
        tf_sum=np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 6.0], [2.0, 0.0, 0.0]]),
        tf_count=np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
        ro_sum=np.array([[2.0, 3.0, 1.0], [4.0, 0.0, 0.0], [1.0, 5.0, 0.0]]),
        ro_count=np.array([[2.0, 2.0, 1.0], [2.0, 0.0, 0.0], [1.0, 2.0, 0.0]]),
    )


def test_step_table_point_values():
    table = step_table(_hand_arrays(), np.ones((2, 3)))
    # TF is (1+3+2)/3, (2+4)/2 and 6/1. RO is (2+4+1)/5, (3+5)/4 and 1/1.
    assert np.allclose(table["tf"], [2.0, 3.0, 6.0])
    assert np.allclose(table["ro"], [1.4, 2.0, 1.0])
    assert np.allclose(table["eb"], [-0.6, -1.0, -5.0])
    assert table["tf_count"].tolist() == [3.0, 2.0, 1.0]
    assert table["ro_count"].tolist() == [5.0, 4.0, 1.0]


def test_step_table_identical_replicates():
    table = step_table(_hand_arrays(), np.ones((2, 3)))
    assert np.allclose(table["eb_low"], table["eb"])
    assert np.allclose(table["eb_high"], table["eb"])


def test_step_table_interval_from_replicates():
    # Replicate 1 draws document 0 three times and replicate 2 document 1, so EB(0) is
    # 1 - 1 = 0 and 2 - 3 = -1. Numpy's linear percentiles of {-1, 0} at 2.5 and 97.5 are
    # -1 + 0.025 and -0.025. At step 2 only replicate 2 has a TF value (6).
    table = step_table(_hand_arrays(), np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    assert np.isclose(table["eb_low"][0], -0.975)
    assert np.isclose(table["eb_high"][0], -0.025)
    assert np.isclose(table["tf_low"][2], 6.0)
    assert np.isclose(table["tf_high"][2], 6.0)


def test_region_summary_values():
    mask = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    summary = region_summary(_hand_arrays(), mask, np.ones((2, 3)))
    # The TF cells are 1, 4, 6 and 2, so TF = 13 / 4. The RO cells hold 2 over 2 samples,
    # nothing, and 1 over 1 sample, so RO = 3 / 3.
    assert np.isclose(summary["tf"], 3.25)
    assert np.isclose(summary["ro"], 1.0)
    assert np.isclose(summary["eb"], -2.25)
    assert summary["tf_tokens"] == 4
    assert summary["ro_tokens"] == 3


def test_region_summary_separate_ro_mask():
    mask = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    summary = region_summary(_hand_arrays(), mask, np.ones((2, 3)), ro_mask=np.ones((3, 3)))
    assert np.isclose(summary["ro"], 16 / 10)
    assert summary["ro_tokens"] == 10
    assert summary["tf_tokens"] == 4


def test_bootstrap_weights_resample_all_documents():
    weights = bootstrap_weights(5, 30, seed=3)
    assert weights.shape == (30, 5)
    assert (weights.sum(axis=1) == 5).all()


def test_bootstrap_weights_deterministic():
    assert np.array_equal(bootstrap_weights(5, 30, seed=3), bootstrap_weights(5, 30, seed=3))
    assert not np.array_equal(bootstrap_weights(5, 30, seed=3), bootstrap_weights(5, 30, seed=4))


# Bridge/Garden labels


def test_label_by_rank_fractions():
    values = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
    labels, bridge_min, garden_max = label_by_rank(values, 0.3, 0.3)
    assert set(np.flatnonzero(labels == "bridge")) == {1, 3, 5}
    assert set(np.flatnonzero(labels == "garden")) == {2, 6, 9}
    assert set(np.flatnonzero(labels == "")) == {0, 4, 7, 8}
    assert bridge_min == 0.7
    assert garden_max == 0.2


def test_label_by_rank_ties_position_order():
    labels, _, _ = label_by_rank(np.ones(10), 0.3, 0.3)
    # Ties rank earlier positions as riskier: Bridges first, Gardens last.
    assert labels.tolist() == ["bridge"] * 3 + [""] * 4 + ["garden"] * 3


def test_label_by_rank_tie_at_boundary():
    labels, bridge_min, garden_max = label_by_rank(np.array([2.0, 1.0, 1.0, 1.0, 0.0]), 0.4, 0.2)
    assert labels.tolist() == ["bridge", "bridge", "", "", "garden"]
    assert bridge_min == 1.0
    assert garden_max == 0.0


def test_label_by_rank_empty():
    labels, bridge_min, garden_max = label_by_rank(np.array([]), 0.3, 0.3)
    assert len(labels) == 0
    assert math.isnan(bridge_min)
    assert math.isnan(garden_max)


def test_label_frame_per_document():
    frame = pd.DataFrame({"doc_id": ["a"] * 5 + ["b"] * 5,
                          "position": list(range(5)) * 2,
                          "kappa": [5.0, 4.0, 3.0, 2.0, 1.0, 10.0, 30.0, 20.0, 50.0, 40.0]})
    labels, thresholds = label_frame(frame, "kappa", 0.2, 0.2, scope="document")
    assert labels.tolist() == ["bridge", "", "", "", "garden", "garden", "", "", "bridge", ""]
    assert thresholds["a"] == {"bridge_min": 5.0, "garden_max": 1.0}
    assert thresholds["b"] == {"bridge_min": 50.0, "garden_max": 10.0}


def test_set_agreement_by_hand():
    predicted = pd.Series(["bridge", "bridge", "garden", "", "bridge", "garden"])
    reference = pd.Series(["bridge", "garden", "garden", "bridge", "", "garden"])
    bridge = set_agreement(predicted, reference, "bridge")
    garden = set_agreement(predicted, reference, "garden")
    # Bridges: predicted {0, 1, 4}, reference {0, 3}. Gardens: predicted {2, 5}, reference {1, 2, 5}.
    assert np.isclose(bridge["precision"], 1 / 3)
    assert np.isclose(bridge["recall"], 1 / 2)
    assert np.isclose(bridge["f1"], 0.4)
    assert np.isclose(garden["precision"], 1.0)
    assert np.isclose(garden["recall"], 2 / 3)
    assert np.isclose(garden["f1"], 0.8)


def test_set_agreement_disjoint_f1_zero():
    # Both sets are non-empty and share no position: F1 = 2 hits / (|predicted| + |reference|) = 0.
    predicted = pd.Series(["bridge", "", ""])
    reference = pd.Series(["", "bridge", ""])
    agreement = set_agreement(predicted, reference, "bridge")
    assert agreement["precision"] == 0.0
    assert agreement["recall"] == 0.0
    assert agreement["f1"] == 0.0


def test_regions_per_document_fractions(lab_run):
    tokens = lab_run["tokens"]
    positions = tokens[tokens.model == "s1"]
    for doc_id, doc in positions.groupby("doc_id"):
        expected = int(round(0.3 * len(doc)))
        assert (doc.region == "bridge").sum() == expected, doc_id
        assert (doc.region == "garden").sum() == expected, doc_id


# Kappa against the exact value

BRIDGE_F1_FLOOR = 0.85
GARDEN_F1_FLOOR = 0.8


@pytest.fixture(scope="module")
def lab_student(tmp_path_factory):
    """A hard-label student trained 600 steps on the lab, the small budget of the validation tests."""
    out = tmp_path_factory.mktemp("lab_student")
    return train(TrainConfig(method="hard", steps=600, out=str(out), seed=0, device="cpu"))


def test_kappa_vs_exact_default_budget(lab_student, tmp_path):
    config = AnalyzeConfig(teacher="lab", students=[str(lab_student)], out=str(tmp_path / "run"), num_lab_docs=15,
                           kappa_k=4, kappa_rollouts=4, kappa_horizon=8, bootstrap=20)
    summary = run_analysis(config)
    rho = summary["kappa_spearman_vs_exact"]
    teacher_only_rho = summary["kappa"]["teacher_only"]["spearman_vs_exact"]
    print(f"kappa Spearman vs exact: {rho:.4f}, teacher-only: {teacher_only_rho:.4f}")
    assert rho >= 0.85
    assert teacher_only_rho >= 0.9


def test_lab_labels_match_true_roles(lab_student, tmp_path):
    # K = 2 matches the lab's definition of roles: a Bridge has one valid token, so its
    # second most likely token corrupts the document; a Garden's top two are both valid.
    # 60% / 40% labels match the share of true Bridges (about 62% of positions).
    config = AnalyzeConfig(teacher="lab", students=[str(lab_student)], out=str(tmp_path / "run"), num_lab_docs=15,
                           kappa_k=2, kappa_rollouts=4, kappa_horizon=8, bootstrap=20, bridge_fraction=0.6,
                           garden_fraction=0.4)
    roles = run_analysis(config)["agreement"]["vs_true_role"]
    bridge_f1, garden_f1 = roles["kappa"]["bridge"]["f1"], roles["kappa"]["garden"]["f1"]
    print(f"F1 against true roles: Bridge {bridge_f1:.3f}, Garden {garden_f1:.3f}; "
          f"exact kappa {roles['exact']['bridge']['f1']:.3f}, {roles['exact']['garden']['f1']:.3f}")
    assert bridge_f1 >= BRIDGE_F1_FLOOR
    assert garden_f1 >= GARDEN_F1_FLOOR


# Output files


TOKEN_COLUMNS = {"doc_id", "position", "model", "token", "token_id", "teacher_entropy", "teacher_pmax",
                 "kappa", "kappa_se", "region", "tf_loss", "ro_loss"}
STEP_COLUMNS = {"model", "step", "tf", "ro", "eb", "eb_low", "eb_high", "tf_count", "ro_count"}
STUDENT_KEYS = ("eb_overall", "eb_bridge", "eb_garden", "tf_overall", "ro_overall")


def test_tokens_one_row_per_position_and_model(lab_run):
    tokens = lab_run["tokens"]
    positions = tokens[tokens.model == "s1"].groupby("doc_id").position.max() + 1
    assert len(tokens) == positions.sum() * len(STUDENT_SEEDS)
    assert not tokens.duplicated(["doc_id", "position", "model"]).any()
    assert set(tokens.model) == set(STUDENT_SEEDS)


def test_tokens_columns(lab_run):
    missing = TOKEN_COLUMNS - set(lab_run["tokens"].columns)
    assert not missing


def test_steps_one_row_per_model_and_step(lab_run):
    steps = lab_run["steps"]
    assert not STEP_COLUMNS - set(steps.columns)
    assert not steps.duplicated(["model", "step"]).any()


def _reject_constant(name):
    raise ValueError(f"summary.json contains {name}, which strict JSON forbids")


def test_summary_strict_json(lab_run):
    summary = json.loads(lab_run["summary_text"], parse_constant=_reject_constant)
    assert set(summary["students"]) == set(STUDENT_SEEDS)


def test_summary_student_entries(lab_run):
    summary = json.loads(lab_run["summary_text"])
    for name, entry in summary["students"].items():
        for key in STUDENT_KEYS:
            assert isinstance(entry[key], float), (name, key)


def test_same_seed_identical_tables(lab_run, student_dirs, tmp_path):
    run_analysis(_lab_config(student_dirs, tmp_path))
    again = _read_run(tmp_path)
    pd.testing.assert_frame_equal(again["tokens"], lab_run["tokens"])
    pd.testing.assert_frame_equal(again["steps"], lab_run["steps"])
    first, second = json.loads(lab_run["summary_text"]), json.loads(again["summary_text"])
    for summary in (first, second):
        summary["settings"].pop("out")
        summary.pop("provenance")  # the git commit moves when anyone commits between the two runs
    assert first == second
