"""One process, or DDP: every rank holds the whole block and (after DDP's all-reduce) the same
whole gradient. Nothing to sum: the local statistics are the block's; in a cross-rank reduction
(other blocks sharded) only rank 0's row counts."""

from __future__ import annotations

from torch import Tensor

from .base import Placement, TensorBackend

__all__ = ["WholeTensors"]


class WholeTensors(TensorBackend):
    """A plain tensor: the whole block on every rank (the last backend: it claims everything)."""

    def claims(self, param: Tensor) -> bool:
        return True

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        return Placement(sharded=False, contributes=rank == 0, numel=int(param.numel()))
