"""The range test's learning-rate ramp as the Trainer's scheduler (:class:`Ramp`), checked to be the rate the optimizer
applies (:meth:`Ramp.not_applied`): otherwise the curve's x axis would be rates never applied."""

from __future__ import annotations

import math
from typing import Any

from .lr_rule import ramp_lr

__all__ = ["Ramp"]


class Ramp:
    """The ramp as the Trainer's scheduler: a LambdaLR that multiplies each group's learning rate so that a group at
    ``base_lr`` gets ``ramp_lr(step)`` (other groups keep their ratio to it), and whether the optimizer applies it."""

    def __init__(self, base_lr: float, start: float, end: float, steps: int) -> None:
        self.base_lr, self.start, self.end, self.steps = base_lr, start, end, steps
        self.ratio = 1.0  # group 0's rate over the ramp's (set by build)
        self.built = False  # whether the Trainer asked for the ramp (not e.g. DeepSpeed's own scheduler)
        self.scheduler: Any = None  # the LambdaLR build made
        self.foreign: Any = None  # a scheduler the Trainer already had when it asked for one (DeepSpeed's own)

    def lr(self, step: int) -> float:
        return ramp_lr(step, self.start, self.end, self.steps)

    def lr_used(self, logged: Any, step: int) -> float:
        """The ramp's rate of a step: group 0's rate in it (else the logged one) over its ratio, or ``lr(step)``."""
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr(step) / base)
        self.ratio = optimizer.param_groups[0]["initial_lr"] / base
        return self.scheduler

    def trainer_scheduler(self, trainer: Any, optimizer: Any = None) -> Any:
        """The Trainer's ``create_scheduler`` during the test: the ramp, built once (DeepSpeed may ask first, through
        accelerate), unless the Trainer has a scheduler of its own (DeepSpeed's, from its config), which it keeps, as
        its ``create_scheduler`` does: the ramp is then refused at the first step."""
        current = trainer.lr_scheduler
        if current is not None and self.owns(current):
            return current
        if current is not None and not _asks_for_a_scheduler(current):
            self.foreign = current
            return current
        trainer.lr_scheduler = self.build(optimizer if optimizer is not None else trainer.optimizer)
        trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    def owns(self, scheduler: Any) -> bool:
        """Whether ``scheduler`` is the ramp (possibly inside accelerate's wrapper)."""
        if self.scheduler is None:
            return False
        return scheduler is self.scheduler or getattr(scheduler, "scheduler", None) is self.scheduler

    def not_applied(self, optimizer: Any, engine: Any) -> str | None:
        """The error where the next optimizer step will not run at the ramp's rate (the Trainer or DeepSpeed's engine
        steps another scheduler, or the first group's rate is not the ramp's last), else ``None``."""
        why = None
        engine_scheduler = getattr(engine, "lr_scheduler", None)
        groups = getattr(optimizer, "param_groups", None)
        if self.foreign is not None:
            why = f"the Trainer uses {_scheduler_name(self.foreign)} instead of the ramp"
        elif not self.built:
            why = "the Trainer never built its learning-rate scheduler"
        elif engine_scheduler is not None and not self.owns(engine_scheduler):
            why = f"DeepSpeed's engine steps {_scheduler_name(engine_scheduler)}"
        elif groups:
            applied, expected = float(groups[0]["lr"]), float(self.scheduler.get_last_lr()[0])
            if not math.isclose(applied, expected, rel_tol=1e-6, abs_tol=0.0):
                why = f"the optimizer's first parameter group runs at lr {applied:.4g}, the ramp's {expected:.4g}"
        if why is None:
            return None
        return (
            f"the ramp was not applied: {why}, so the range test would record rates the optimizer never used. "
            "A DeepSpeed config with its own 'scheduler' section? Remove it for the range test"
        )


def _asks_for_a_scheduler(scheduler: Any) -> bool:
    """accelerate's placeholder that has DeepSpeed call the Trainer's ``create_scheduler`` (a DeepSpeed config
    with an ``optimizer`` section and no ``scheduler`` one), not a scheduler of its own."""
    return type(scheduler).__name__ == "DummyScheduler" and getattr(scheduler, "lr_scheduler_callable", None) is not None


def _scheduler_name(scheduler: Any) -> str:
    inner = getattr(scheduler, "scheduler", None)
    return f"its own scheduler ({type(inner if inner is not None else scheduler).__name__})"
