"""Launching child processes from tests: a free port, the children's environment, a run with a deadline, and the
2-rank launch that fails with every rank's output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240

#: Lines a rank prints when it dies in native code (C++ exceptions, gloo, signals), which no Python traceback shows.
NATIVE_FATAL = re.compile(r"terminate called|what\(\):|Fatal Python error|Segmentation fault|Aborted|\[enforce fail|gloo|SIGABRT|core dumped")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """This process's environment without launcher state, offline, one thread per rank, unbuffered, and with
    ``faulthandler`` on: a child killed by a signal prints every thread's Python stack (where a native crash hit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    return env


def launch(
    cmd: list, cwd: Path = REPO, timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None, stderr_apart: bool = False
) -> tuple[int, float, str]:
    """Run ``cmd`` in its own session with :func:`child_env` (or ``env``); returns (exit code, seconds, output):
    stdout and stderr interleaved, or with ``stderr_apart`` stdout, a line ``--- stderr:``, then stderr. Past
    ``timeout`` the whole session is killed and the output says so."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=child_env() if env is None else env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, errors = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        errors = (errors or "") + f"\n[test] killed after {timeout} s (a rank waiting in a collective?)"
    if stderr_apart:
        output += "\n--- stderr:\n" + errors
    elif errors:
        output += errors
    return proc.returncode, time.monotonic() - start, output


def tail(output: str, lines: int = 30) -> str:
    """The exceptions the ranks raised, the lines of native crashes, then the last ``lines`` lines of the output."""
    kept = [line for line in output.splitlines() if "Warning" not in line]
    errors = [line for line in kept if re.match(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b", line)]
    native = [line for line in kept if NATIVE_FATAL.search(line)]
    return "\n".join(["--- errors:", *errors[:10], "--- native crashes:", *native[:10], f"--- last {lines} lines:", *kept[-lines:]])


def launch_two_ranks(cmd: list, out: Path, label: str) -> SimpleNamespace:
    """Run a 2-process job from the repository root; fail with the ranks' errors (the whole output printed, for a
    crash without a traceback), else return the ``rank{0,1}.json`` each rank wrote into ``out``."""
    rc, seconds, output = launch(cmd)
    print(f"\n{label}: {seconds:.1f} s")
    if rc != 0:
        (out / "launch.log").write_text(output)
        print(output)
    assert rc == 0, f"{tail(output)}\n--- whole output: {out / 'launch.log'}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return SimpleNamespace(out=out, ranks=ranks, seconds=seconds)
