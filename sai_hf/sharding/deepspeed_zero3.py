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

DeepSpeed steps the sub-groups one at a time, and the gradient of sub-group ``i`` becomes
``F_i.grad`` only when ``i`` is stepped. At the first scaling step (no block has a scale yet) the call
for the first sub-group therefore also measures every later one, from the gradients DeepSpeed has
already reduced (``averaged_gradients[j]``; with offload, ``F_j.grad``), their statistics scaled by
the factor DeepSpeed's ``unscale_and_clip_grads`` will apply (loss scale and clipping, recomputed from
the same operands; no copy of a gradient is made): one reduction of all blocks, and ``normalize="max"`` and degenerate blocks get the largest
g-SNR of all blocks, as in one process. Those blocks are updated in their own sub-group's call.
Blocks deferred then (a zero gradient: LoRA's ``lora_A``) are scaled in their sub-group's call at the
first step where they have a gradient.

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
every rank (hpZ, MiCS, expert or sequence parallel groups); ``normalize="max"`` with several
sub-groups where this DeepSpeed does not expose the later sub-groups' gradients (NVMe swapping,
Muon, another DeepSpeed version).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Block, UnsupportedShardingError, world
from .deepspeed_zero import ZeroFragments, _any_scale, unscale_factor

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
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO-3 is not exact here: DeepSpeed steps the sub-groups one "
    "at a time and this DeepSpeed does not expose the later sub-groups' gradients when the first is "
    "stepped, so the largest g-SNR over all blocks is not known when the first is updated. Use "
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
            state = optimizer.state[partition]
            flat = state.get("momentum_buffer")
            if stepping:
                first_scaling = not _any_scale(optimizer)
                later = _later_gradients(zero, i) if first_scaling else None
                if group["normalize"] == "max" and len(zero.fp16_groups) > 1 and later is None and first_scaling:
                    raise UnsupportedShardingError(_NORMALIZE_MAX_MESSAGE)
                self._check_world(state, world_size)
                state["step"] = state.get("step", 0) + 1
                if group["momentum"] != 0 and flat is None:
                    flat = state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
                if flat is not None and flat.shape != partition.shape:
                    raise UnsupportedShardingError(_LAYOUT_MISMATCH_MESSAGE.format(saved=tuple(flat.shape), now=tuple(partition.shape)))
            out.extend(self._pieces(optimizer, zero, i, group, partition.grad, state["step"] if stepping else state.get("step", 0)))
            if stepping and later:
                # The first scaling step: the sub-groups DeepSpeed steps after this one are measured
                # now too (their gradients are reduced already), so that every block's g-SNR is
                # known before any is updated: one reduction, and normalize="max" / degenerate
                # blocks get the largest g-SNR of all blocks. They are updated in their own call.
                factor, sources = later
                for j, grads in sources:
                    later_state = optimizer.state[zero.fp32_partitioned_groups_flat[j]]
                    self._check_world(later_state, world_size)
                    k = zero.sub_group_to_group_id[j]
                    step = later_state.get("step", 0) + 1
                    out.extend(
                        self._pieces(optimizer, zero, j, optimizer.param_groups[k], grads, step, factor=factor, scale_only=True)
                    )
        return out

    def _check_world(self, state: dict[str, Any], world_size: int) -> None:
        saved = state.setdefault("world_size", world_size)
        if saved != world_size:
            raise UnsupportedShardingError(_WORLD_SIZE_MESSAGE.format(saved=saved, now=world_size))

    def _pieces(
        self,
        optimizer: Any,
        zero: Any,
        i: int,
        group: Mapping[str, Any],
        grad: Tensor | list[Tensor] | None,
        step: int,
        factor: Any = None,
        scale_only: bool = False,
    ) -> list[Block]:
        """The blocks of sub-group ``i``. ``grad``: its gradient partition (``None``: none here), or
        the per-parameter pieces DeepSpeed has not flattened yet. ``scale_only``: measured now,
        updated when DeepSpeed steps the sub-group; its statistics are those of the gradient times
        ``factor`` (``None``: 1), as DeepSpeed will multiply it then (``Block.grad_factor``: no
        scaled copy of the gradient is made)."""
        _, world_size = world()
        count = int(zero._get_sub_group_partition_count(i))
        if count != world_size:
            raise UnsupportedShardingError(_PARTITION_GROUP_MESSAGE.format(index=i, count=count, world=world_size))
        rank = int(zero._get_sub_group_partition_rank(i))
        partition = zero.fp32_partitioned_groups_flat[i]
        state = optimizer.state[partition]
        entries = state.setdefault("blocks", {})
        flat = None if scale_only else state.get("momentum_buffer")
        out: list[Block] = []
        offset = 0
        for index, p in enumerate(zero.fp16_groups[i]):
            piece, numel = int(p.partition_numel()), int(p.ds_numel)
            valid = max(0, min(piece, numel - rank * piece))
            entry = entries.setdefault(index, {})
            slot = None if flat is None else flat.narrow(0, offset, valid)
            if grad is None or valid == 0:
                g = None
            elif isinstance(grad, list):  # DeepSpeed's reduced piece (its accumulation dtype: exact in fp32)
                g = grad[index].reshape(-1).narrow(0, 0, valid)
            else:
                g = grad.narrow(0, offset, valid)
            local = partition.narrow(0, offset, valid)
            out.append(self._block(p, numel, local, g, slot, entry, group, grad is not None, step, factor, scale_only))
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


def _later_gradients(zero: Any, i: int) -> tuple[Any, list[tuple[int, Tensor | list[Tensor]]]] | None:
    """``(factor, [(j, gradient of sub-group j)])`` for the sub-groups DeepSpeed steps after ``i`` in
    this step: their reduced gradients before DeepSpeed's ``unscale_and_clip_grads`` multiplies them by
    ``factor`` (:func:`~.deepspeed_zero.unscale_factor`), or ``None`` where this DeepSpeed does not expose them.

    Without offload they are the reduced per-parameter pieces in ``averaged_gradients[j]`` (flattened
    into the fp32 partition's gradient only when ``j`` is stepped); with ``offload_optimizer`` they are
    already in the CPU partitions' ``grad``. Only a missing attribute (another DeepSpeed version) or
    a missing norm where clipping applies makes it ``None``; nothing is caught, so an error while
    reading them propagates instead of turning into a refusal or a per-sub-group measurement."""
    needed = (
        "fp32_partitioned_groups_flat", "offload_optimizer", "fp16_groups", "loss_scale", "clip_grad", "_global_grad_norm",
    )  # fmt: skip
    if not all(hasattr(zero, name) for name in needed):
        return None
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "use_muon", False):
        return None
    if zero.clip_grad > 0.0 and zero._global_grad_norm is None:
        return None
    flats = zero.fp32_partitioned_groups_flat
    offload = bool(zero.offload_optimizer)
    averaged = None if offload else getattr(zero, "averaged_gradients", None)
    factor = unscale_factor(zero)
    out: list[tuple[int, Tensor | list[Tensor]]] = []
    for j in range(i + 1, len(flats)):
        if offload:
            raw: Tensor | list[Tensor] | None = flats[j].grad
        else:
            raw = averaged.get(j) if isinstance(averaged, Mapping) else None
            if raw is not None and len(raw) != len(zero.fp16_groups[j]):
                return None
        if raw is None:
            return None
        out.append((j, raw))
    return factor, out
