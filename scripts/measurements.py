"""What the benchmark and the comparison record beside their numbers (``scripts/bench_optimizers.py``,
``scripts/compare_optimizers.py``): bytes of tensors and of an optimizer's state (their one measurement of
memory), and where a result was produced (the CPU model, the checkout's commit). A helper module, not a script."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["optimizer_state_bytes", "state_tensors", "tensor_bytes", "cpu_name", "git_commit"]


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Total bytes of ``tensors``, counting each storage once (views and repeats are not re-counted)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def state_tensors(value: Any) -> Iterable[Tensor]:
    """Every tensor inside an optimizer-state value (recursing into dicts, lists and tuples)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from state_tensors(item)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` (momentum/moment buffers and per-tensor scalars),
    through accelerate's ``AcceleratedOptimizer`` (its ``.optimizer``) when given one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return tensor_bytes(state_tensors(dict(inner.state)))


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
