"""Ending a worker's process group (the 2-process tests' workers call :func:`end_process_group` last)."""

from __future__ import annotations

import torch.distributed as dist


def end_process_group() -> None:
    """Wait for every rank, then destroy the default process group, before the interpreter exits.

    A rank that exits with its gloo group still alive can die with SIGABRT during interpreter
    finalization, after its work is done: gloo's C++ threads still hold work objects whose tensors
    take the GIL while it is being torn down (pytorch/pytorch#179291). torchrun then reports the run
    as failed (exit code -6, the other rank SIGTERM-ed), with no Python traceback. The barrier makes
    both ranks leave their last collective before either tears its group down.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
