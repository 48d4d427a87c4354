"""What the 2-process workers share: counting the exact reducer's collectives, and ending the process group."""

from __future__ import annotations

import sys

import torch.distributed as dist

#: ``"<shape> <dtype>"`` of every ``all_reduce`` the exact reducer issued since :func:`count_sai_all_reduces`.
SAI_ALL_REDUCES: list[str] = []


def count_sai_all_reduces() -> None:
    """Record every ``all_reduce`` issued by the exact reducer (:mod:`sai_hf.sharding.base`) in :data:`SAI_ALL_REDUCES`."""
    import sai_hf.sharding.base

    original = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == sai_hf.sharding.base.__name__:
            SAI_ALL_REDUCES.append(f"{tuple(tensor.shape)} {tensor.dtype}")
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce


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
