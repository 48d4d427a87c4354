"""What the recipes keep off the terminal: the progress bars of their own data preparation and of
saving the model, the evaluation bar nested in the training bar when stderr is not a terminal, and
DeepSpeed's accelerator warning on a machine without an accelerator.

The Trainer's own progress bar, its loss and evaluation logs, and real warnings are untouched.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def default_deepspeed_accelerator_to_cpu() -> None:
    """Set ``DS_ACCELERATOR=cpu`` when no accelerator is present and DeepSpeed is not imported yet.

    accelerate's ``unwrap_model`` imports DeepSpeed whenever it is installed; without an accelerator
    DeepSpeed then picks the CPU itself, warning "Setting accelerator to CPU" on every run. Naming the
    choice it would make anyway silences that. A value already set, and any CUDA, XPU, MPS or NPU
    device (or ``torch_npu`` installed), leave the environment alone."""
    if "DS_ACCELERATOR" in os.environ or "deepspeed" in sys.modules:
        return
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        return
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return
    if torch.backends.mps.is_available() or importlib.util.find_spec("torch_npu") is not None:
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Within the block, no progress bar from ``datasets`` (``map``/``filter``) or ``transformers``
    (``save_pretrained``'s "Writing model shards"); each is put back as it was afterwards."""
    import datasets.utils.logging as datasets_logging
    import transformers.utils.logging as transformers_logging

    restore = [lib for lib in (datasets_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in restore:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in restore:
            lib.enable_progress_bar()


def _stderr_is_a_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def plain_progress(trainer: Any) -> bool:
    """When stderr is not a terminal (a log file, a pipe, CI), replace ``trainer``'s progress bar by one that
    draws no evaluation bar inside the training bar: tqdm moves the cursor up to draw a second bar (``ESC[A``),
    which a log file keeps as ``[A`` garbage on every evaluation. The training bar, the log lines and the
    evaluation metrics are unchanged; evaluations outside training (``trainer.evaluate()`` after ``train()``)
    keep their bar. Returns whether the bar was replaced (nothing to do on a terminal, or without a bar:
    ``disable_tqdm``)."""
    from transformers.trainer_callback import ProgressCallback

    if _stderr_is_a_terminal():
        return False
    callbacks = trainer.callback_handler.callbacks
    found = [i for i, cb in enumerate(callbacks) if type(cb) is ProgressCallback]
    for i in found:  # in place: the callbacks keep their order
        callbacks[i] = _no_nested_bars()(max_str_len=callbacks[i].max_str_len)
    return bool(found)


@functools.cache
def _no_nested_bars() -> type:
    """The progress callback class (built on first use: this module does not import transformers at import time)."""
    from transformers.trainer_callback import ProgressCallback

    class NoNestedBars(ProgressCallback):
        """The Trainer's progress bar without the evaluation bar nested in the training bar."""

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if self.training_bar is None:  # evaluation on its own: a bar of its own, on its own line
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    return NoNestedBars
