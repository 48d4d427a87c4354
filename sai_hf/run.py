"""Run an unmodified training script with ``--optim sgd_sai`` available.

::

    python -m sai_hf.run SCRIPT.py [ARGS...]
    accelerate launch [LAUNCH ARGS...] -m sai_hf.run SCRIPT.py [ARGS...]
    torchrun [LAUNCH ARGS...] -m sai_hf.run SCRIPT.py [ARGS...]
    python -m sai_hf.run -m PACKAGE.MODULE [ARGS...]

``--optim`` is validated against ``transformers.training_args.OptimizerNames`` when the script's
``HfArgumentParser`` is built, so the name must be registered before the script runs. Importing
``sai_hf`` registers it (and adds :class:`sai_hf.GSNRCallback` to every Trainer); this module then
runs the script with :func:`runpy.run_path` exactly as ``python SCRIPT.py ARGS...`` would:

* ``__name__ == "__main__"`` and ``__file__`` is the script's path;
* ``sys.argv == [SCRIPT.py, *ARGS]`` (everything after the script is passed through untouched,
  ``--help`` included);
* the script's directory is ``sys.path[0]`` (it replaces the working directory that ``-m`` put
  there);
* the exit status is the script's: ``sys.exit(code)`` / ``SystemExit`` propagate unchanged, an
  uncaught exception prints its traceback and exits with 1, a normal end exits with 0.

With ``-m PACKAGE.MODULE`` the module is run as ``python -m PACKAGE.MODULE`` would
(:func:`runpy.run_module` with ``alter_sys=True``).
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = "usage: python -m sai_hf.run SCRIPT.py [ARGS...]\n       python -m sai_hf.run -m MODULE [ARGS...]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv[0]`` (a script path, or ``-m MODULE``) as ``__main__`` with ``argv[1:]`` as its arguments.

    Returns 0 when the script ends normally and 2 for a usage error (no script, a script that
    does not exist: Python's own status for ``python missing.py``). ``SystemExit`` and exceptions
    raised by the script propagate unchanged. ``sys.argv`` and ``sys.path`` are restored afterwards.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    import sai_hf

    sai_hf.register()  # importing sai_hf already did; idempotent, and explicit here

    saved_argv, saved_path = sys.argv, list(sys.path)
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                print(f"{USAGE}\nerror: -m needs a module name", file=sys.stderr)
                return 2
            sys.argv = [argv[1], *argv[2:]]  # run_module replaces argv[0] by the module's file
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            return 0
        script = argv[0]
        if not os.path.isfile(script):
            print(f"python -m sai_hf.run: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        sys.argv = [script, *argv[1:]]
        script_dir = os.path.dirname(os.path.realpath(script))
        if sys.path:
            sys.path[0] = script_dir
        else:  # pragma: no cover - sys.path is never empty in practice
            sys.path.insert(0, script_dir)
        runpy.run_path(script, run_name="__main__")
        return 0
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


if __name__ == "__main__":
    sys.exit(main())
