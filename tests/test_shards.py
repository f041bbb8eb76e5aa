"""Sharded analysis: finished shards survive a kill, reruns compute only the rest, ranks split work."""

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis
from bganalysis.errors import UserError
from bganalysis.lab import lab_tokenizer
from tests.helpers import tiny_llama

SETTINGS = dict(teacher="lab", num_lab_docs=4, shard_size=1, kappa_k=2, kappa_rollouts=2, kappa_horizon=2,
                ro_samples=1, max_new_tokens=10, bootstrap=20, seed=5)
CLI_OPTIONS = ["--teacher", "lab", "--lab-docs", "4", "--shard-size", "1", "--kappa-k", "2", "--kappa-rollouts", "2",
               "--kappa-horizon", "2", "--ro-samples", "1", "--max-new-tokens", "10", "--bootstrap", "20", "--seed", "5"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student")
    tiny_llama(39, seed=4).save_pretrained(folder)
    lab_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def uninterrupted(student, tmp_path_factory):
    # Run through the CLI with one thread, like the runs it is compared with: a different
    # thread count changes float summation order and the last digits of the tables.
    out = tmp_path_factory.mktemp("whole")
    process = _cli(student, out)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return out


def _tables(out):
    tokens = pd.read_parquet(out / "analysis" / "tokens.parquet")
    steps = pd.read_parquet(out / "analysis" / "steps.parquet")
    return tokens, steps


def _assert_same_tables(a, b):
    tokens_a, steps_a = _tables(a)
    tokens_b, steps_b = _tables(b)
    pd.testing.assert_frame_equal(tokens_a, tokens_b)
    pd.testing.assert_frame_equal(steps_a, steps_b)


def _cli(student, out, env=None):
    command = [sys.executable, "-m", "bganalysis", "analyze", "--student", student, "--out", str(out), *CLI_OPTIONS]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after_first_shard(process, out, signum):
    """Send `signum` to a running analysis once its first shard is on disk; return that shard's path."""
    first_shard = out / "analysis" / "shards" / "shard-00000.pkl"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    return first_shard


def test_rerun_computes_only_missing_shard(student, uninterrupted, tmp_path):
    first = _cli(student, tmp_path)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    shards = tmp_path / "analysis" / "shards"
    kept = {path.name: path.stat().st_mtime_ns for path in shards.glob("shard-*.pkl") if path.name != "shard-00001.pkl"}
    (shards / "shard-00001.pkl").unlink()

    rerun = _cli(student, tmp_path)
    _, stderr = rerun.communicate(timeout=300)

    assert rerun.returncode == 0, stderr
    assert "1 to compute" in stderr
    assert (shards / "shard-00001.pkl").exists()
    assert {name: (shards / name).stat().st_mtime_ns for name in kept} == kept
    _assert_same_tables(tmp_path, uninterrupted)


def test_sigkill_then_rerun_matches_uninterrupted(student, uninterrupted, tmp_path):
    process = _cli(student, tmp_path)
    first_shard = _signal_after_first_shard(process, tmp_path, signal.SIGKILL)
    process.communicate(timeout=60)
    assert first_shard.exists()
    assert not (tmp_path / "analysis" / "tokens.parquet").exists()
    finished = {path.name: path.stat().st_mtime_ns for path in first_shard.parent.glob("shard-*.pkl")}

    rerun = _cli(student, tmp_path)
    _, stderr = rerun.communicate(timeout=300)

    assert rerun.returncode == 0, stderr
    assert f"{4 - len(finished)} to compute" in stderr
    assert {name: (first_shard.parent / name).stat().st_mtime_ns for name in finished} == finished
    _assert_same_tables(tmp_path, uninterrupted)


def test_two_ranks_match_one_process(student, uninterrupted, tmp_path):
    ranks = [_cli(student, tmp_path, {"RANK": str(rank), "WORLD_SIZE": "2", "BGANALYSIS_SHARD_WAIT_S": "300"})
             for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in ranks]

    assert [process.returncode for process in ranks] == [0, 0], outputs
    _assert_same_tables(tmp_path, uninterrupted)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_matches_one_process(student, uninterrupted, tmp_path):
    # On a machine without GPUs, `accelerate launch --num_processes 2` alone starts one process;
    # `--multi_gpu` makes it start two through torch.distributed.run, which sets RANK and WORLD_SIZE.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
               "-m", "bganalysis", "analyze", "--student", student, "--out", str(tmp_path), *CLI_OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGANALYSIS_SHARD_WAIT_S": "300"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    assert process.returncode == 0, process.stderr
    assert "in process 0 of 2" in process.stderr
    assert "in process 1 of 2" in process.stderr
    _assert_same_tables(tmp_path, uninterrupted)


def test_changed_settings_rejected_without_force(student, tmp_path):
    run_analysis(AnalyzeConfig(students=[student], out=str(tmp_path), **SETTINGS))
    changed = {**SETTINGS, "kappa_k": 3}

    with pytest.raises(UserError, match="kappa_k"):
        run_analysis(AnalyzeConfig(students=[student], out=str(tmp_path), **changed))
    run_analysis(AnalyzeConfig(students=[student], out=str(tmp_path), force=True, **changed))

    tokens, _ = _tables(tmp_path)
    assert len(tokens) > 0


def test_sigterm_keeps_finished_shards(student, uninterrupted, tmp_path):
    process = _cli(student, tmp_path)
    first_shard = _signal_after_first_shard(process, tmp_path, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    if process.returncode != 0:  # the run may finish before the signal arrives
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1].endswith("interrupted; finished outputs are kept")
    assert first_shard.exists()
    rerun = _cli(student, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    _assert_same_tables(tmp_path, uninterrupted)


def test_settings_added_later_keep_older_shards():
    from bganalysis.analysis.pipeline import config_dict
    from bganalysis.analysis.shards import fingerprint

    settings = config_dict(AnalyzeConfig(teacher="lab", students=["s"], out="o"))
    older = {key: value for key, value in settings.items() if key not in ("kappa_random", "estimators")}
    assert fingerprint(settings)["hash"] == fingerprint(older)["hash"]
    changed = {**settings, "estimators": ["teacher_only"]}
    assert fingerprint(changed)["hash"] != fingerprint(older)["hash"]
