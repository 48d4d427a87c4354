"""Where a result was produced, as the scripts record it beside their numbers: the CPU model and the
checkout's commit (one copy for ``scripts/bench_optimizers.py`` and ``scripts/compare_optimizers.py``)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_name", "git_commit"]


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (``+dirty`` with local changes to tracked files), ``None``
    outside a git checkout or without git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return commit + "+dirty" if commit and git("status", "--porcelain", "--untracked-files=no") else commit
