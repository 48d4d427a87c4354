"""DeepSpeed ZeRO stage 1 and 2: blocks are fragments of DeepSpeed's flat fp32 partitions.

Under ZeRO-1/2 the optimizer that DeepSpeed wraps no longer holds the model's tensors: for every
parameter group ``k`` DeepSpeed concatenates the group's trainable parameters (the *blocks*
``b_1, b_2, ...``) into one flat buffer, pads it to a multiple of the world size, cuts it into one
contiguous *partition* per rank and replaces ``param_groups[k]["params"]`` by this rank's fp32
partition ``P_k``. Each block's entries form at most one contiguous *fragment* of ``P_k`` on a
rank; DeepSpeed records it on the model parameter as ``param._hp_mapping.hp_fragment_address``
(``start``, ``numel`` inside ``P_k``). A block's local views are ``P_k[start : start + numel]`` (and
the same range of its gradient and of the momentum buffer); a block with no fragment on this rank
has no local gradient and joins the reduction with a zero row. The partitions are disjoint, so
every rank's row counts.

DeepSpeed steps the groups one at a time (``_optimizer_step`` narrows ``param_groups`` to group
``k``; the gradient of group ``k + 1`` does not exist yet). So:

* "deferred blocks drop eps" is decided from the partitions' step counters (``scaled_at``), as in
  one process;
* ``normalize="max"`` with more than one group would divide the first groups' scales by a partial
  maximum: refused.

State of partition ``P_k`` (``optimizer.state[P_k]``, saved per rank in DeepSpeed's checkpoint)::

    momentum_buffer   tensor like P_k (absent with momentum=0); zero where no fragment was updated yet
    step              optimizer steps taken by this partition
    blocks            {index of the block in its group: {"gsnr", "scale", "gsnr_eps_free",
                       "scaled_at", "step"}}    (every block of the group, on every rank)

Resuming at the same world size continues bit-exactly; at another world size the momentum buffer
does not fit the partition, which is refused at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Block, Placement, ShardingBackend, UnsupportedShardingError
from .deepspeed_config import DEEPSPEED_ZERO3_MESSAGE, refuse_unsupported_deepspeed

__all__ = ["ZeroFragments", "Zero3Parameters"]

_LAYOUT_MISMATCH_MESSAGE = (
    "SGD-SaI: the momentum buffer restored for a DeepSpeed partition has shape {saved}, the partition "
    "{now}: the checkpoint was saved with another world size (or parameter grouping). Resuming "
    "SGD-SaI from a ZeRO checkpoint is supported at the same world size only: resume with the world "
    "size it was saved with, or start the optimizer afresh (load the model weights only)."
)
_NORMALIZE_MAX_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO-1/2 with {groups} parameter groups is not exact: "
    "DeepSpeed steps the groups one at a time, so the largest g-SNR over all blocks is not known when the "
    "first group is updated (the Trainer always builds two groups: with and without weight decay). Use "
    "normalize='none' (the default; multiply the learning rate by the largest first-step g-SNR, "
    "gsnr_max in gsnr.json, for the same run) or FSDP2 (configs/accelerate/fsdp.yaml), where it is exact."
)


class ZeroFragments(ShardingBackend):
    """The flat partitions DeepSpeed ZeRO-1/2 put in place of the model's parameters.

    ``model_groups``: the optimizer's parameter groups as constructed (the model's parameters, in
    DeepSpeed's order); DeepSpeed links exactly the trainable ones (``_hp_mapping``) when it wraps
    the optimizer."""

    STATE_KEYS = frozenset({"blocks", "gsnr_max"})  # gsnr_max: written by sai-hf 0.1.0 checkpoints

    def __init__(self, model_groups: Sequence[Sequence[Tensor]] = ()) -> None:
        self.model_groups = model_groups
        self._blocks: list[list[Tensor]] | None = None
        self._group_of_partition: dict[int, int] = {}

    def _linked_blocks(self) -> list[list[Tensor]] | None:
        """Each group's linked model parameters, once DeepSpeed has linked them."""
        if self._blocks is None and any(hasattr(p, "_hp_mapping") for g in self.model_groups for p in g):
            self._blocks = [[p for p in group if hasattr(p, "_hp_mapping")] for group in self.model_groups]
        return self._blocks

    def claims(self, param: Tensor) -> bool:
        """A tensor that is not one of the model's parameters, once DeepSpeed linked them to partitions."""
        return self._linked_blocks() is not None and not any(p is param for g in self.model_groups for p in g)

    # ------------------------------------------------------------------ where the fragments are
    def group_index(self, partition: Tensor) -> int:
        """Index ``k`` of the parameter group whose partition is ``partition`` (a partition that
        holds only padding here is the one group that no fragment locates)."""
        key = id(partition)
        if key not in self._group_of_partition:
            found = self._located_group(partition)
            if found is None:
                located = set(self._group_of_partition.values())
                unlocated = [k for k in range(len(self._blocks or [])) if k not in located]
                if len(unlocated) != 1:
                    raise RuntimeError("SGD-SaI: cannot tell which DeepSpeed parameter group a partition belongs to")
                found = unlocated[0]
            self._group_of_partition[key] = found
        return self._group_of_partition[key]

    def _located_group(self, partition: Tensor) -> int | None:
        """The group one of whose blocks has a fragment in ``partition`` (same storage), if any."""
        ptr = partition.untyped_storage().data_ptr()
        for k, blocks in enumerate(self._blocks or []):
            if any(p._hp_mapping is not None and p._hp_mapping.hp_fragment.untyped_storage().data_ptr() == ptr for p in blocks):
                return k
        return None

    # ------------------------------------------------------------------ ShardingBackend
    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        model_blocks = self._linked_blocks() or []
        out: list[Block] = []
        for partition in params:
            k = self.group_index(partition)
            state = optimizer.state[partition]
            state.setdefault("step", 0)
            entries = state.setdefault("blocks", {})
            flat = state.get("momentum_buffer")
            if stepping:
                if group["normalize"] == "max" and len(model_blocks) > 1:
                    raise UnsupportedShardingError(_NORMALIZE_MAX_MESSAGE.format(groups=len(model_blocks)))
                state["step"] += 1
                if group["momentum"] != 0 and flat is None:
                    flat = state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
                if flat is not None and flat.shape != partition.shape:
                    raise UnsupportedShardingError(
                        _LAYOUT_MISMATCH_MESSAGE.format(saved=tuple(flat.shape), now=tuple(partition.shape))
                    )
            for index, p in enumerate(model_blocks[k]):
                entry = entries.setdefault(index, {})
                mapping = p._hp_mapping
                if mapping is None:  # no fragment of this block on this rank
                    local, grad, buffer, slot = partition.narrow(0, 0, 0), None, None, None
                else:
                    start, numel = int(mapping.hp_fragment_address.start), int(mapping.hp_fragment_address.numel)
                    local = partition.narrow(0, start, numel)
                    grad = None if partition.grad is None else partition.grad.narrow(0, start, numel)
                    slot = None if flat is None else flat.narrow(0, start, numel)
                    buffer = slot if entry.get("step", 0) > 0 else None
                out.append(
                    Block(
                        param=p,
                        local=local,
                        grad=grad,
                        buffer=buffer,
                        state=entry,
                        group=group,
                        placement=Placement(sharded=True, contributes=True, numel=int(p.numel())),
                        backend=self,
                        may_lack_gradient=partition.grad is not None,
                        buffer_slot=slot,
                        step_index=state["step"],
                    )
                )
        return out

    def keep_buffer(self, block: Block, local: Tensor) -> None:
        """The first update's ``m_1 = g_1`` goes into the block's range of the flat buffer."""
        block.buffer_slot.copy_(local)  # type: ignore[union-attr]

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether a block of any partition was scaled in an earlier step than this one (the groups
        of one step are stepped in separate calls)."""
        now = max((b.step_index or 0 for b in blocks), default=0)
        return any(
            entry.get("scaled_at", now) < now
            for state in optimizer.state.values()
            for entry in state.get("blocks", {}).values()
            if "scale" in entry
        )

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """ZeRO-3, offload and a DeepSpeed ``optimizer`` section (:mod:`.deepspeed_config`)."""
        refuse_unsupported_deepspeed(args)


class Zero3Parameters(ShardingBackend):
    """A ZeRO-3 parameter (``ds_id`` / ``ds_tensor``: partitioned before the optimizer exists):
    claimed only to be refused, in one process too."""

    def claims(self, param: Tensor) -> bool:
        return hasattr(param, "ds_id") or hasattr(param, "ds_tensor")

    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)
