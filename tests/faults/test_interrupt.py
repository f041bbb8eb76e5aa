"""SIGINT, SIGTERM and SIGKILL at a seeded random point of train, generate, analyze and cache-teacher.

The resumed result must equal an uninterrupted run. `test_eval_faults.py` does the same for eval.

The interruption point is counted in finished work (log lines, rows, shards) rather than
in seconds, so it is the same on a loaded machine; the seed picks it.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from tests.faults.cli import (ANALYZE, CACHE, GENERATE, TABLES, TRAIN, command, environment, files_under, losses,
                              ok, run)

SEED = 7


def _interrupt(args: list[str], cwd: Path, progress, at: int, signum: int, timeout: float = 240) -> str:
    """Start `bganalysis ARGS`, send `signum` once `progress()` reaches `at`; return its stderr."""
    log = cwd / f"stderr-{signum}.txt"
    with log.open("w") as stderr:
        # A shell without job control starts background jobs with SIGINT ignored, and a child
        # inherits that, so CI launched with `&` would see SIGINT do nothing. Restore the default.
        process = subprocess.Popen(command(args), cwd=cwd, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and progress() < at:
            assert time.monotonic() < deadline, "the command made no progress"
            time.sleep(0.005)
        # Freeze the process first: on an idle machine the lab commands finish the remaining
        # work in milliseconds, so a plain signal could land after the last row or shard.
        process.send_signal(signal.SIGSTOP)
        assert process.poll() is None, f"finished before the signal at {at}: {log.read_text()[-2000:]}"
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    log.unlink()
    if signum in (signal.SIGINT, signal.SIGTERM):
        assert process.returncode == 130, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    return text


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
def test_train_resumes_to_the_same_student(train_reference, tmp_path, signum):
    at = random.Random(f"{SEED}-train-{signum}").randint(4, 18)
    args = ["train", *TRAIN, "--out", str(tmp_path)]
    log = tmp_path / "checkpoints" / "hybrid" / "train_log.jsonl"
    _interrupt(args, tmp_path, lambda: _lines(log), at, signum)
    assert not (tmp_path / "students").exists()  # an interrupted run writes no student
    if signum == signal.SIGKILL:
        _tear_like_a_kill(log.parent)

    rerun = ok(run([*args, "--resume"], tmp_path))
    step = int(rerun.stderr.split("checkpoint-")[1].split()[0].rstrip(")"))
    if signum == signal.SIGKILL:
        assert step >= at - 3  # at most the steps since the last checkpoint are lost (--save-every 3)
    else:
        assert step >= at  # the signal saved a checkpoint after the step that was running
    student = tmp_path / "students" / "hybrid"
    assert losses(student) == losses(train_reference)
    resumed, reference = load_file(student / "model.safetensors"), load_file(train_reference / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(resumed[name].equal(reference[name]) for name in reference)
    assert not (tmp_path / "checkpoints").exists()


def _tear_like_a_kill(run_dir: Path) -> None:
    """Leave what a kill during a save would: a checkpoint without trainer_state.json and a cut-off log line."""
    latest = max(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    partial = run_dir / f"checkpoint-{int(latest.name.split('-')[1]) + 3}"
    shutil.copytree(latest, partial)
    (partial / "trainer_state.json").unlink()
    with (run_dir / "train_log.jsonl").open("a") as handle:
        handle.write('{"step": 99, "loss": 1.2')


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
def test_generate_resumes_to_the_same_rows(generate_reference, tmp_path, signum):
    at = random.Random(f"{SEED}-generate-{signum}").randint(2, 16)
    out = tmp_path / "labels.jsonl"
    args = ["generate", *GENERATE, "--out", str(out)]
    _interrupt(args, tmp_path, lambda: _lines(out), at, signum)
    assert 0 < _lines(out) < _lines(generate_reference)
    ok(run(args, tmp_path))
    assert out.read_bytes() == generate_reference.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
def test_analyze_resumes_to_the_same_tables(analyze_reference, inputs, tmp_path, signum):
    at = random.Random(f"{SEED}-analyze-{signum}").randint(1, 4)
    args = ["analyze", *ANALYZE, "--student", str(inputs["student"]), "--out", str(tmp_path)]
    shards = tmp_path / "analysis" / "shards"
    _interrupt(args, tmp_path, lambda: len(list(shards.glob("shard-*.pkl"))), at, signum)
    assert not (tmp_path / "analysis" / "tokens.parquet").exists()
    ok(run(args, tmp_path))
    for table in TABLES:
        resumed = pd.read_parquet(tmp_path / "analysis" / f"{table}.parquet")
        pd.testing.assert_frame_equal(resumed, pd.read_parquet(analyze_reference / f"{table}.parquet"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_cache_teacher_resumes_to_the_same_files(cache_reference, tmp_path, signum):
    shards = sorted(path.name for path in cache_reference.glob("shard-*.safetensors"))
    at = random.Random(f"{SEED}-cache-{signum}").randint(1, len(shards) - 1)
    out = tmp_path / "cache"
    args = ["cache-teacher", *CACHE, "--out", str(out)]
    _interrupt(args, tmp_path, lambda: len(list(out.glob("shard-*.safetensors"))), at, signum)
    assert not (out / "manifest.json").exists()  # written last, so an interrupted cache is never read as whole
    finished = sorted(path.name for path in out.glob("shard-*.safetensors"))
    if signum == signal.SIGKILL:  # a kill during a write leaves the temporary file behind
        (out / f".shard-{len(finished):05d}.safetensors.k1ll3d.tmp").write_bytes(b"cut off")
    rerun = ok(run(args, tmp_path))
    assert rerun.stderr.count("is complete; skipping it") == len(finished) >= at
    assert files_under(out) == files_under(cache_reference)
    assert (out / "manifest.json").read_bytes() == (cache_reference / "manifest.json").read_bytes()
    for name in shards:  # the order of safetensors metadata keys differs between runs, so compare contents
        assert _shard(out / name) == _shard(cache_reference / name), name


def _shard(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors as nested lists) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.metadata(), {name: handle.get_tensor(name).tolist() for name in handle.keys()}
