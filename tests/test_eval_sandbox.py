"""Hostile generated code ends as a failed or timed-out sample; the host is untouched.

Each test scores real HumanEval+ problems with evalplus inside the sandbox, with one
hostile solution among canonical ones, and checks the canonical ones still pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bganalysis.evaluation.code_runner import CodeSettings, load_problems, score
from bganalysis.evaluation.sandbox import SandboxLimits, private_workdir, remove_workdir, run_sandboxed

DATA = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
pytestmark = pytest.mark.skipif(not (DATA / "humanevalplus").is_dir(), reason="needs ../shared/benchmarks")
LIMITS = SandboxLimits(wall_seconds=120, memory_bytes=2 * 1024**3, file_bytes=8 * 1024**2, processes=256)


def _score_with(hostile_body: str) -> dict:
    """Statuses of HumanEval/0 (hostile body) and HumanEval/1..2 (canonical solutions)."""
    problems = load_problems("humaneval", DATA, 3)
    solutions = [{"task_id": p["task_id"], "prompt": p["prompt"], "generation": "",
                  "solution": p["prompt"] + p["canonical_solution"]} for p in problems]
    solutions[0]["solution"] = problems[0]["prompt"] + textwrap.indent(textwrap.dedent(hostile_body), "    ")
    statuses, protections = score(problems, solutions, CodeSettings("humaneval", 3, False, 16, parallel=2, limits=LIMITS))
    assert statuses["HumanEval/1"]["base_status"] == "pass" and statuses["HumanEval/2"]["plus_status"] == "pass"
    return statuses["HumanEval/0"]


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(cmdline)
    return found


def test_canonical_solutions_pass_and_wrong_ones_fail():
    status = _score_with("return not True if numbers else True\n")
    assert status["base_status"] == "fail"


def test_infinite_loop_times_out():
    status = _score_with("while True:\n    pass\n")
    assert status["base_status"] in ("fail", "timeout")  # evalplus ends it by its per-test time limit


@pytest.mark.parametrize("body", ["exit()\n", "import sys\nsys.exit(0)\n", "raise SystemExit(0)\n",
                                  "import os\nos._exit(0)\n"])
def test_exit_attempts_fail(body):
    assert _score_with(body)["base_status"] in ("fail", "timeout")


def test_fork_attempts_fail_and_leave_no_process():
    marker = f"bganalysis-fork-test-{os.getpid()}"
    body = f"""
    import ctypes, os, time
    libc = ctypes.CDLL(None)
    for _ in range(600):  # more than the sandbox's process cap
        if libc.fork() == 0:
            os.execv("/bin/sleep", ["/bin/sleep", "300", "{marker}"])
    time.sleep(300)
    """
    assert _score_with(body)["base_status"] in ("fail", "timeout")
    time.sleep(0.5)
    assert _processes_mentioning(marker) == []


def test_os_fork_is_refused():
    assert _score_with("import os\nos.fork()\nreturn True\n")["base_status"] == "fail"


def test_four_gigabyte_allocation_fails():
    assert _score_with("x = bytearray(4 * 1024**3)\nreturn len(x) > 0\n")["base_status"] == "fail"


def test_write_outside_the_working_folder_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    created = tmp_path / "created.txt"
    body = f"""
    open({str(created)!r}, "w").write("x")
    return True
    """
    assert _score_with(body)["base_status"] == "fail"
    body = f"""
    open({str(victim)!r}, "w").write("overwritten")
    return True
    """
    assert _score_with(body)["base_status"] == "fail"
    assert victim.read_text() == "original" and not created.exists()


def test_output_flood_is_cut():
    body = """
    import os
    while True:
        os.write(1, b"x" * 65536)
        os.write(2, b"y" * 65536)
    """
    assert _score_with(body)["base_status"] in ("fail", "timeout")


def test_network_connection_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    accepted = []

    def accept():
        deadline = time.time() + 30
        while time.time() < deadline and not accepted:
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    body = f"""
    import socket
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
    return True
    """
    try:
        assert _score_with(body)["base_status"] == "fail"
        assert accepted == []
    finally:
        server.close()


def test_wall_clock_limit_kills_the_whole_step():
    marker = f"{os.getpid()}.{time.monotonic_ns() % 1000}"
    workdir = private_workdir()
    try:
        result = run_sandboxed("subprocess:call", {"args": ["/bin/sleep", marker]}, workdir,
                               SandboxLimits(wall_seconds=2))
        assert result.timed_out and result.seconds < 15
        assert json.loads((workdir / "protections.json").read_text())[0] == "process group"
    finally:
        remove_workdir(workdir)
    time.sleep(0.5)
    assert _processes_mentioning(f"sleep {marker}") == []


def test_killed_caller_leaves_no_sandbox(tmp_path):
    # SIGKILL gives the caller no chance to clean up: the kernel must end the sandbox (PR_SET_PDEATHSIG).
    marker = f"{os.getpid()}.{time.monotonic_ns() % 1000 + 1}"
    script = ("import sys; from bganalysis.evaluation.sandbox import SandboxLimits, private_workdir, run_sandboxed; "
              f"run_sandboxed('subprocess:call', {{'args': ['/bin/sleep', '{marker}']}}, private_workdir(), "
              "SandboxLimits(wall_seconds=600))")
    caller = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not _processes_mentioning(f"sleep {marker}"):
            assert time.monotonic() < deadline, "the sandboxed sleep never started"
            assert caller.poll() is None, "the caller exited before the sandboxed sleep started"
            time.sleep(0.05)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while _processes_mentioning(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(f"sleep {marker}") == []
