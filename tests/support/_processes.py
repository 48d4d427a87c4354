"""What the 2-process workers share: counting the exact reducer's collectives, and ending the process group."""

from __future__ import annotations

import sys

import torch.distributed as dist

from sai_hf.run import end_process_group  # noqa: F401  (the workers end their ranks with it)

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
