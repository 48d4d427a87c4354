"""Whole tensors: one process, or DDP (every rank holds the whole block and, after DDP's
all-reduce, the same whole gradient). Each optimizer parameter is one block whose state is
``optimizer.state[param]``; nothing to sum (in a cross-rank reduction of other, sharded blocks
only rank 0's row counts).

:class:`WholeTensors` is also the base of the other per-tensor backends
(:mod:`~sai_hf.sharding.dtensor`, :mod:`~sai_hf.sharding.fsdp1`), which override where the local
entries are (:meth:`~WholeTensors.local`, :meth:`~WholeTensors.like`) and how they combine
(:meth:`~WholeTensors.placement`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .base import Block, Placement, ShardingBackend, world

__all__ = ["WholeTensors"]


class WholeTensors(ShardingBackend):
    """A plain tensor: the whole block on every rank (the last backend: it claims everything)."""

    def claims(self, param: Tensor) -> bool:
        return True

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        """Where ``param``'s block lives: sharded here or not, counted here or not, its whole numel."""
        return Placement(sharded=False, contributes=rank == 0, numel=int(param.numel()))

    def local(self, tensor: Tensor) -> Tensor:
        """The entries of ``tensor`` (a parameter, its gradient or momentum) stored on this rank."""
        return tensor

    def like(self, local: Tensor, param: Tensor) -> Tensor:
        """A new momentum buffer wrapped the way ``param`` is (the inverse of :meth:`local`)."""
        return local

    def may_lack_gradient(self, param: Tensor) -> bool:
        """Whether ``param.grad`` can be ``None`` here while other ranks hold entries of the block."""
        return False

    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        rank, world_size = world()
        out = []
        for p in params:
            state = optimizer.state[p]
            buf = state.get("momentum_buffer")
            out.append(
                Block(
                    param=p,
                    local=self.local(p),
                    grad=None if p.grad is None else self.local(p.grad),
                    buffer=None if buf is None else self.local(buf),
                    state=state,
                    group=group,
                    placement=self.placement(p, rank, world_size),
                    backend=self,
                    may_lack_gradient=self.may_lack_gradient(p),
                )
            )
        return out

    def keep_buffer(self, block: Block, local: Tensor) -> None:
        block.state["momentum_buffer"] = self.like(local, block.param)
