"""The ``sitecustomize`` of every Python process started under ``python -m sai_hf.run`` (whose
``child_environment`` puts this directory first on ``PYTHONPATH``). At start-up it

1. runs the ``sitecustomize`` it hides (the next one on ``sys.path``), as ``site`` would;
2. takes its own directory off ``sys.path`` (``PYTHONPATH`` keeps it, for the next generation);
3. if ``SAI_HF_REGISTER_IN_CHILDREN`` is ``1``, imports ``sai_hf``, which costs next to nothing until
   transformers loads. Where that import (or the registration with transformers, later) fails it writes one
   line to stderr (nothing for a Python with neither sai_hf nor transformers) and the process goes on; a failure
   to register the DeepSpeed adapter fails that ``import deepspeed`` instead (``sai_hf._on_registration_error``).

Standard library only; Python 3 syntax old enough for any interpreter a framework might start.
"""

import importlib.machinery
import importlib.util
import os
import sys

GATE = "SAI_HF_REGISTER_IN_CHILDREN"
HERE = os.path.dirname(os.path.realpath(__file__))


def _is_here(entry):
    return os.path.realpath(entry or os.curdir) == HERE


def _run_hidden_sitecustomize(start):
    """Run the first ``sitecustomize`` on ``sys.path[start:]`` outside this directory, as ``site`` would. ``start``
    is past this copy's entry, so a chain through copies of this file (nested installs) moves forward and ends."""
    for index in range(start, len(sys.path)):
        entry = sys.path[index]
        if _is_here(entry):
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__dict__["_SAI_HF_SEARCH_FROM"] = index + 1  # read by a copy of this file, ignored otherwise
        sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # what site.execsitecustomize does with it
            sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n%s: %s\n" % (type(err).__name__, err))
        return


def _not_registered(reason, err):
    sys.stderr.write(
        "sai_hf.run: --optim sgd_sai is not registered in this process (%s): %s (%s: %s)\n"
        % (sys.executable, reason, type(err).__name__, err)
    )


def _register():
    try:
        import sai_hf
    except Exception as err:
        missing = isinstance(err, ImportError) and err.name == "sai_hf"
        if not (missing and importlib.util.find_spec("transformers") is None):
            _not_registered("cannot import sai_hf", err)
        return
    sai_hf._on_registration_error = lambda err: _not_registered("registering with transformers failed", err)


def _main():
    start = globals().get("_SAI_HF_SEARCH_FROM")
    if start is None:  # imported by site: found in the first entry that is this directory
        start = next((i + 1 for i, entry in enumerate(sys.path) if _is_here(entry)), len(sys.path))
    _run_hidden_sitecustomize(start)
    sys.path[:] = [entry for entry in sys.path if not _is_here(entry)]
    if os.environ.get(GATE) == "1":
        _register()


_main()
