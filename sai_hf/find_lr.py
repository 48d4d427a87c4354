"""``python -m sai_hf.find_lr [OPTIONS] (SCRIPT | -m MODULE) [ARGS...]`` (:data:`HELP`): the learning-rate range test
(:func:`sai_hf.range_test.lr_find`, also importable from here) of an unmodified Trainer script, run as
``python -m sai_hf.run`` runs it. The script's ``Trainer.train()`` call runs the test instead, and its end is raised out
of that call (so ``finally:`` blocks still run, while the tested Trainer's saving methods do nothing).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from . import run as launcher
from .lr_rule import METHODS
from .range_test import DEFAULTS, LRFindError, LRFindResult, lr_find
from .sharding import world

__all__ = ["LRFindResult", "LRFindError", "lr_find", "main", "DEFAULTS"]

PROG = "python -m sai_hf.find_lr"
USAGE = f"usage: {PROG} [OPTIONS] (SCRIPT | -m MODULE) [ARGS...]"
HELP = f"""{USAGE}

Learning-rate range test: run a transformers Trainer script (unmodified, as `python -m sai_hf.run`
does) for --steps optimizer steps with the learning rate rising exponentially from --start-lr to
--end-lr, stop early once the loss diverges, and suggest a learning rate. The script's code after
its train() call does not run, and the tested Trainer saves nothing (no checkpoints, model,
metrics); a `finally:` block around train() still runs (Python unwinds through it). lr_find.json
and lr_find.png go to --output (default: the script's output_dir). The last line printed is
`suggested learning_rate: <value>`.

options (before SCRIPT):
  --start-lr LR   first learning rate of the ramp (default {DEFAULTS.start_lr:g})
  --end-lr LR     last learning rate of the ramp (default {DEFAULTS.end_lr:g})
  --steps N       optimizer steps from --start-lr to --end-lr (default {DEFAULTS.steps})
  --smooth BETA   smoothing of the loss: EMA factor in [0, 1) with bias correction (default {DEFAULTS.smooth:g})
  --diverge X     stop once the smoothed loss exceeds X times its best (default {DEFAULTS.diverge:g})
  --method RULE   suggestion rule, one of: {', '.join(METHODS)}
                  (default {DEFAULTS.method}: where the smoothed loss falls fastest, at most half
                  the rate of its lowest point)
  --output DIR    where lr_find.json and lr_find.png go (default: the Trainer's output_dir)
  --skip-trains K let the script's first K Trainer.train() calls run normally (e.g. a recipe that
                  pretrains a base model first); the test replaces call K+1 (default 0).
                  The calls it lets through train and save as usual
  -h, --help      show this message and exit

The script keeps its own arguments (--optim, --optim_args, batch size, gradient accumulation,
LoRA...). Its lr schedule, warm-up, evaluation, checkpointing and resume flags are ignored for the
test; a DeepSpeed config with its own 'scheduler' section is refused (remove it for the test).
Under torchrun / accelerate launch rank 0 decides and every rank follows.

example:
  {PROG} scripts/pretrain_gpt2.py configs/gpt2-local.yaml
  {PROG} --steps 60 --end-lr 1 train.py --optim sgd_sai --output_dir out
"""


class _Finished(BaseException):
    """Raised out of the script's ``train()`` once the test is done (no ``Exception``: the script cannot catch it)."""

    def __init__(self, result: LRFindResult | None = None, error: str | None = None) -> None:
        super().__init__(error or "range test finished")
        self.result = result
        self.error = error


_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--start-lr": ("start_lr", float),
    "--end-lr": ("end_lr", float),
    "--steps": ("steps", int),
    "--smooth": ("smooth", float),
    "--diverge": ("diverge", float),
    "--method": ("method", str),
    "--output": ("output_dir", str),
    "--skip-trains": ("skip_trains", int),
}


def _parse(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Our options (before the script) and the rest (``SCRIPT ARGS...`` or ``-m MODULE ARGS...``)."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        if argv[i] == "--":  # end of our options: what follows is the script
            i += 1
            break
        name, eq, value = argv[i].partition("=")
        if name not in _OPTIONS:
            raise launcher.UsageError(f"unknown option {name!r} (options go before the script; see --help)")
        if not eq:
            if i + 1 >= len(argv):
                raise launcher.UsageError(f"{name} needs a value")
            i += 1
            value = argv[i]
        key, convert = _OPTIONS[name]
        try:
            options[key] = convert(value)
        except ValueError:
            raise launcher.UsageError(f"{name}: {value!r} is not a valid {convert.__name__}") from None
        i += 1
    return options, argv[i:]


@contextlib.contextmanager
def _hooks(settings: dict[str, Any], skip_trains: int) -> Iterator[dict[str, Any]]:
    """``Trainer.train`` runs the range test (after ``skip_trains`` normal calls) and then ends the
    script; the tested Trainer's saving methods do nothing."""
    from transformers import Trainer

    original_train = Trainer.__dict__["train"]
    saving = ("save_model", "_save_checkpoint", "save_state", "save_metrics", "push_to_hub", "create_model_card")
    originals = {name: Trainer.__dict__[name] for name in saving if name in Trainer.__dict__}
    seen = {"trains": 0, "tested": None}

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        if seen["tested"] is not None:  # a subclass's train() calling super().train() twice, or a later call
            raise _Finished(error="the script called Trainer.train() again after the range test")
        seen["trains"] += 1
        if seen["trains"] <= skip_trains:
            return original_train(self, *args, **kwargs)
        seen["tested"] = self
        ignored = [k for k, v in kwargs.items() if v not in (None, False)] + (["resume_from_checkpoint"] if args and args[0] else [])
        if ignored and self.is_world_process_zero():
            print(f"lr_find: ignoring train({', '.join(ignored)}=...): the test starts from the model the script built", flush=True)
        try:
            result = lr_find(self, train=original_train, restore=False, **settings)
        except LRFindError as err:
            raise _Finished(error=str(err)) from None
        raise _Finished(result)

    def no_save(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if seen["tested"] is self:
                return None
            return originals[name](self, *args, **kwargs)

        return method

    try:
        Trainer.train = train
        for name in originals:
            setattr(Trainer, name, no_save(name))
        yield seen
    finally:
        Trainer.train = original_train
        for name, method in originals.items():
            setattr(Trainer, name, method)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see :data:`HELP`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    try:
        options, target = _parse(argv)
        skip_trains = options.pop("skip_trains", 0)
        if skip_trains < 0:
            raise launcher.UsageError(f"--skip-trains must be 0 or more, got {skip_trains}")
        output_dir = options.pop("output_dir", None)
        if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise launcher.UsageError(f"--output {output_dir!r} is a file, not a directory")
        settings = replace(DEFAULTS, **options)
        settings.check(spelled={key: option for option, (key, _) in _OPTIONS.items()})
        launcher.script_kind(target, prog=PROG)
    except (launcher.UsageError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    name = target[1] if target[0] == "-m" else target[0]
    finished: _Finished | None = None
    with _hooks({**asdict(settings), "output_dir": output_dir}, skip_trains) as seen:
        try:
            launcher.main(target)
        except _Finished as done:
            finished = done
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted" + (": the range test wrote nothing" if seen["tested"] is not None else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
            return 130
        except SystemExit as exit_:
            if seen["tested"] is None:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                print(f"{PROG}: error: {name} exited (status {code}) before calling Trainer.train(): "
                      "nothing to test", file=sys.stderr)  # fmt: skip
                return code or 2
            raise
    if finished is None:
        print(
            f"{PROG}: error: {name} ended without calling transformers.Trainer.train() "
            f"({seen['trains']} train call(s) ran normally with --skip-trains {skip_trains}): "
            "the range test needs a script that trains with a Trainer",
            file=sys.stderr,
        )
        return 2
    try:
        if world()[0] == 0:
            if finished.error is not None:
                print(f"{PROG}: error: {finished.error}", file=sys.stderr, flush=True)
            else:
                _print_result(finished.result)
        return 1 if finished.error is not None else 0
    finally:
        launcher.end_process_group()  # the one the Trainer created, if any


def _print_result(result: LRFindResult) -> None:
    others = ", ".join(f"{k} {v:.3g}" for k, v in result.candidates.items() if k != result.method)
    print(f"lr_find: {len(result.lrs)} steps in {result.seconds:.1f} s, {result.stop_reason}", flush=True)
    for warning in result.warnings:
        print(f"lr_find: warning: {warning}", flush=True)
    if result.json_path:
        print(f"lr_find: curve in {result.json_path}" + (f" and {result.png_path}" if result.png_path else ""), flush=True)
    print(f"lr_find: rule {result.method}; other rules: {others}", flush=True)
    print(f"suggested learning_rate: {result.suggestion:.3g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
