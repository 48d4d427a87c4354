"""Learning-rate range test (Smith 2015; fastai's ``lr_find``) for any ``transformers.Trainer``.

Command line: run an unmodified Trainer script (as ``python -m sai_hf.run`` does) for a short range
test instead of its training::

    python -m sai_hf.find_lr [OPTIONS] SCRIPT.py [SCRIPT ARGS...]
    python -m sai_hf.find_lr [OPTIONS] -m PACKAGE.MODULE [ARGS...]
    torchrun --nproc_per_node 2 -m sai_hf.find_lr [OPTIONS] SCRIPT.py [ARGS...]
    accelerate launch [LAUNCH ARGS] -m sai_hf.find_lr [OPTIONS] SCRIPT.py [ARGS...]

When the script calls ``Trainer.train()``, the Trainer instead trains for ``--steps`` optimizer
steps with the learning rate rising exponentially from ``--start-lr`` to ``--end-lr`` (replacing
the script's schedule and warm-up; everything else is the script's own: model, data, batch size,
gradient accumulation, clipping, ``--optim`` and ``--optim_args``, LoRA, DDP/FSDP). The training
loss of every step (averaged over ranks and accumulated micro-batches, as the Trainer logs it) is
smoothed (:class:`sai_hf.lr_rule.Smoother`); the test stops once the loss is not finite or the
smoothed loss exceeds ``--diverge`` times its best. Then the script is abandoned: the range test's
end is raised out of its ``train()`` call, so none of its code after that call runs and it saves no
model, metrics or plots. Python still runs the ``finally:`` blocks and ``with`` exits the end passes
through: there the tested Trainer's saving methods (``save_model``, ``save_state``,
``save_metrics``, ``push_to_hub``, ``create_model_card``, checkpoints) do nothing, but anything else
such a block writes is written. During the test no checkpoint is saved, no evaluation runs, the
``report_to`` integrations are detached and the Trainer's ``output_dir`` is a temporary folder
(removed), so ``gsnr.json`` and anything else the Trainer would write stay out of the script's
``output_dir`` (and the path of that folder is not logged). Into ``--output DIR`` (default: the
script's ``output_dir``) it writes ``lr_find.json`` and, with matplotlib, ``lr_find.png``; its last
line is ``suggested learning_rate: <value>``.

Before every step the rate the optimizer is about to apply (its first group's) is checked against
the ramp's: a scheduler that replaces the ramp (a DeepSpeed config's own ``scheduler`` section) or
anything else that sets the rate ends the test with an error at once, instead of a curve drawn
against rates that were never applied.

SGD-SaI: the scales are computed from the first step's gradient, as in training (they do not depend
on the learning rate; the ramp only changes the rate that multiplies them).

Python::

    from sai_hf.find_lr import lr_find
    result = lr_find(trainer)            # a Trainer you built; its model is restored afterwards
    trainer.args.learning_rate = result.suggestion
    trainer.train()

Several processes: every rank runs the same steps; rank 0 decides when to stop and what to
suggest, and broadcasts both, so every rank follows the same decision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .lr_rule import DEFAULT_METHOD, METHODS, NoDecreaseError, Smoother, diverged, ramp_lr, suggest
from .plots import figure, save_figure
from .sharding import world

__all__ = ["LRFindResult", "LRFindError", "lr_find", "main", "DEFAULTS"]

PROG = "python -m sai_hf.find_lr"
JSON_NAME = "lr_find.json"
PNG_NAME = "lr_find.png"


@dataclass(frozen=True)
class _Defaults:
    start_lr: float = 1e-6
    end_lr: float = 10.0
    steps: int = 100
    smooth: float = 0.9
    diverge: float = 4.0
    method: str = DEFAULT_METHOD


DEFAULTS = _Defaults()

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


class LRFindError(Exception):
    """The range test could not suggest a learning rate (the message says why and what to change)."""


_NOT_APPLIED_MESSAGE = (
    "the ramp was not applied: {why}, so the range test would record rates the optimizer never used. "
    "A DeepSpeed config with its own 'scheduler' section? Remove it for the range test"
)


class _RampNotApplied(Exception):
    """Raised out of the Trainer's step once the optimizer is found not to run at the ramp's rate."""


class _Finished(BaseException):
    """Raised out of the script's ``train()`` call once the range test is done (a ``BaseException``,
    so that a script's ``except Exception`` does not swallow it)."""

    def __init__(self, result: LRFindResult | None = None, error: str | None = None) -> None:
        super().__init__(error or "range test finished")
        self.result = result
        self.error = error


@dataclass
class LRFindResult:
    """What a range test found. ``lrs[i]``, ``losses[i]`` and ``smoothed[i]`` belong to step ``i``
    (the loss of the batch that step trained on, before its update); ``None`` marks a loss that was
    not finite."""

    lrs: list[float]
    losses: list[float | None]
    smoothed: list[float | None]
    suggestion: float
    method: str
    candidates: dict[str, float]
    stop_reason: str
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    json_path: str | None = None
    png_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload.pop("json_path")
        payload.pop("png_path")
        return payload


# --------------------------------------------------------------------------- the test on a Trainer
def _check_settings(start_lr: float, end_lr: float, steps: int, smooth: float, diverge: float, method: str) -> None:
    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    start, end = number("start_lr", start_lr), number("end_lr", end_lr)
    if start <= 0:
        raise ValueError(f"start_lr must be positive, got {start_lr!r}")
    if not start < end:
        raise ValueError(f"start_lr ({start_lr:g}) must be below end_lr ({end_lr:g}): the ramp rises")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps must be an integer of at least 5, got {steps!r}")
    if not 0.0 <= number("smooth", smooth) < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
    if not number("diverge", diverge) > 1.0:
        raise ValueError(f"diverge must be above 1, got {diverge!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself in one process)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _RampScheduler:
    """Builds the LambdaLR that multiplies each group's learning rate so that a group at
    ``args.learning_rate`` gets ``ramp_lr(step)`` (other groups keep their ratio to it)."""

    def __init__(self, base_lr: float, start: float, end: float, steps: int) -> None:
        self.base_lr, self.start, self.end, self.steps = base_lr, start, end, steps

        self.ratio = 1.0  # group 0's rate over the ramp's (set by build)
        self.built = False  # whether the Trainer asked for the ramp (not e.g. DeepSpeed's own scheduler)
        self.scheduler: Any = None  # the LambdaLR build made
        self.foreign: Any = None  # a scheduler the Trainer already had when it asked for one (DeepSpeed's own)

    def lr(self, step: int) -> float:
        return ramp_lr(step, self.start, self.end, self.steps)

    def lr_used(self, logged: Any, step: int) -> float:
        """The ramp's rate of a logged step: group 0's rate in that step's update (else the Trainer's
        logged rate) over group 0's ratio; ``lr(step)`` if there is none."""
        if isinstance(logged, (int, float)) and logged > 0 and self.ratio > 0:
            return float(logged) / self.ratio
        return self.lr(step)

    def build(self, optimizer: Any) -> Any:
        import torch

        self.built = True

        for group in optimizer.param_groups:
            group.pop("initial_lr", None)  # a scheduler of an earlier run set it; LambdaLR keeps it otherwise
            if self.base_lr <= 0:  # every group ramps from the same rate when the script's is 0
                group["lr"] = 1.0
        base = self.base_lr if self.base_lr > 0 else 1.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr(step) / base)
        self.ratio = optimizer.param_groups[0]["initial_lr"] / base
        self.scheduler = scheduler
        return scheduler

    def owns(self, scheduler: Any) -> bool:
        """Whether ``scheduler`` is the ramp (possibly inside accelerate's wrapper)."""
        if self.scheduler is None:
            return False
        return scheduler is self.scheduler or getattr(scheduler, "scheduler", None) is self.scheduler

    def not_applied(self, optimizer: Any, engine: Any) -> str | None:
        """Why the next optimizer step will not run at the ramp's rate, or ``None``: the Trainer kept a
        scheduler of its own (DeepSpeed's, from its config's ``scheduler`` section), DeepSpeed's engine steps
        another scheduler, or the learning rate of the optimizer's first group (what its step applies)
        is not the one the ramp set last."""
        if self.foreign is not None:
            return f"the Trainer uses {_scheduler_name(self.foreign)} instead of the ramp"
        if not self.built:
            return "the Trainer never built its learning-rate scheduler"
        engine_scheduler = getattr(engine, "lr_scheduler", None)
        if engine_scheduler is not None and not self.owns(engine_scheduler):
            return f"DeepSpeed's engine steps {_scheduler_name(engine_scheduler)}"
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            return None
        applied, expected = float(groups[0]["lr"]), float(self.scheduler.get_last_lr()[0])
        if not math.isclose(applied, expected, rel_tol=1e-6, abs_tol=0.0):
            return f"the optimizer's first parameter group runs at lr {applied:.4g} where the ramp set {expected:.4g}"
        return None


def _asks_for_a_scheduler(scheduler: Any) -> bool:
    """accelerate's placeholder that has DeepSpeed call the Trainer's ``create_scheduler`` (a DeepSpeed config
    with an ``optimizer`` section and no ``scheduler`` one), not a scheduler of its own."""
    return type(scheduler).__name__ == "DummyScheduler" and getattr(scheduler, "lr_scheduler_callable", None) is not None


def _scheduler_name(scheduler: Any) -> str:
    inner = getattr(scheduler, "scheduler", None)
    return f"its own scheduler ({type(inner if inner is not None else scheduler).__name__})"


def _range_test_callback(ramp: _RampScheduler, smooth: float, diverge: float, verbose: bool) -> Any:
    from transformers import TrainerCallback

    class RangeTestCallback(TrainerCallback):
        """Logs every step, blocks evaluation and saving, records the loss and stops on divergence."""

        def __init__(self) -> None:
            self.lrs: list[float] = []
            self.losses: list[float | None] = []
            self.smoothed: list[float | None] = []
            self.smoother = Smoother(smooth)
            self.best = math.inf
            self.stop_reason = f"reached --steps ({ramp.steps})"
            self.applied: float | None = None  # group 0's rate in this step's update

        def _quiet(self, control: Any) -> Any:
            control.should_evaluate = False
            control.should_save = False
            return control

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            # The rate this step's update will use: the ramp's, or the test is void (DeepSpeed steps its
            # own scheduler, configured in its config: the curve's x axis would be rates never applied).
            why = ramp.not_applied(optimizer, kwargs.get("model"))
            if why is not None:
                raise _RampNotApplied(_NOT_APPLIED_MESSAGE.format(why=why))
            groups = getattr(optimizer, "param_groups", None)
            # recorded for this step (the Trainer logs the scheduler's rate, which DeepSpeed's engine has
            # already moved on to the next step's when it steps the ramp itself)
            self.applied = float(groups[0]["lr"]) if groups else None
            return control

        def on_step_end(self, args, state, control, **kwargs):
            control.should_log = True
            return self._quiet(control)

        def on_epoch_end(self, args, state, control, **kwargs):
            return self._quiet(control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return control
            step = len(self.lrs)
            loss = float(logs["loss"])
            lr = ramp.lr_used(self.applied if self.applied is not None else logs.get("learning_rate"), step)
            smoothed = self.smoother.add(loss) if math.isfinite(loss) else math.nan
            self.lrs.append(lr)
            self.losses.append(loss if math.isfinite(loss) else None)
            self.smoothed.append(smoothed if math.isfinite(smoothed) else None)
            reason = diverged(loss, smoothed, self.best, diverge)
            if math.isfinite(smoothed):
                self.best = min(self.best, smoothed)
            if reason is None and step + 1 >= ramp.steps:
                reason = self.stop_reason
            elif reason is not None:
                reason = f"diverged at lr {lr:.3g}: {reason}"
            reason = _broadcast(reason)  # rank 0 decides; every rank stops at the same step
            if verbose and state.is_world_process_zero and (step % 10 == 0 or reason):
                shown = "nan" if not math.isfinite(smoothed) else f"{smoothed:.4f}"
                print(f"lr_find step {step + 1}/{ramp.steps}: lr {lr:.3g} loss {loss:.4f} smoothed {shown}", flush=True)
            if reason is not None:
                self.stop_reason = reason
                control.should_training_stop = True
            return control

    return RangeTestCallback()


def _detached_callbacks(trainer: Any) -> list[Any]:
    """The callbacks to take off the Trainer during the test: ``report_to`` integrations (they
    would write logs or start remote runs) and the per-log printers (the test prints its own)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    out = []
    for cb in trainer.callback_handler.callbacks:
        module = type(cb).__module__ or ""
        if module.startswith("transformers.integrations") or isinstance(cb, (PrinterCallback, ProgressCallback)):
            out.append(cb)
    return out


class _HideFolder(logging.Filter):
    """Drops log records that name ``folder`` (sai-hf's "g-SNR report ... written to <folder>/gsnr.json"
    during the test: the folder is removed afterwards, so the path would point nowhere)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = os.path.abspath(folder)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.folder not in record.getMessage()


#: The loggers whose messages may name the Trainer's output_dir during the test.
_QUIETED_LOGGERS = ("sai_hf.callback",)


@contextlib.contextmanager
def _test_setup(trainer: Any, ramp: _RampScheduler, callback: Any, steps: int) -> Iterator[str]:
    """The Trainer as the test needs it (restored on exit): ``steps`` steps, the ramp as scheduler,
    no evaluation at start, non-finite losses kept, the test callback on and the integrations off,
    a temporary ``output_dir``. Yields the real ``output_dir``."""
    args = trainer.args
    changed = {
        "max_steps": steps,
        "eval_on_start": False,
        "logging_nan_inf_filter": False,
        "load_best_model_at_end": False,
        "push_to_hub": False,
    }
    saved_args = {name: getattr(args, name) for name in changed}
    output_dir = args.output_dir
    tmp = tempfile.mkdtemp(prefix="sai_hf_lr_find_")
    hide = _HideFolder(tmp)
    saved_callbacks = list(trainer.callback_handler.callbacks)
    saved_scheduler = trainer.lr_scheduler
    saved_created = getattr(trainer, "_created_lr_scheduler", False)
    had_create_scheduler = "create_scheduler" in vars(trainer)
    saved_create_scheduler = vars(trainer).get("create_scheduler")

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        current = trainer.lr_scheduler
        if current is not None and ramp.owns(current):  # built already (DeepSpeed asked first, through accelerate)
            return current
        if current is not None and not _asks_for_a_scheduler(current):
            # The Trainer got a scheduler elsewhere (DeepSpeed's own, from its config's 'scheduler' section),
            # which it keeps, as its own create_scheduler does: the ramp is not applied (refused at the first step).
            ramp.foreign = current
            return current
        trainer.lr_scheduler = ramp.build(optimizer if optimizer is not None else trainer.optimizer)
        trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    try:
        for name, value in changed.items():
            setattr(args, name, value)
        args.output_dir = tmp
        for cb in _detached_callbacks(trainer):
            trainer.callback_handler.remove_callback(cb)
        trainer.callback_handler.add_callback(callback)
        trainer.lr_scheduler = None
        trainer._created_lr_scheduler = False
        trainer.create_scheduler = create_scheduler
        for name in _QUIETED_LOGGERS:
            logging.getLogger(name).addFilter(hide)
        yield output_dir
    finally:
        for name in _QUIETED_LOGGERS:
            logging.getLogger(name).removeFilter(hide)
        for name, value in saved_args.items():
            setattr(args, name, value)
        args.output_dir = output_dir
        trainer.callback_handler.callbacks = saved_callbacks
        if had_create_scheduler:
            trainer.create_scheduler = saved_create_scheduler
        else:
            vars(trainer).pop("create_scheduler", None)
        trainer.lr_scheduler = saved_scheduler
        trainer._created_lr_scheduler = saved_created
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _restored(trainer: Any, restore: bool) -> Iterator[None]:
    """Put the trained parameters, buffers and a user-given optimizer back as they were (``restore``)."""
    if not restore:
        yield
        return
    import copy

    import torch

    model = trainer.model
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    optimizer = trainer.optimizer
    optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in params:
                    p.copy_(params[n])
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
        trainer.optimizer = optimizer  # None: the next train() builds a fresh one (new SGD-SaI scales)
        trainer.model_wrapped = trainer.model if optimizer is None else trainer.model_wrapped


def lr_find(
    trainer: Any,
    start_lr: float = DEFAULTS.start_lr,
    end_lr: float = DEFAULTS.end_lr,
    steps: int = DEFAULTS.steps,
    smooth: float = DEFAULTS.smooth,
    diverge: float = DEFAULTS.diverge,
    method: str = DEFAULTS.method,
    output_dir: str | os.PathLike | None = None,
    write: bool = True,
    restore: bool = True,
    verbose: bool = True,
    _train: Callable[[Any], Any] | None = None,
) -> LRFindResult:
    """Run a learning-rate range test on ``trainer`` (a ``transformers.Trainer``) and return the result.

    ``steps`` optimizer steps at learning rates rising exponentially from ``start_lr`` to
    ``end_lr`` (a group at ``args.learning_rate`` gets exactly the ramp; other groups keep their
    ratio to it), stopping early on divergence; no evaluation, checkpoint or integration logging.
    ``write``: rank 0 writes ``lr_find.json`` (and ``lr_find.png`` with matplotlib) into
    ``output_dir`` (default ``trainer.args.output_dir``). ``restore``: afterwards the model's
    trainable parameters and buffers (and an optimizer you gave the Trainer) are put back, and a
    Trainer-made optimizer is dropped, so ``trainer.train()`` starts from where it was (single
    process and DDP; not under FSDP or DeepSpeed, whose wrapped models stay trained).

    Raises ``ValueError`` for bad settings and :class:`LRFindError` when no rate can be suggested
    (the loss never decreased, or diverged at once), naming the problem.
    """
    _check_settings(start_lr, end_lr, steps, smooth, diverge, method)
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"lr_find needs a transformers.Trainer, got {type(trainer).__name__}")
    began = time.monotonic()
    # a group at the script's learning_rate gets the ramp itself; an optimizer given to the Trainer: its first group
    base_lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer is not None else trainer.args.learning_rate
    ramp = _RampScheduler(float(base_lr), float(start_lr), float(end_lr), int(steps))
    callback = _range_test_callback(ramp, float(smooth), float(diverge), verbose)
    train = _train if _train is not None else type(trainer).train
    restore = restore and not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))
    with _restored(trainer, restore), _test_setup(trainer, ramp, callback, int(steps)) as real_output_dir:
        try:
            train(trainer)
        except _RampNotApplied as err:
            raise LRFindError(str(err)) from None
    why = ramp.not_applied(None, None)
    if why is not None:
        raise LRFindError(_NOT_APPLIED_MESSAGE.format(why=why))
    settings = {
        "start_lr": float(start_lr), "end_lr": float(end_lr), "steps": int(steps), "smooth": float(smooth),
        "diverge": float(diverge), "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "optim_args": trainer.args.optim_args, "script_learning_rate": float(trainer.args.learning_rate),
        "world_size": world()[1], "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }  # fmt: skip
    error = None
    found = None
    if world()[0] == 0:
        try:
            found = suggest(callback.lrs, callback.smoothed, method, losses=callback.losses, beta=float(smooth))
        except NoDecreaseError as err:
            error = _rose_from_the_start(callback) or str(err)
    found, error = _broadcast((found, error))
    if error is not None:
        if write and trainer.is_world_process_zero():  # the curve still helps to choose another range
            directory = Path(output_dir if output_dir is not None else real_output_dir or ".")
            directory.mkdir(parents=True, exist_ok=True)
            payload = {"lrs": callback.lrs, "losses": callback.losses, "smoothed": callback.smoothed,
                       "suggestion": None, "method": method, "error": error, "stop_reason": callback.stop_reason,
                       "settings": {"start_lr": start_lr, "end_lr": end_lr, "steps": steps}}  # fmt: skip
            (directory / JSON_NAME).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
            curve = LRFindResult(callback.lrs, callback.losses, callback.smoothed, None, method, {}, "", {})  # type: ignore[arg-type]
            png = plot_lr_find(curve, directory / PNG_NAME)
            error += f" (the curve: {directory / JSON_NAME}" + (f", {png})" if png else ")")
        raise LRFindError(error)
    stop_reason = callback.stop_reason
    if not stop_reason.startswith("diverged") and len(callback.lrs) < steps:
        stop_reason = f"training ended after {len(callback.lrs)} of {steps} steps (the data ran out?)"
        found.warnings.append(f"{stop_reason}: the range ended at lr {callback.lrs[-1]:.3g}, not {end_lr:g}")
    result = LRFindResult(
        lrs=callback.lrs, losses=callback.losses, smoothed=callback.smoothed, suggestion=found.lr,
        method=found.method, candidates=found.candidates, stop_reason=stop_reason, settings=settings,
        warnings=found.warnings, seconds=time.monotonic() - began,
    )  # fmt: skip
    if write and trainer.is_world_process_zero():
        directory = Path(output_dir if output_dir is not None else real_output_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        result.json_path = str(directory / JSON_NAME)
        Path(result.json_path).write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
        result.png_path = plot_lr_find(result, directory / PNG_NAME)
    return result


def _rose_from_the_start(callback: Any) -> str | None:
    """The error for a test whose loss rose from the first rate on, or ``None``: the ramp started where
    the model already diverges, so the advice is a lower ``--start-lr`` (the rule's own message asks for
    a higher one, to spend more steps below a divergence that came after a flat stretch). "Rose": the
    smoothed loss went up at every step of the first half of the test and then diverged (or ended 10%
    above its first value). A flat, noisy loss (a frozen model), or one that stayed flat before it
    diverged, goes up and down: it is not this."""
    ys = []
    for value in callback.smoothed:
        if value is None or not math.isfinite(value):
            break
        ys.append(value)
    if len(ys) < 3 or any(b <= a for a, b in zip(ys[: len(ys) // 2 + 1], ys[1 : len(ys) // 2 + 1])):
        return None
    diverged_now = callback.stop_reason.startswith("diverged")
    if not diverged_now and ys[-1] <= 1.1 * ys[0]:
        return None
    start = callback.lrs[0]
    end = callback.stop_reason if diverged_now else f"rose to {ys[-1]:.4g} by lr {callback.lrs[len(ys) - 1]:.3g}"
    return (
        f"the loss rose from the first rate on (smoothed {ys[0]:.4g} at lr {start:.3g}, its lowest) and {end}: the ramp "
        f"starts where this model already diverges: a lower --start-lr (now {start:.3g}; e.g. {start / 100:.3g})"
    )


def plot_lr_find(result: LRFindResult, path: str | os.PathLike) -> str | None:
    """Loss and smoothed loss against the learning rate (log axis), the suggestion (if any) marked;
    ``None`` (nothing written) without matplotlib."""
    try:
        fig, ax = figure((7, 4.5))
    except ImportError:
        return None
    pairs = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if loss is not None]
    smooth = [(lr, s) for lr, s in zip(result.lrs, result.smoothed) if s is not None]
    if pairs:
        ax.plot(*zip(*pairs), color="0.7", lw=1, label="loss")
    if smooth:
        ax.plot(*zip(*smooth), color="C0", lw=2, label="smoothed loss")
        low = min([s for _, s in smooth] + [loss for _, loss in pairs])
        middle = sorted(s for _, s in smooth)[len(smooth) // 2]  # the diverged tail would squash the rest
        span = max(middle - low, 1e-3)
        ax.set_ylim(low - 0.05 * span, middle + 1.2 * span)
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggested {result.suggestion:.3g} ({result.method})")
    ax.set_xscale("log")
    return str(save_figure(fig, ax, path, "learning rate", "training loss", "learning-rate range test"))


# --------------------------------------------------------------------------- command line
class _UsageError(Exception):
    pass


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
            raise _UsageError(f"unknown option {name!r} (options go before the script; see --help)")
        if not eq:
            if i + 1 >= len(argv):
                raise _UsageError(f"{name} needs a value")
            i += 1
            value = argv[i]
        key, convert = _OPTIONS[name]
        try:
            options[key] = convert(value)
        except ValueError:
            raise _UsageError(f"{name}: {value!r} is not a valid {convert.__name__}") from None
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
            result = lr_find(self, _train=original_train, restore=False, **settings)
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
    from . import run as launcher

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    try:
        options, target = _parse(argv)
        skip_trains = options.pop("skip_trains", 0)
        if skip_trains < 0:
            raise _UsageError(f"--skip-trains must be 0 or more, got {skip_trains}")
        output_dir = options.pop("output_dir", None)
        if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise _UsageError(f"--output {output_dir!r} is a file, not a directory")
        settings = {**asdict(DEFAULTS), **options}
        try:
            _check_settings(**settings)
        except ValueError as err:
            raise _UsageError(str(err).replace("start_lr", "--start-lr").replace("end_lr", "--end-lr")
                              .replace("steps", "--steps").replace("smooth", "--smooth")
                              .replace("diverge", "--diverge").replace("method", "--method")) from None  # fmt: skip
        try:
            launcher._target(target)
        except launcher._UsageError as err:
            raise _UsageError(str(err).replace(launcher.PROG, PROG)) from None
    except _UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    name = target[1] if target[0] == "-m" else target[0]
    finished: _Finished | None = None
    with _hooks({**settings, "output_dir": output_dir}, skip_trains) as seen:
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
    rank = world()[0]
    try:
        if finished.error is not None:
            if rank == 0:
                print(f"{PROG}: error: {finished.error}", file=sys.stderr, flush=True)
            return 1
        result = finished.result
        assert result is not None
        if rank == 0:
            _print_result(result)
        return 0
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
