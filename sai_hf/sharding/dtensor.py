"""FSDP2 (and any DTensor parameter): each rank stores ``to_local()`` of every parameter,
gradient and momentum buffer.

A block whose placements include ``Shard(d)`` on a mesh dimension of size > 1 is sharded: its
local pieces are disjoint and their rows are summed. A ``Replicate`` mesh dimension holds copies:
only the ranks at coordinate 0 along every replicated dimension count. ``Partial`` gradients
(unreduced partial sums) have no additive statistics, and a mesh that does not span all ranks
(pipeline or nested data parallelism) hides which ranks hold replicas: both are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..gsnr import local_part
from .base import Placement, UnsupportedShardingError
from .local import WholeTensors

__all__ = ["DTensorShards"]


class DTensorShards(WholeTensors):
    """A parameter that is a DTensor, or whose gradient is one."""

    def __init__(self, model_groups: Sequence[Sequence[Tensor]] = ()) -> None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed support: no DTensor
            self.types: tuple[type, ...] = ()
        else:
            self.types = (DTensor,)

    def _source(self, param: Tensor) -> Tensor | None:
        """The DTensor that describes the block's layout (the gradient first), or ``None``."""
        if not self.types:
            return None
        grad = param.grad
        if grad is not None and isinstance(grad, self.types):
            return grad
        return param if isinstance(param, self.types) else None

    def claims(self, param: Tensor) -> bool:
        return self._source(param) is not None

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        source = self._source(param)
        mesh, placements = source.device_mesh, source.placements
        if mesh.size() != world_size:
            raise UnsupportedShardingError(
                f"SGD-SaI: a DTensor parameter lives on a device mesh of {mesh.size()} ranks but the world "
                f"has {world_size}; ranks outside the mesh may hold replicas of it (pipeline or nested data "
                "parallelism), so the exact sum over the ranks holding its shards is not known."
            )
        coordinate = mesh.get_coordinate()
        if coordinate is None:  # pragma: no cover - implied by the size check
            raise UnsupportedShardingError("SGD-SaI: this rank is not part of a parameter's device mesh")
        if any(p.is_partial() for p in placements):
            raise UnsupportedShardingError(
                f"SGD-SaI: a gradient has a Partial placement ({placements}): its entries are partial sums, "
                "whose statistics are not additive. Reduce the gradient before the optimizer step."
            )
        sharded = any(p.is_shard() and mesh.size(d) > 1 for d, p in enumerate(placements))
        contributes = all(coordinate[d] == 0 for d, p in enumerate(placements) if p.is_replicate())
        return Placement(sharded=sharded, contributes=contributes, numel=int(source.numel()))

    def local(self, tensor: Tensor) -> Tensor:
        """The DTensor's local shard (``tensor`` itself if it is a plain tensor)."""
        return local_part(tensor)

    def like(self, local: Tensor, param: Tensor) -> Tensor:
        """``local`` as a DTensor with ``param``'s mesh and placements (so that sharded checkpoints
        see a DTensor momentum buffer); ``local`` itself when ``param`` is a plain tensor."""
        if self.types and isinstance(param, self.types):
            return self.types[0].from_local(
                local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
            )
        return local
