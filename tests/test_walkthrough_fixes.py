"""Regressions from a new-user walkthrough: messages, permissions, stale figures, sample ids."""

import json
import os
import stat
import subprocess
import sys

import pytest

from bganalysis.errors import UserError
from bganalysis.io import atomic_directory, atomic_write_parquet, read_prompts


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bganalysis", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_read_prompts_accepts_generated_samples(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"id": "p1", "prompt": "q", "response": "a", "sample": 0},
            {"id": "p1", "prompt": "q", "response": "b", "sample": 1}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [row["response"] for row in read_prompts(path)] == ["a", "b"]


def test_read_prompts_rejects_repeated_sample(tmp_path):
    path = tmp_path / "labels.jsonl"
    row = {"id": "p1", "prompt": "q", "sample": 0}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match="duplicate id 'p1'"):
        read_prompts(path)


def test_usage_error_is_one_line():
    result = _run("analyze", "--teacher", "lab", "--label-scope", "doc")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'doc'" in result.stderr


def test_mistyped_student_folder_named(tmp_path):
    (tmp_path / "models").mkdir()
    result = _run("analyze", "--teacher", "lab", "--student", "models/typo", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--student models/typo: no such folder; check the path")
    assert not (tmp_path / "run").exists()


def test_fraction_sum_names_both_options():
    from bganalysis.analysis.pipeline import AnalyzeConfig

    with pytest.raises(UserError, match="--bridge-fraction 0.8 plus --garden-fraction 0.3 exceeds 1"):
        AnalyzeConfig(teacher="lab", students=["s"], out="o", bridge_fraction=0.8)


def test_written_files_get_umask_mode(tmp_path):
    import pandas as pd

    old = os.umask(0o022)
    try:
        atomic_write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}))
        with atomic_directory(tmp_path / "model") as folder:
            (folder / "weights.bin").write_bytes(b"x")
            os.chmod(folder / "weights.bin", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.parquet").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model" / "weights.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_stale_exact_figure_removed(tmp_path):
    import pandas as pd

    from bganalysis.analysis.figures import write_analysis_figures

    folder = tmp_path / "figures"
    folder.mkdir()
    (folder / "kappa_vs_exact.png").write_bytes(b"old")
    tokens = pd.DataFrame({"model": ["s", "s"], "doc_id": ["d", "d"], "position": [0, 1], "token": ["a", "b"],
                           "kappa": [1.0, 2.0], "region": ["bridge", "garden"]})
    steps = pd.DataFrame({"model": ["s"], "step": [0], "tf": [0.1], "ro": [0.2], "eb": [0.1], "eb_low": [0.0],
                          "eb_high": [0.2], "tf_count": [5], "ro_count": [5]})
    entry = {f"{metric}_{region}": 0.1 for metric in ("eb", "tf") for region in ("overall", "bridge", "garden")}
    entry.update({f"{key}_ci": [0.0, 0.2] for key in list(entry)})
    write_analysis_figures(folder, tokens, steps, {"students": {"s": entry}, "kappa": {}}, heatmap_docs=1)
    assert not (folder / "kappa_vs_exact.png").exists()
    assert (folder / "kappa_map.png").exists()
