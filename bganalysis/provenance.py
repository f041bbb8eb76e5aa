"""Provenance of a result: package versions, the project's git commit, the platform."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """Return the commit of the bganalysis source tree, with `-dirty` for local changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance() -> dict:
    """Versions of bganalysis, torch, transformers and Python, the git commit and the platform."""
    import torch
    import transformers

    from bganalysis import __version__

    return {
        "bganalysis": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
