"""The ``sitecustomize`` of every Python process started under ``python -m sai_hf.run``.

The launcher (:mod:`sai_hf.run`) puts this file's directory first on ``PYTHONPATH`` and sets
``SAI_HF_REGISTER_IN_CHILDREN=1`` for the processes its script starts, and theirs in turn (``torchrun``,
``accelerate launch`` and ``multiprocessing`` spawn workers, a framework CLI's subprocesses, a script
re-executing itself), so that each registers ``--optim sgd_sai`` as the launcher's own process does.
Python imports ``sitecustomize`` once, at start-up (``site``); in each such process this module

1. runs the ``sitecustomize`` it hides (the next one on ``sys.path``: a system or virtualenv one), as
   ``site`` would, and leaves it in ``sys.modules`` as ``sitecustomize``;
2. takes its own directory off ``sys.path`` (``PYTHONPATH`` keeps it, for the next generation);
3. if ``SAI_HF_REGISTER_IN_CHILDREN`` is ``1``, imports ``sai_hf``. That costs next to nothing (it
   imports neither torch nor transformers): it registers the names when the process loads
   transformers' ``training_args`` and ``trainer`` modules, so a process that never does (a data
   loader or compile worker, a tool) pays nothing more. Where the import fails (another Python or
   virtualenv without sai-hf or with other versions) it writes one line to stderr, unless that Python
   has neither sai_hf nor transformers (it cannot be training with a Trainer), and the process goes
   on; so it does where the registration fails later, when transformers loads.

Standard library only; Python 3 syntax old enough for any interpreter a framework might start.
"""

import importlib.machinery
import importlib.util
import os
import sys

GATE = "SAI_HF_REGISTER_IN_CHILDREN"
HERE = os.path.dirname(os.path.realpath(__file__))


def _is_here(entry):
    """Whether the ``sys.path`` entry ``entry`` is this directory."""
    return os.path.realpath(entry or os.curdir) == HERE


def _run_hidden_sitecustomize(start):
    """Run the first ``sitecustomize`` on ``sys.path[start:]`` outside this directory, as ``site`` would.

    ``start`` is past the entry this copy was found in, so a chain through several copies of this file
    (nested launchers of different installs) only moves forward and ends."""
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


def _registration_failed(err):
    """Where registering fails as transformers loads (read by ``sai_hf``): one line, and the process goes on."""
    _not_registered("registering with transformers failed", err)


def _register():
    """Import sai_hf (which registers ``--optim sgd_sai`` when transformers loads); one line on stderr where that
    fails, or where the registration does."""
    try:
        import sai_hf
    except Exception as err:
        missing = isinstance(err, ImportError) and err.name == "sai_hf"
        if missing and importlib.util.find_spec("transformers") is None:
            return
        _not_registered("cannot import sai_hf", err)
        return
    sai_hf._on_registration_error = _registration_failed


def _main():
    start = globals().get("_SAI_HF_SEARCH_FROM")
    if start is None:  # imported by site: found in the first entry that is this directory
        start = next((i + 1 for i, entry in enumerate(sys.path) if _is_here(entry)), len(sys.path))
    _run_hidden_sitecustomize(start)
    sys.path[:] = [entry for entry in sys.path if not _is_here(entry)]
    if os.environ.get(GATE) == "1":
        _register()


_main()
