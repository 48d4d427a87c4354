"""DeepSpeed ZeRO stage 3 (and its CPU offload): blocks are the per-parameter pieces of the stage-3
optimizer's fp32 sub-group partitions.

Under ZeRO-3 every trainable parameter ``b`` (a *block*, ``b.ds_numel`` entries, flattened) is cut
on its own into one piece per rank: rank ``r`` of the ``W`` ranks holds entries
``[r s, min((r + 1) s, n))`` of it, ``s = ceil(n / W)`` = ``b.partition_numel()``, padded with zeros
to ``s`` (``b.ds_tensor``). DeepSpeed's stage-3 optimizer (``b._z3_optimizer``) concatenates the
pieces of a *sub-group* ``i`` of a parameter group (``fp16_groups[i]``, in group order) into one fp32
partition ``F_i = fp32_partitioned_groups_flat[i]`` and steps the wrapped optimizer once per
sub-group with ``param_groups[k]["params"] = [F_i]`` (``k = sub_group_to_group_id[i]``). Block
``j`` of sub-group ``i`` is ``F_i[o_j : o_j + v_j]`` here, ``o_j`` the sum of the sub-group's
earlier ``partition_numel()``, ``v_j = clamp(n_j - r s_j, 0, s_j)`` the entries that are not
padding; the same range of ``F_i.grad`` (the reduced, unscaled and clipped gradient) and of the
momentum buffer. Every rank holds a disjoint piece, so every rank's statistics row counts; a rank
with no entries of a block (``v_j = 0``) joins the reduction with a zero row.

With ``offload_optimizer`` (``device: cpu``) ``F_i`` and its gradient live on the CPU and SGD-SaI
steps there (the native CPU loop); with ``offload_param`` the bf16/fp32 model pieces live on the
CPU between uses; neither changes the layout above.

State of ``F_i`` (``optimizer.state[F_i]``, saved per rank in DeepSpeed's checkpoint)::

    momentum_buffer   tensor like F_i (absent with momentum=0)
    step              optimizer steps taken by this sub-group
    world_size        ranks the partition was cut for (resuming at another world size is refused)
    blocks            {index of the block in its sub-group: {"gsnr", "scale", "gsnr_eps_free",
                       "scaled_at", "step"}}

Refused (:class:`~sai_hf.sharding.base.UnsupportedShardingError`): a partition group that is not
every rank (hpZ, MiCS, expert or sequence parallel groups), and ``normalize="max"`` (DeepSpeed steps
the sub-groups one at a time, as ZeRO-1/2 step the groups) where there is more than one sub-group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Block, Placement, UnsupportedShardingError, world
from .deepspeed_zero import ZeroFragments

__all__ = ["Zero3Partitions"]

_WORLD_SIZE_MESSAGE = (
    "SGD-SaI: this DeepSpeed ZeRO-3 checkpoint's optimizer state was saved with {saved} ranks and is "
    "resumed with {now}: every rank's partition of every parameter changed, so the momentum buffers no "
    "longer fit. Resume with {saved} ranks (the world size it was saved with), or start the optimizer "
    "afresh (load the model weights only: the scales are recomputed from the first gradient)."
)
_LAYOUT_MISMATCH_MESSAGE = (
    "SGD-SaI: the momentum buffer restored for a DeepSpeed ZeRO-3 partition has shape {saved}, the partition "
    "{now}: the checkpoint was saved with another world size, parameter grouping or sub_group_size. Resume "
    "with the configuration it was saved with, or start the optimizer afresh (load the model weights only)."
)
_PARTITION_GROUP_MESSAGE = (
    "SGD-SaI under DeepSpeed ZeRO-3: sub-group {index} is partitioned over {count} of the {world} ranks "
    "(hpZ zero_hpz_partition_size, MiCS, expert or sequence parallelism): its g-SNR statistics would "
    "be summed over the wrong ranks. Use plain ZeRO-3 (configs/deepspeed/zero3.json) over one data-parallel group."
)
_NORMALIZE_MAX_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO-3 is not exact: DeepSpeed steps the sub-groups one "
    "at a time, so the largest g-SNR over all blocks is not known when the first is updated. Use "
    "normalize='none' (the default; multiply the learning rate by the largest first-step g-SNR, "
    "gsnr_max in gsnr.json, for the same run) or FSDP2 (configs/accelerate/fsdp.yaml), where it is exact."
)


class Zero3Partitions(ZeroFragments):
    """The fp32 sub-group partitions of DeepSpeed's stage-3 optimizer, found through the model's
    parameters (``_z3_optimizer``, linked when DeepSpeed wraps the optimizer). Step counting,
    ``keep_buffer`` and ``scaling_started`` are those of ZeRO-1/2 (:class:`ZeroFragments`)."""

    STATE_KEYS = frozenset({"blocks", "world_size"})

    def __init__(self, model_groups: Sequence[Sequence[Tensor]] = ()) -> None:
        super().__init__(model_groups)
        self._zero: Any = None

    def zero_optimizer(self) -> Any:
        """DeepSpeed's stage-3 optimizer that wraps this one (``None`` before it exists)."""
        if self._zero is None:
            self._zero = next(
                (z for g in self.model_groups for p in g if (z := getattr(p, "_z3_optimizer", None)) is not None), None
            )
        return self._zero

    def claims(self, param: Tensor) -> bool:
        """One of the stage-3 optimizer's fp32 sub-group partitions."""
        zero = self.zero_optimizer()
        return zero is not None and any(param is f for f in zero.fp32_partitioned_groups_flat)

    def sub_group(self, partition: Tensor) -> int:
        """Index ``i`` of ``partition`` in ``fp32_partitioned_groups_flat``."""
        key = id(partition)
        if key not in self._group_of_partition:
            flats = self.zero_optimizer().fp32_partitioned_groups_flat
            self._group_of_partition[key] = next(i for i, f in enumerate(flats) if f is partition)
        return self._group_of_partition[key]

    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        zero = self.zero_optimizer()
        _, world_size = world()
        out: list[Block] = []
        for partition in params:
            i = self.sub_group(partition)
            count = int(zero._get_sub_group_partition_count(i))
            if count != world_size:
                raise UnsupportedShardingError(_PARTITION_GROUP_MESSAGE.format(index=i, count=count, world=world_size))
            rank = int(zero._get_sub_group_partition_rank(i))
            state = optimizer.state[partition]
            state.setdefault("step", 0)
            entries = state.setdefault("blocks", {})
            flat = state.get("momentum_buffer")
            if stepping:
                if group["normalize"] == "max" and len(zero.fp16_groups) > 1:
                    raise UnsupportedShardingError(_NORMALIZE_MAX_MESSAGE)
                saved = state.setdefault("world_size", world_size)
                if saved != world_size:
                    raise UnsupportedShardingError(_WORLD_SIZE_MESSAGE.format(saved=saved, now=world_size))
                state["step"] += 1
                if group["momentum"] != 0 and flat is None:
                    flat = state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
                if flat is not None and flat.shape != partition.shape:
                    raise UnsupportedShardingError(_LAYOUT_MISMATCH_MESSAGE.format(saved=tuple(flat.shape), now=tuple(partition.shape)))
            grad = partition.grad
            offset = 0
            for index, p in enumerate(zero.fp16_groups[i]):
                piece, numel = int(p.partition_numel()), int(p.ds_numel)
                valid = max(0, min(piece, numel - rank * piece))
                entry = entries.setdefault(index, {})
                local = partition.narrow(0, offset, valid)
                slot = None if flat is None else flat.narrow(0, offset, valid)
                out.append(
                    Block(
                        param=p,
                        local=local,
                        grad=None if grad is None or valid == 0 else grad.narrow(0, offset, valid),
                        buffer=slot if entry.get("step", 0) > 0 else None,
                        state=entry,
                        group=group,
                        placement=Placement(sharded=True, contributes=True, numel=numel),
                        backend=self,
                        may_lack_gradient=grad is not None,
                        buffer_slot=slot,
                        step_index=state["step"],
                    )
                )
                offset += piece
            if offset != partition.numel():
                raise UnsupportedShardingError(
                    f"SGD-SaI: DeepSpeed ZeRO-3 sub-group {i} holds {partition.numel()} entries here, its parameters' "
                    f"pieces {offset}: a layout sai-hf does not know (DeepSpeed version?)"
                )
        return out

    def resting_blocks(self, optimizer: Any, groups: Sequence[Mapping[str, Any]], present: set[int]) -> list[Block]:
        """Between steps DeepSpeed empties ``param_groups[k]["params"]``: the blocks of every
        sub-group partition not in ``groups``, in sub-group order (the same on every rank)."""
        zero = self.zero_optimizer()
        if zero is None:
            return []
        out: list[Block] = []
        for i, partition in enumerate(zero.fp32_partitioned_groups_flat):
            k = zero.sub_group_to_group_id.get(i)
            if id(partition) in present or k is None or k >= len(groups):
                continue
            self._group_of_partition.setdefault(id(partition), i)
            out.extend(self.blocks(optimizer, groups[k], [partition], stepping=False))
        return out

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """Configuration checks are :class:`ZeroFragments`' (:mod:`.deepspeed_config`), run once."""
