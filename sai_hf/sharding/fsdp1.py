"""FSDP1 with ``use_orig_params=True``: every original parameter the optimizer holds is a 1-D view
into this rank's shard of a ``FlatParameter`` (empty, with ``grad=None``, where the shard holds
none of the tensor), or, with ``NO_SHARD``, a whole-tensor view into an unsharded one.

FSDP1 leaves no mark on those views, so this backend keeps a registry of them, filled from the
wrapped model (:meth:`Fsdp1Views.register`: :class:`sai_hf.GSNRCallback` does it with the
Trainer's model; plain-PyTorch users call :func:`sai_hf.register_sharded_model`). A sharded view's
local piece is disjoint from the other ranks' pieces; with hybrid sharding only the ranks at
position 0 of the replicate group count. Unregistered views (two 1-D parameters sharing one
storage) and ``use_orig_params=False`` (the optimizer holds the FlatParameter: many tensors
concatenated) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .base import Block, Placement, UnsupportedShardingError
from .local import WholeTensors

__all__ = ["Fsdp1Views", "FLAT_PARAMETER_MESSAGE"]

FLAT_PARAMETER_MESSAGE = (
    "SGD-SaI does not support FSDP1 with use_orig_params=False: the optimizer gets FlatParameters, "
    "each many tensors concatenated, so per-tensor g-SNR is impossible. Set use_orig_params=True "
    "(accelerate: fsdp_use_orig_params: true) or, better, use FSDP2 (fsdp_version: 2)."
)


@dataclass(frozen=True)
class _View:
    """A registered original parameter of an FSDP1 ``use_orig_params=True`` module."""

    sharded: bool  # False under NO_SHARD: a whole tensor, nothing to reduce
    shard_group: Any
    replicate_group: Any | None  # hybrid sharding: the group that holds replicas of the shards
    numel: int  # elements of the whole original tensor


class Fsdp1Views(WholeTensors):
    """The FSDP1 views of one optimizer's parameters (its registry is this object's state)."""

    def __init__(self, groups: Sequence[Any] = ()) -> None:
        self.views: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def register(self, model: torch.nn.Module) -> int:
        """Record which parameters of ``model`` are FSDP1 ``use_orig_params=True`` views (``NO_SHARD``
        views as whole tensors). Idempotent; returns the number of parameters of ``model`` recorded."""
        if model is None:
            return 0
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:  # pragma: no cover - torch built without distributed
            return 0
        count = 0
        for module in model.modules():
            if not isinstance(module, FullyShardedDataParallel):
                continue
            handle = getattr(module, "_handle", None)
            if handle is None:
                continue
            flat = handle.flat_param
            originals = getattr(flat, "_params", None)
            if originals is None:
                continue  # use_orig_params=False: the optimizer holds the FlatParameter (refused)
            sharded = bool(handle.uses_sharded_strategy)
            hybrid = "HYBRID" in str(getattr(handle, "_sharding_strategy", ""))
            replicate_group = getattr(module, "_inter_node_pg", None) if hybrid else None
            for param, numel in zip(originals, flat._numels):
                self.views[param] = _View(sharded, handle.process_group, replicate_group, int(numel))
                count += 1
        return count

    def _sharded_view(self, param: Tensor) -> _View | None:
        view = self.views.get(param)
        return view if view is not None and view.sharded else None

    def claims(self, param: Tensor) -> bool:
        """A registered sharded view, or a FlatParameter (to refuse it)."""
        return getattr(param, "_is_flat_param", False) or self._sharded_view(param) is not None

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        if getattr(param, "_is_flat_param", False):
            raise UnsupportedShardingError(FLAT_PARAMETER_MESSAGE)
        view = self._sharded_view(param)
        dist = torch.distributed
        replicas = dist.get_world_size(view.replicate_group) if view.replicate_group is not None else 1
        if dist.get_world_size(view.shard_group) * replicas != world_size:
            raise UnsupportedShardingError(
                "SGD-SaI: an FSDP1 module's process groups do not span all ranks "
                f"({dist.get_world_size(view.shard_group)} x {replicas} != world size {world_size}); the ranks "
                "holding replicas of its shards cannot be told apart. Use one FSDP group over all ranks "
                "(or hybrid sharding, or FSDP2)."
            )
        first_replica = view.replicate_group is None or dist.get_rank(view.replicate_group) == 0
        return Placement(sharded=True, contributes=first_replica, numel=view.numel)

    def may_lack_gradient(self, param: Tensor) -> bool:
        return self._sharded_view(param) is not None

    def check_blocks(self, blocks: Sequence[Block]) -> None:
        """Two 1-D optimizer parameters sharing one storage are flat views into one buffer: the
        signature of FSDP1 ``use_orig_params=True`` (every original parameter becomes a 1-D view of
        the local shard, or of one shared empty tensor), whose views must be registered."""
        seen: dict[int, int] = {}
        for i, block in enumerate(blocks):
            p = block.param
            # Only parameters taken as whole tensors: DeepSpeed's model parameters are views into
            # its flat buffers too, but their blocks are partition fragments (another backend).
            if type(block.backend) is not WholeTensors or p.dim() != 1:
                continue
            try:
                key = p.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
                continue
            if key in seen:
                raise UnsupportedShardingError(
                    f"SGD-SaI: parameters #{seen[key]} and #{i} share one storage, as FSDP1 "
                    "(use_orig_params=True) shard views do; their local gradients are shards and the g-SNR "
                    "would be silently wrong. Call sai_hf.register_sharded_model(model, optimizer) once after "
                    "wrapping (the Trainer does this automatically), or use FSDP2."
                )
            seen[key] = i

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """An accelerate FSDP1 plugin with ``use_orig_params=False`` (the optimizer would get FlatParameters)."""
        try:
            from accelerate.state import AcceleratorState
        except ImportError:  # pragma: no cover - accelerate is a dependency
            return
        plugin = getattr(AcceleratorState, "_shared_state", {}).get("fsdp_plugin")
        if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not getattr(plugin, "use_orig_params", True):
            raise UnsupportedShardingError(FLAT_PARAMETER_MESSAGE)
