"""The learning-rate range test (Smith 2015; fastai's ``lr_find``) on a ``transformers.Trainer``: :func:`lr_find`.

The Trainer trains with its own model, data, batch size, accumulation, clipping and ``--optim``, but its schedule is
replaced by the exponential ramp (:class:`sai_hf.lr_ramp.Ramp`, checked before every step to be the rate the optimizer
applies) and it evaluates, saves and reports nothing (a temporary ``output_dir``, removed). SGD-SaI's scales come from
the first step's gradient, as in training: the ramp only changes the rate that multiplies them. With several processes
rank 0 decides when to stop and what to suggest, and broadcasts both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .lr_ramp import Ramp
from .lr_rule import DEFAULT_METHOD, METHODS, NoDecreaseError, Smoother, diverged, rose_from_the_start, suggest
from .plots import plot_lr_find
from .sharding import world

__all__ = ["LRFindResult", "LRFindError", "RangeTestSettings", "DEFAULTS", "lr_find", "JSON_NAME", "PNG_NAME"]

JSON_NAME = "lr_find.json"
PNG_NAME = "lr_find.png"


@dataclass(frozen=True)
class RangeTestSettings:
    """The range test's settings (:func:`lr_find`'s arguments), with their defaults."""

    start_lr: float = 1e-6
    end_lr: float = 10.0
    steps: int = 100
    smooth: float = 0.9
    diverge: float = 4.0
    method: str = DEFAULT_METHOD

    def check(self, spelled: Mapping[str, str] | None = None) -> None:
        """``ValueError`` naming the first bad setting, as ``spelled`` spells it (e.g. the command line's ``--start-lr``)."""
        name = {key: (spelled or {}).get(key, key) for key in asdict(self)}
        for key in ("start_lr", "end_lr", "smooth", "diverge"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name[key]} must be a finite number, got {value!r}")
        if self.start_lr <= 0:
            raise ValueError(f"{name['start_lr']} must be positive, got {self.start_lr!r}")
        if not self.start_lr < self.end_lr:
            raise ValueError(f"{name['start_lr']} ({self.start_lr:g}) must be below {name['end_lr']} ({self.end_lr:g}): the ramp rises")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 5:
            raise ValueError(f"{name['steps']} must be an integer of at least 5, got {self.steps!r}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"{name['smooth']} must be in [0, 1), got {self.smooth!r}")
        if not self.diverge > 1.0:
            raise ValueError(f"{name['diverge']} must be above 1, got {self.diverge!r}")
        if self.method not in METHODS:
            raise ValueError(f"{name['method']} must be one of {', '.join(METHODS)}, got {self.method!r}")


DEFAULTS = RangeTestSettings()


class LRFindError(Exception):
    """The range test could not suggest a learning rate (the message says why and what to change)."""


@dataclass
class LRFindResult:
    """What a range test found. ``lrs[i]``, ``losses[i]`` and ``smoothed[i]`` belong to step ``i`` (the loss before
    its update; ``None``: not finite). ``suggestion`` is ``None`` where ``error`` says why (:func:`lr_find` raises)."""

    lrs: list[float]
    losses: list[float | None]
    smoothed: list[float | None]
    suggestion: float | None
    method: str
    candidates: dict[str, float]
    stop_reason: str
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    json_path: str | None = None
    png_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        for key in ("json_path", "png_path") + (("error",) if self.error is None else ()):
            payload.pop(key)
        return payload

    def write(self, directory: Path) -> None:
        """Write ``lr_find.json`` and (with matplotlib) ``lr_find.png`` into ``directory``; note their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        self.json_path = str(directory / JSON_NAME)
        Path(self.json_path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        self.png_path = plot_lr_find(self, directory / PNG_NAME)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself in one process)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _range_test_callback(ramp: Ramp, settings: RangeTestSettings, verbose: bool) -> Any:
    from transformers import TrainerCallback

    class RangeTestCallback(TrainerCallback):
        """Logs every step, blocks evaluation and saving, records the loss and stops on divergence."""

        def __init__(self) -> None:
            self.lrs: list[float] = []
            self.losses: list[float | None] = []
            self.smoothed: list[float | None] = []
            self.smoother = Smoother(settings.smooth)
            self.best = math.inf
            self.stop_reason = f"reached --steps ({ramp.steps})"
            self.applied: float | None = None  # group 0's rate in this step's update

        def _quiet(self, control: Any) -> Any:
            control.should_evaluate = False
            control.should_save = False
            return control

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            error = ramp.not_applied(optimizer, kwargs.get("model"))
            if error is not None:
                raise LRFindError(error)
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
            reason = diverged(loss, smoothed, self.best, settings.diverge)
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


@contextlib.contextmanager
def _test_setup(trainer: Any, ramp: Ramp, callback: Any) -> Iterator[str]:
    """The Trainer as the test needs it (restored on exit): ``ramp.steps`` steps with the ramp as scheduler, the test
    callback instead of integrations and printers, a temporary ``output_dir``. Yields the real ``output_dir``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = trainer.args
    tmp = tempfile.mkdtemp(prefix="sai_hf_lr_find_")
    changed = dict(max_steps=ramp.steps, eval_on_start=False, logging_nan_inf_filter=False, load_best_model_at_end=False,
                   push_to_hub=False, output_dir=tmp)  # fmt: skip
    saved_args = {name: getattr(args, name) for name in changed}
    # sai-hf's "g-SNR report ... written to <tmp>/gsnr.json" would name a folder that is removed afterwards
    quieted, folder = logging.getLogger("sai_hf.callback"), os.path.abspath(tmp)

    def hide(record: logging.LogRecord) -> bool:
        return folder not in record.getMessage()

    saved_callbacks = list(trainer.callback_handler.callbacks)
    saved_scheduler = trainer.lr_scheduler
    saved_created = getattr(trainer, "_created_lr_scheduler", False)
    saved_create_scheduler = vars(trainer).get("create_scheduler")

    try:
        for name, value in changed.items():
            setattr(args, name, value)
        for cb in saved_callbacks:
            if (type(cb).__module__ or "").startswith("transformers.integrations") or isinstance(cb, (PrinterCallback, ProgressCallback)):
                trainer.callback_handler.remove_callback(cb)
        trainer.callback_handler.add_callback(callback)
        trainer.lr_scheduler = None
        trainer._created_lr_scheduler = False
        trainer.create_scheduler = lambda num_training_steps, optimizer=None: ramp.trainer_scheduler(trainer, optimizer)
        quieted.addFilter(hide)
        yield saved_args["output_dir"]
    finally:
        quieted.removeFilter(hide)
        for name, value in saved_args.items():
            setattr(args, name, value)
        trainer.callback_handler.callbacks = saved_callbacks
        if saved_create_scheduler is not None:
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
    train: Callable[[Any], Any] | None = None,
) -> LRFindResult:
    """Run a learning-rate range test on ``trainer`` (a ``transformers.Trainer``) and return the result::

        result = lr_find(trainer)            # a Trainer you built; its model is restored afterwards
        trainer.args.learning_rate = result.suggestion
        trainer.train()

    ``steps`` optimizer steps at rates rising exponentially from ``start_lr`` to ``end_lr`` (a group at
    ``args.learning_rate`` gets exactly the ramp, others keep their ratio to it), stopping early on divergence.
    ``write``: rank 0 writes ``lr_find.json`` (and ``lr_find.png``) into ``output_dir`` (default: the Trainer's).
    ``restore``: the trainable parameters, buffers and a user-given optimizer are put back afterwards, a Trainer-made
    optimizer dropped (not under FSDP or DeepSpeed). ``train``: the method to run (default ``type(trainer).train``).
    ``ValueError`` for bad settings, :class:`LRFindError` when no rate can be suggested.
    """
    settings = RangeTestSettings(start_lr, end_lr, steps, smooth, diverge, method)
    settings.check()
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"lr_find needs a transformers.Trainer, got {type(trainer).__name__}")
    began = time.monotonic()
    # a group at the script's learning_rate gets the ramp itself; an optimizer given to the Trainer: its first group
    base_lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer is not None else trainer.args.learning_rate
    ramp = Ramp(float(base_lr), settings.start_lr, settings.end_lr, settings.steps)
    callback = _range_test_callback(ramp, settings, verbose)
    train = train if train is not None else type(trainer).train
    restore = restore and not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))
    with _restored(trainer, restore), _test_setup(trainer, ramp, callback) as real_output_dir:
        train(trainer)
    ramp_error = ramp.not_applied(None, None)
    if ramp_error is not None:
        raise LRFindError(ramp_error)
    found, error = None, None
    if world()[0] == 0:
        try:
            found = suggest(callback.lrs, callback.smoothed, method, losses=callback.losses, beta=float(smooth))
        except NoDecreaseError as err:
            error = rose_from_the_start(callback.lrs, callback.smoothed, callback.stop_reason) or str(err)
    found, error = _broadcast((found, error))
    stop_reason = callback.stop_reason
    if found is not None and not stop_reason.startswith("diverged") and len(callback.lrs) < steps:
        stop_reason = f"training ended after {len(callback.lrs)} of {steps} steps (the data ran out?)"
        found.warnings.append(f"{stop_reason}: the range ended at lr {callback.lrs[-1]:.3g}, not {end_lr:g}")
    result = LRFindResult(
        lrs=callback.lrs, losses=callback.losses, smoothed=callback.smoothed, suggestion=found.lr if found else None,
        method=found.method if found else method, candidates=found.candidates if found else {}, stop_reason=stop_reason,
        settings={"start_lr": float(start_lr), "end_lr": float(end_lr), "steps": int(steps), "smooth": float(smooth),
                  "diverge": float(diverge), "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                  "optim_args": trainer.args.optim_args, "script_learning_rate": float(trainer.args.learning_rate),
                  "world_size": world()[1], "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps},
        warnings=found.warnings if found else [], seconds=time.monotonic() - began, error=error,
    )  # fmt: skip
    if write and trainer.is_world_process_zero():
        result.write(Path(output_dir if output_dir is not None else real_output_dir or "."))
    if error is not None:
        curve = f" (the curve: {result.json_path}" + (f", {result.png_path})" if result.png_path else ")") if result.json_path else ""
        raise LRFindError(error + curve)
    return result
