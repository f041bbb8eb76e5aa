"""Entry point of the sandboxed child: confine this process, then call the function.

Run as `python -m bganalysis.evaluation.sandbox_child CONFIG.json` by `sandbox.run_sandboxed`,
never directly. The steps run before any generated code is imported, while this process
is still single-threaded (unshare needs that). Each layer that takes effect is added to
`protections.json` in the working folder, so the caller can log what was in force.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # x86_64 and arm64
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Filesystem rights that change something; reading and executing stay allowed everywhere.
FS_WRITE_RIGHTS = {1: (1 << 1) | sum(1 << bit for bit in range(4, 13)), 2: 1 << 13, 3: 1 << 14}
NET_TCP_BIND_CONNECT = 0b11
SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)


def main(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    workdir, limits = config["workdir"], config["limits"]
    protections = ["process group", "private working folder"]

    _die_with_parent(config["parent"])
    _join_cgroup(config.get("cgroup"), protections)
    _set_limits(limits, protections)
    _unshare(protections)  # forks: from here on this is pid 1 of a new PID namespace where allowed
    _landlock(workdir, protections)
    with open(os.path.join(workdir, "protections.json"), "w", encoding="utf-8") as handle:
        json.dump(protections, handle)

    module, _, name = config["function"].partition(":")
    result = getattr(importlib.import_module(module), name)(**config["kwargs"])
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for non-daemon threads (evalplus leaves a 20 s watchdog running)


def _die_with_parent(parent: int | None) -> None:
    """Ask the kernel for SIGKILL when the parent dies, so a killed `bganalysis eval` leaves no sandbox running.

    `parent` is the pid that started this process; if it is gone already, exit at once.
    `None` (the pid 1 of the PID namespace, whose parent lies outside it) skips the check.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _join_cgroup(cgroup: str | None, protections: list[str]) -> None:
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
        protections.append("pids cgroup")


def _set_limits(limits: dict, protections: list[str]) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    protections.append("rlimits (address space, file size, core)")
    if os.geteuid() != 0:  # RLIMIT_NPROC counts all processes of the user and does not bind root
        own = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _owned(entry))
        cap = own + limits["processes"]
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
        protections.append("RLIMIT_NPROC")


def _owned(pid: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def _unshare(protections: list[str]) -> None:
    """New network and PID namespaces (as root, or inside a new user namespace), then fork."""
    flags = CLONE_NEWNET | CLONE_NEWPID
    if _libc.unshare(flags) != 0 and _libc.unshare(flags | CLONE_NEWUSER) != 0:
        return
    protections.append("network namespace")
    protections.append("pid namespace")
    pid = os.fork()
    if pid == 0:
        # The kernel kills the whole namespace when its pid 1 dies, so this covers every process below.
        _die_with_parent(None)
        return
    # The parent only relays: it waits for pid 1 of the namespace; when that exits, the
    # kernel kills every process left in the namespace.
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _landlock(workdir: str, protections: list[str]) -> None:
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return
    write_rights = sum(bits for version, bits in FS_WRITE_RIGHTS.items() if abi >= version)
    attr = (ctypes.c_uint64 * 3)(write_rights, NET_TCP_BIND_CONNECT if abi >= 4 else 0, SCOPE_SIGNAL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return
    try:
        for path, rights in ((workdir, write_rights), ("/dev/shm", write_rights), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
            _allow(ruleset, path, rights)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    protections.append(f"landlock ABI {abi}: writes only in the working folder, /dev/shm, /dev/null")
    if abi >= 4:
        protections.append("landlock: no TCP bind or connect")
    if abi >= 6:
        protections.append("landlock: no signals to processes outside the sandbox")


def _allow(ruleset: int, path: str, rights: int) -> None:
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
        rule = (ctypes.c_uint8 * 12).from_buffer_copy(rights.to_bytes(8, "little") + fd.to_bytes(4, "little", signed=True))
        if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1])
