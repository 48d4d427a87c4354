"""``python -m sai_hf.run (SCRIPT | -m MODULE) [ARGS...]``: run an unmodified training script with ``--optim sgd_sai``
available (:data:`HELP`; scripts/README.md). Also under ``accelerate launch`` and ``torchrun`` (``... -m sai_hf.run``).

``sai_hf`` is imported first (it registers the names when the script imports transformers); then the script runs as
``python SCRIPT ARGS...`` would (:func:`main`). The Python processes it starts import ``sai_hf`` too, through
:data:`CHILD_SITE` on ``PYTHONPATH`` (:func:`child_environment`).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.machinery
import importlib.util
import io
import os
import pkgutil
import runpy
import sys
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["main", "script_kind", "UsageError", "child_environment", "end_process_group", "CHILD_SITE", "CHILDREN_GATE"]

#: The directory put first on ``PYTHONPATH`` for the script's processes: it holds only ``sitecustomize.py``.
CHILD_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_site")
#: ``1``: the processes started under the launcher import sai_hf (read by ``CHILD_SITE/sitecustomize.py``); ``0`` before
#: the launcher starts: they do not.
CHILDREN_GATE = "SAI_HF_REGISTER_IN_CHILDREN"

PROG = "python -m sai_hf.run"
USAGE = f"usage: {PROG} [-h] (SCRIPT | -m MODULE) [ARGS...]"
HELP = f"""{USAGE}

Run a training script as `python SCRIPT ARGS...` (or `python -m MODULE ARGS...`) would, with
sai_hf imported (it registers when the script imports transformers): the script's
HfArgumentParser accepts `--optim sgd_sai` (and `--optim adam_mini`), its TrainingArguments
check --optim_args, and every transformers Trainer it builds gets sai-hf's GSNRCallback. Use it
for scripts that never `import sai_hf` themselves, e.g. the transformers examples. Works under
`accelerate launch ... -m sai_hf.run` and `torchrun ... -m sai_hf.run`.

arguments:
  SCRIPT       a Python file, or a directory or zip file holding a __main__.py
  -m MODULE    run a module (a package: its __main__) instead, as `python -m MODULE`
  ARGS         passed to the script unchanged (its own --help included)
  -h, --help   show this message and exit

The script runs as __main__ with sys.argv = [SCRIPT, ARGS...], its absolute __file__, and its
directory as sys.path[0] (not under python -I or -P, as with python); the exit status is the
script's own. The Python processes it starts (torchrun, accelerate launch or
multiprocessing workers, a framework CLI's subprocesses) import sai_hf at start-up too, at next to
no cost for those that never import transformers: PYTHONPATH begins with sai_hf's child_site
directory while it runs (SAI_HF_REGISTER_IN_CHILDREN=0 turns that off). Several processes
(WORLD_SIZE > 1) on a machine without a GPU train as one job: sai_hf sets the TrainingArguments'
use_cpu there, which accelerate launch does not pass on. A process group the script leaves alive
is ended after it ends normally.

example:
  {PROG} train.py --optim sgd_sai --learning_rate 1e-3 --optim_args "momentum=0.9"
"""


class UsageError(Exception):
    """A command-line error (this launcher's or ``python -m sai_hf.find_lr``'s): one ``error:`` line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv[0]`` (a script path, or ``-m MODULE``) as ``__main__`` with ``argv[1:]`` as its arguments.

    Returns 0 (the script ended, or ``--help``) or 2 (a launcher error); the script's ``SystemExit`` and exceptions
    propagate. Its non-daemon threads are waited for, then ``sys.argv``, ``sys.path`` and the environment are restored;
    after a normal end a default process group the script left alive is ended (:func:`end_process_group`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    try:
        target = script_kind(argv)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    saved_argv, saved_path = sys.argv, list(sys.path)
    running = set(threading.enumerate())
    ended_normally = False
    group_was_alive = _process_group_alive()  # not the script's: left alone
    with _registering_children():
        try:
            _run_script(argv, target)
            ended_normally = True
            return 0
        except SystemExit as exit_:
            ended_normally = exit_.code is None or exit_.code == 0
            raise
        finally:
            try:
                _join_started_threads(running)
            finally:  # restored even if the wait is interrupted (Ctrl-C)
                sys.argv = saved_argv
                sys.path[:] = saved_path
            if ended_normally and not group_was_alive:
                end_process_group()


def _run_script(argv: list[str], target: str) -> None:
    """Run ``argv`` (of kind ``target``: :func:`script_kind`) as ``python ARGV...`` would.

    ``sys.path[0]``, the current directory under ``python -m``, becomes the script's real directory, or the directory /
    zip file itself. Under ``-I``/``-P`` python adds no script directory for a file (the entry stays), but still puts a
    directory / zip file first."""
    safe_path = bool(getattr(sys.flags, "safe_path", False) or sys.flags.isolated)  # -P (3.11+), -I (implies -P)
    if target == "module":
        sys.argv = argv[1:]  # run_module replaces argv[0] by the module's file
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    sys.argv = list(argv)  # as given: python keeps it relative
    if target == "file":
        if not safe_path:
            sys.path[:1] = [os.path.dirname(os.path.realpath(script))]
        code, module_globals = _file_code(script)
        _exec_as_main(code, **module_globals)
        return
    entry = os.path.abspath(script)  # python's sys.path[0] and __file__ are absolute there
    sys.path[: 0 if safe_path else 1] = [entry]  # put first; in place of the current directory unless -I/-P
    spec = pkgutil.get_importer(entry).find_spec("__main__")  # checked by script_kind
    _exec_as_main(spec.loader.get_code("__main__"), __file__=spec.origin, __cached__=spec.cached, __loader__=spec.loader,
                  __package__=spec.parent, __spec__=spec)  # fmt: skip


def _file_code(script: str) -> tuple[Any, dict[str, Any]]:
    """The code of the file ``script`` and its globals: ``__file__`` and the code's file name absolute (a symlink's own
    path), as ``python SCRIPT.py`` makes them (``runpy.run_path`` would also make ``sys.argv[0]`` absolute); a ``.pyc``
    file runs as python runs it."""
    path = os.path.abspath(script)
    with io.open_code(path) as stream:
        code = pkgutil.read_code(stream)  # None unless the file starts with this python's .pyc magic number
    if code is not None:
        loader: Any = importlib.machinery.SourcelessFileLoader("__main__", path)
    else:
        loader = importlib.machinery.SourceFileLoader("__main__", path)
        with io.open_code(path) as stream:
            code = compile(stream.read(), path, "exec", dont_inherit=True)  # not this module's __future__ imports
    return code, {"__file__": path, "__cached__": None, "__loader__": loader, "__package__": None, "__spec__": None}


def _exec_as_main(code: Any, **module_globals: Any) -> None:
    """Execute ``code`` as a fresh ``__main__`` module (in ``sys.modules`` while it runs, as :mod:`runpy` does)."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__builtins__=builtins, **module_globals)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is None:
            sys.modules.pop("__main__", None)
        else:
            sys.modules["__main__"] = saved


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set over ``environ`` so that the processes started with it import sai_hf at start-up:
    :data:`CHILD_SITE` first on ``PYTHONPATH`` and :data:`CHILDREN_GATE` ``=1``; nothing where the gate is ``0``."""
    if environ.get(CHILDREN_GATE) == "0":
        return {}
    python_path = environ.get("PYTHONPATH", "")
    if python_path != CHILD_SITE and not python_path.startswith(CHILD_SITE + os.pathsep):
        python_path = CHILD_SITE + os.pathsep + python_path if python_path else CHILD_SITE  # no empty entry: the cwd
    return {"PYTHONPATH": python_path, CHILDREN_GATE: "1"}


@contextlib.contextmanager
def _registering_children() -> Iterator[None]:
    """:func:`child_environment` in ``os.environ`` while the script runs; the variables restored afterwards."""
    updates = child_environment(os.environ)
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def end_process_group() -> None:
    """Wait for every rank, then destroy the default process group, if one is alive.

    A rank that exits with its gloo group alive can die with SIGABRT during interpreter finalization (gloo's threads
    take the GIL while it is torn down, pytorch/pytorch#179291), and torchrun reports the run as failed. The barrier
    makes every rank leave its last collective before any tears its group down."""
    if _process_group_alive():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _process_group_alive() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and torch stays unimported)
    return dist is not None and dist.is_available() and dist.is_initialized()


def _join_started_threads(running: set[threading.Thread]) -> None:
    """Wait for every non-daemon thread not in ``running`` (started by the script, or by its threads)."""
    while True:
        started = [
            t for t in threading.enumerate()
            if t not in running and not t.daemon and t.is_alive() and t is not threading.current_thread()
        ]  # fmt: skip
        if not started:
            return
        for thread in started:
            thread.join()


def script_kind(argv: list[str], prog: str = PROG) -> str:
    """What ``argv`` (``SCRIPT ARGS...`` or ``-m MODULE ARGS...``) asks to run: ``"module"``, ``"file"`` or
    ``"path_entry"`` (a directory or zip file); ``UsageError`` if it cannot be run, whose hints name ``prog``."""
    if not argv:
        raise UsageError("no script given: expected SCRIPT [ARGS...] or -m MODULE [ARGS...] (see --help)")
    first = argv[0]
    if first == "-m":
        if len(argv) < 2 or not argv[1].strip():
            raise UsageError("-m needs a module name, e.g. -m some_package.train")
        _check_module(argv[1], prog)
        return "module"
    if first.startswith("-") and first != "-":
        raise UsageError(f"unknown option {first!r}: give a script, -m MODULE, or --help")
    if os.path.isdir(first) or os.path.isfile(first) and pkgutil.get_importer(first) is not None:
        importer = pkgutil.get_importer(first)
        if importer is None or importer.find_spec("__main__") is None:
            raise UsageError(f"can't find '__main__' module in {first!r}: a directory or zip file needs a __main__.py")
        return "path_entry"
    if not os.path.exists(first):
        raise UsageError(f"can't open file {first!r}: no such file")
    if not os.path.isfile(first):
        raise UsageError(f"can't open file {first!r}: not a regular file")
    if not os.access(first, os.R_OK):
        raise UsageError(f"can't open file {first!r}: permission denied")
    return "file"


def _check_module(name: str, prog: str) -> None:
    """``UsageError`` unless ``name`` is a module ``runpy.run_module`` can run, in python's wording. Finding a
    submodule imports its parent packages: an error there that is not an import problem propagates, as with ``-m``."""
    if name.startswith("."):
        raise UsageError(f"relative module names are not supported: {name!r}")
    spec = _find_spec(name)
    if spec is None:
        hint = f" (a file? use {prog} {name.replace('.', os.sep)}.py)" if name.endswith(".py") else ""
        raise UsageError(f"no module named {name!r}{hint}")
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        if _find_spec(f"{name}.__main__") is None:
            raise UsageError(f"no module named {name + '.__main__'!r}; {name!r} is a package and cannot be directly executed")


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise UsageError(f"error while finding module specification for {name!r} ({type(err).__name__}: {err})") from None


if __name__ == "__main__":
    sys.exit(main())
