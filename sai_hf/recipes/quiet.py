"""What the recipes keep off the terminal: the progress bars of their own data preparation and of
saving the model, and DeepSpeed's accelerator warning on a machine without an accelerator.

The Trainer's own progress bar, its loss and evaluation logs, and real warnings are untouched.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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
