"""What the 2-process workers share: counting the exact reducer's collectives, and ending the process group."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

import sai_hf.run

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
    """Wait for every rank, destroy the default process group, then end this process without interpreter finalization.

    A rank whose process group outlives ``destroy_process_group`` can die with SIGABRT ("terminate called without
    an active exception") while the interpreter finalizes, after its work is done and its results are written:
    gloo's C++ threads still hold work objects whose tensors take the GIL while it is being torn down
    (pytorch/pytorch#179291). ``destroy_process_group`` only drops ``torch.distributed``'s own references, and
    DTensor keeps others: after ``shard_worker``'s DTensor checks the default group still has 3 references
    (``DTensorSpec`` -> ``DeviceMesh`` -> process groups, kept by DTensor's sharding-propagation results), so it is
    destroyed during finalization; a plain gloo script holds none. torchrun then reports the run as failed (exit
    code -6, the other rank SIGTERM-ed), with no Python traceback (CI on 2026-12-02, ``shard_worker``). The
    barrier makes both ranks leave their last collective first; ``os._exit(0)`` after flushing skips the
    finalization that tears the remaining group down.
    """
    sai_hf.run.end_process_group()  # barrier, then destroy
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
