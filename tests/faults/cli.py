"""Run the bganalysis CLI as a subprocess, as a user would, and check how it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TRAIN = ["--teacher", "lab", "--steps", "24", "--save-every", "3", "--log-every", "1", "--num-docs", "48",
         "--batch-size", "8", "--student-hidden", "32", "--student-intermediate", "64", "--student-layers", "1",
         "--student-heads", "2", "--student-kv-heads", "1", "--device", "cpu", "--max-len", "64", "--warmup-steps", "2"]
GENERATE = ["--teacher", "lab", "--lab-prompts", "24", "--batch-size", "2", "--max-new-tokens", "24", "--seed", "3"]
ANALYZE = ["--teacher", "lab", "--lab-docs", "12", "--shard-size", "2", "--max-new-tokens", "8", "--kappa-k", "2",
           "--kappa-rollouts", "2", "--kappa-horizon", "2", "--bootstrap", "10", "--ro-samples", "1"]
CACHE = ["--teacher", "lab", "--num-docs", "24", "--k", "4", "--max-len", "64", "--batch-size", "2",
         "--shard-tokens", "24", "--device", "cpu"]
TABLES = ("tokens", "steps", "next_tokens", "continuations")


def environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["OMP_NUM_THREADS"] = "1"
    return env


def command(args: list[str]) -> list[str]:
    """The command line for `bganalysis ARGS`.

    Root reads files whatever their mode, so as root the capabilities that bypass file
    permissions are dropped, and a chmod 000 file is unreadable to the CLI as to a user.
    """
    line = [sys.executable, "-m", "bganalysis", *args]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        line = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *line]
    return line


def run(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `bganalysis ARGS` offline with one thread; `env` adds or overrides variables."""
    return subprocess.run(command(args), cwd=cwd, env={**environment(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess, name: str) -> str:
    """Assert the CLI failed on bad input: status 2, no traceback, one error line and it is the last; return it."""
    prefix = f"bganalysis {name}: error:"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1].startswith(prefix), result.stderr[-3000:]
    return lines[-1]


def files_under(path: Path) -> list[str]:
    if not path.exists():
        return []
    if path.is_file():
        return [str(path)]
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(student: Path) -> list[tuple]:
    """(step, loss, soft, hard, lr) of every record of a student's train_log.jsonl."""
    records = [json.loads(line) for line in (student / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["soft"], r["hard"], r["lr"]) for r in records]
