"""Launching child processes from tests: a free port, the children's environment, a run with a deadline, and the
2-rank launch that fails with every rank's output.

Deadlines (:class:`Deadline`) count wall seconds weighted by the share of the CPUs the machine can give the job, so a
machine loaded by other work gives a launch more wall time; a hard limit still ends a launch on a machine that stays
overloaded. DeepSpeed's CPU communication op, compiled on first use into ``~/.cache/torch_extensions`` (g++,
ninja), is built or loaded once per session before the first DeepSpeed launch (:func:`prepare_deepspeed_cpu_ops`),
outside any launch's deadline. A launch past its deadline is killed with every process it started, and its output
ends with one ``[test] timed out ...`` line saying how long it ran, at what load, what was running and what it was
doing (building that op, before or after the first training step)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
#: A launch's deadline: seconds of a machine not loaded beyond its CPU count (:class:`Deadline`).
LAUNCH_TIMEOUT_S = 240
#: However loaded the machine, a launch is killed after this many times its deadline in wall seconds.
HARD_LIMIT_FACTOR = 4
#: The deadline of building DeepSpeed's CPU communication op (first use: ~30 s of g++ on 2 idle cores).
OP_BUILD_TIMEOUT_S = 900
#: What a process that compiles a C++ extension runs.
BUILD_TOOLS = ("ninja", "c++", "g++", "gcc", "cc1plus", "cc", "ld", "as")

#: Lines a rank prints when it dies in native code (C++ exceptions, gloo, signals), which no Python traceback shows.
NATIVE_FATAL = re.compile(r"terminate called|what\(\):|Fatal Python error|Segmentation fault|Aborted|\[enforce fail|gloo|SIGABRT|core dumped")


class Deadline:
    """``seconds`` of a machine that is not overloaded: a wall second counts ``min(1, CPUs / load)``, the 1-minute
    load average read at each :meth:`passed` (the job's own processes included, so a job alone on the machine counts
    about in full). Passed also after ``HARD_LIMIT_FACTOR * seconds`` wall seconds, whatever the load."""

    def __init__(self, seconds: float, clock=time.monotonic, load_average=None) -> None:
        self.seconds = seconds
        self.cpus = os.cpu_count() or 1
        self.clock, self.load_average = clock, load_average or _load_average
        self.start = self._last = clock()
        self.counted = 0.0
        self.max_load = 0.0

    def passed(self) -> bool:
        now = self.clock()
        load = self.load_average()
        self.max_load = max(self.max_load, load)
        self.counted += (now - self._last) * min(1.0, self.cpus / load) if load > 0 else now - self._last
        self._last = now
        return self.counted >= self.seconds or self.wall() >= HARD_LIMIT_FACTOR * self.seconds

    def wall(self) -> float:
        return self.clock() - self.start

    def describe(self) -> str:
        return (f"{self.wall():.0f} s ({self.counted:.0f} s of its {self.seconds:g} s deadline counted at a 1-minute load average "
                f"of up to {self.max_load:.1f} on {self.cpus} CPUs; hard limit {HARD_LIMIT_FACTOR * self.seconds:g} s)")  # fmt: skip


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on Linux/macOS
        return 0.0


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
    stdout and stderr interleaved, or with ``stderr_apart`` stdout, a line ``--- stderr:``, then stderr. Past the
    :class:`Deadline` of ``timeout`` seconds the launch and every process it started are killed, and the output ends
    with what happened (:func:`timeout_report`). With ``DS_ACCELERATOR=cpu`` and DeepSpeed installed (the floor
    leg's environment has none), DeepSpeed's CPU op is made ready first, outside the deadline
    (:func:`prepare_deepspeed_cpu_ops`)."""
    env = child_env() if env is None else env
    if env.get("DS_ACCELERATOR") == "cpu" and importlib.util.find_spec("deepspeed") is not None:
        prepare_deepspeed_cpu_ops(env)
    rc, seconds, output, errors = _run_with_deadline(cmd, cwd, env, timeout, stderr_apart)
    if stderr_apart:
        output += "\n--- stderr:\n" + errors
    elif errors:
        output += errors
    return rc, seconds, output


def _run_with_deadline(cmd: list, cwd: Path, env: dict[str, str], timeout: float, stderr_apart: bool) -> tuple[int, float, str, str]:
    deadline = Deadline(timeout)
    proc = subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    while True:
        try:
            output, errors = proc.communicate(timeout=2.0)  # retried: no output is lost (subprocess docs)
            break
        except subprocess.TimeoutExpired:
            if not deadline.passed():
                continue
            killed = kill_tree(proc.pid)
            try:
                output, errors = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # a process outside the launch's tree holds the pipe
                proc.kill()
                proc.wait()
                output, errors = "", "[test] the output is lost: a process that escaped the kill still holds the pipe"
            errors = (errors or "") + "\n" + timeout_report(deadline, killed, (output or "") + (errors or ""))
            break
    return proc.returncode, deadline.wall(), output or "", errors or ""


def kill_tree(pid: int) -> list[str]:
    """SIGKILL process ``pid``, every process it started and their process groups; returns what was running
    (``name`` or ``name (command)`` for Python). torchrun starts each rank in a session of its own: killing the
    launch's session alone left the ranks running, holding the output pipe, and failing later on the dead
    rendezvous (Broken pipe, C++ frames) long after the deadline."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - accelerate depends on psutil
        os.killpg(pid, signal.SIGKILL)
        return ["(psutil missing: the launch's own session only)"]
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    names = []
    for proc in procs:
        try:
            names.append(_process_name(proc))
            proc.suspend()  # nothing starts another process while the others are killed
        except psutil.Error:
            continue
    groups = set()
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
            proc.kill()
        except (psutil.Error, ProcessLookupError):
            continue
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    return names


def _process_name(proc) -> str:
    """``ninja``, ``cc1plus``, or for Python what it runs: ``python (train.py)``, ``python (-m torch.distributed.run)``."""
    name = proc.name()
    if not name.startswith("python"):
        return name
    args = proc.cmdline()[1:]
    for i, arg in enumerate(args):
        if arg in ("-m", "-c"):
            return f"{name} ({arg} {args[i + 1]})" if arg == "-m" and i + 1 < len(args) else f"{name} (-c)"
        if not arg.startswith("-"):
            return f"{name} ({os.path.basename(arg)})"
    return name


def timeout_report(deadline: Deadline, killed: list[str], output: str) -> str:
    """The one line that ends a timed-out launch's output: how long it ran and at what load, what it was doing
    (DeepSpeed's op build, before or after the Trainer's first logged step), and what was killed."""
    building = any(name in BUILD_TOOLS for name in killed) or (
        "Building extension module" in output and "Loading extension module" not in output
    )
    steps = len(re.findall(r"\{'loss': ", output))
    if building:
        doing = ("while a C++ extension was being built (DeepSpeed's CPU communication op, compiled on first use into "
                 "~/.cache/torch_extensions: prepare_deepspeed_cpu_ops in tests/support/_launch.py should have built it)")  # fmt: skip
    elif steps:
        doing = f"after the Trainer had logged {steps} training step(s) (progress stopped or too slow)"
    else:
        doing = "before the Trainer logged a training step (starting up, loading, or waiting for another rank)"
    counts: dict[str, int] = {}
    for name in killed:
        counts[name] = counts.get(name, 0) + 1
    running = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items()) or "nothing left"
    return f"[test] timed out after {deadline.describe()} {doing}; killed: {running}"


#: Per session: the DeepSpeed CPU op builds done, by interpreter and extensions directory (their report line).
_DEEPSPEED_OPS: dict[tuple[str, str | None], str] = {}
BUILD_DEEPSPEED_CPU_OPS = """
import time
start = time.monotonic()
from deepspeed.comm.torch import build_shm_op  # what every rank runs when DeepSpeed starts its process group
print("[op] ready" if build_shm_op() is not None else "[op] none for this machine", f"{time.monotonic() - start:.1f} s", flush=True)
"""


def prepare_deepspeed_cpu_ops(env: dict[str, str]) -> str:
    """Build (first use: ~30 s of g++ and ninja on 2 idle cores, minutes on a loaded machine) or load DeepSpeed's
    CPU communication op once per session, before the first DeepSpeed launch, so that no launch's deadline covers
    it; every rank of a later launch loads it from ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``).
    ``RuntimeError`` naming the op and what it needs if it does not build. Returns the report line."""
    key = (sys.executable, env.get("TORCH_EXTENSIONS_DIR"))
    if key not in _DEEPSPEED_OPS:
        rc, seconds, output, _ = _run_with_deadline([sys.executable, "-c", BUILD_DEEPSPEED_CPU_OPS], REPO, env, OP_BUILD_TIMEOUT_S, False)
        if rc != 0:
            raise RuntimeError(
                f"DeepSpeed's CPU communication op (deepspeed_shm_comm) did not build or load before the launch "
                f"(it needs g++ and ninja: tests/README.md); exit code {rc} after {seconds:.0f} s:\n"
                + "\n".join(output.splitlines()[-20:])
            )  # fmt: skip
        ready = [line for line in output.splitlines() if line.startswith("[op] ")]
        _DEEPSPEED_OPS[key] = f"DeepSpeed CPU op: {ready[-1][5:] if ready else 'ready'} (before the launch, in {seconds:.1f} s)"
        print(f"\n[test] {_DEEPSPEED_OPS[key]}")
    return _DEEPSPEED_OPS[key]


def tail(output: str, lines: int = 30) -> str:
    """A timeout's report line first, then the exceptions the ranks raised, the lines of native crashes, then the last
    ``lines`` lines of the output."""
    kept = [line for line in output.splitlines() if "Warning" not in line]
    timed_out = [line for line in kept if line.startswith("[test] timed out")]
    errors = [line for line in kept if re.match(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b", line)]
    native = [line for line in kept if NATIVE_FATAL.search(line)]
    return "\n".join([*timed_out, "--- errors:", *errors[:10], "--- native crashes:", *native[:10], f"--- last {lines} lines:", *kept[-lines:]])


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
    return SimpleNamespace(out=out, ranks=ranks, seconds=seconds, output=output)
