"""Run the execution of generated code in a confined child process.

evalplus already runs each sample in its own process with a time limit per test and a
memory limit (`EVALPLUS_MAX_MEMORY_BYTES`), and disables `os.fork`, `os.kill`,
`shutil.rmtree` and friends inside it. That guard stops accidents, not hostile code
(its own docstring says so). This module adds a layer around the whole execution step:

- a child process in its own session (process group), ended with SIGTERM and then
  SIGKILL at a wall-clock limit, and the whole group killed when it returns. The
  child also gets SIGKILL from the kernel when the caller dies, even by SIGKILL;
- resource limits inherited by every process below it: address space (`memory_bytes`,
  so a 4 GB allocation fails with MemoryError), file size (`file_bytes`, so an output
  flood into a file stops with SIGXFSZ), no core files, and a cap on processes
  (a `pids` cgroup where one is writable, else RLIMIT_NPROC for non-root users);
- a private temporary working directory (mode 0700) that also serves as HOME, TMPDIR
  and the evalplus cache, deleted afterwards; stdout and stderr go to files there, and
  only their last `tail_bytes` are read back;
- Linux namespaces where the kernel allows: a new network namespace (no interface but
  a down loopback, so no connection leaves) and a new PID namespace (every process the
  step started dies when it ends, including ones that left the process group);
- Landlock where the kernel has it (Linux 5.13+): writes, deletions and renames are
  refused outside the working directory, /dev/null and /dev/shm; TCP bind and connect
  are refused (ABI 4+); signals to processes outside the sandbox are refused (ABI 6+).

`run_sandboxed` returns the list of layers that were actually in force, and
`docs/eval.md` lists what is not protected (reading files, CPU time of other users'
processes, kernel exploits, metadata changes such as chmod that Landlock does not cover).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PIDS_CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed step. Bytes, seconds, process counts."""

    wall_seconds: float = 3600.0
    memory_bytes: int = 2 * 1024**3  # per process (RLIMIT_AS); also evalplus's per-sample limit
    file_bytes: int = 256 * 1024**2  # largest file any process may write (RLIMIT_FSIZE)
    processes: int = 512  # processes the step may hold at once
    tail_bytes: int = 64 * 1024  # bytes of stdout/stderr kept

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"sandbox limit {name}={value} is invalid: it must be positive")


@dataclass
class SandboxResult:
    returncode: int
    timed_out: bool
    seconds: float
    stdout_tail: str
    stderr_tail: str
    protections: list[str] = field(default_factory=list)


def private_workdir(prefix: str = "bganalysis-sandbox-") -> Path:
    """A new private temporary folder (mode 0700) for one sandboxed step."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def run_sandboxed(function: str, kwargs: dict, workdir: Path, limits: SandboxLimits = SandboxLimits(),
                  env: dict[str, str] | None = None) -> SandboxResult:
    """Call `function` ("module:name", importable) with `kwargs` (JSON) inside the sandbox.

    The call runs with `workdir` as its working directory; `env` adds variables to a
    minimal environment (PATH, LANG, HOME/TMPDIR = workdir). The function's return
    value is written by the child to `workdir/result.json` and is not read here.
    """
    workdir = Path(workdir).resolve()
    cgroup = _make_pids_cgroup(limits.processes)
    config = {"function": function, "kwargs": kwargs, "workdir": str(workdir), "limits": asdict(limits),
              "cgroup": str(cgroup) if cgroup else None, "parent": os.getpid()}
    (workdir / "sandbox.json").write_text(json.dumps(config))
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(workdir),
                 "TMPDIR": str(workdir), "XDG_CACHE_HOME": str(workdir / "cache"), "PYTHONDONTWRITEBYTECODE": "1",
                 "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1",
                 "EVALPLUS_MAX_MEMORY_BYTES": str(limits.memory_bytes), **(env or {})}

    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bganalysis.evaluation.sandbox_child", str(workdir / "sandbox.json")],
                               cwd=workdir, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    stdout, stderr = _TailReader(process.stdout, limits.tail_bytes), _TailReader(process.stderr, limits.tail_bytes)
    timed_out = False
    try:
        process.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    finally:
        _kill_group(process, signal.SIGKILL)  # anything left in the group; also on Ctrl-C
        process.wait()
        _remove_cgroup(cgroup)
    seconds = time.perf_counter() - started
    return SandboxResult(process.returncode, timed_out, seconds, stdout.text(), stderr.text(), _read_protections(workdir))


class _TailReader:
    """Drain a pipe in a thread and keep only its last `size` bytes (output floods cost no memory)."""

    def __init__(self, pipe, size: int):
        self._chunks: collections.deque[bytes] = collections.deque()
        self._kept, self._size = 0, size
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe) -> None:
        with pipe:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                self._chunks.append(chunk)
                self._kept += len(chunk)
                while self._kept - len(self._chunks[0]) >= self._size:
                    self._kept -= len(self._chunks.popleft())

    def text(self) -> str:
        self._thread.join(timeout=5)
        return b"".join(self._chunks)[-self._size:].decode("utf-8", errors="replace")


def remove_workdir(workdir: Path) -> None:
    """Delete a sandbox working folder, including files a sample made read-only."""
    def make_writable(function, path, _error):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path):
            os.chmod(path, 0o700)
        function(path)

    shutil.rmtree(workdir, onerror=make_writable)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _make_pids_cgroup(limit: int) -> Path | None:
    """A fresh `pids` cgroup (v1) capped at `limit`, or None where none is writable."""
    if not os.access(PIDS_CGROUP_ROOT, os.W_OK):
        return None
    path = PIDS_CGROUP_ROOT / f"bganalysis-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(limit))
    except OSError as error:
        log.debug("no pids cgroup (%s)", error)
        _remove_cgroup(path if path.exists() else None)
        return None
    return path


def _remove_cgroup(path: Path | None) -> None:
    if path is None:
        return
    for _ in range(50):  # the kernel refuses while killed processes are still exiting
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    log.warning("could not remove the sandbox cgroup %s; remove it with rmdir", path)


def _read_protections(workdir: Path) -> list[str]:
    try:
        return json.loads((workdir / "protections.json").read_text())
    except (OSError, ValueError):
        return []
