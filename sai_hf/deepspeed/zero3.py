"""DeepSpeed ZeRO stage 3 (and its CPU offload): where the blocks are in the stage-3 optimizer's fp32 sub-group
partitions (the sequence: :mod:`.partitions`).

Every trainable parameter ``b`` (a block, ``b.ds_numel`` entries, flattened) is cut on its own into one piece per
rank: rank ``r`` of the ``W`` ranks holds entries ``[r s, min((r + 1) s, n))`` of it, ``s = ceil(n / W)`` =
``b.partition_numel()``, padded with zeros to ``s``. DeepSpeed's stage-3 optimizer (``b._z3_optimizer``) concatenates
the pieces of a sub-group ``i`` of a parameter group (``fp16_groups[i]``, in group order) into one fp32 partition
``F_i = fp32_partitioned_groups_flat[i]`` and steps the wrapped optimizer once per sub-group with
``param_groups[k]["params"] = [F_i]`` (``k = sub_group_to_group_id[i]``), emptying it afterwards. Block ``j`` of
sub-group ``i`` is ``F_i[o_j : o_j + v_j]`` here, ``o_j`` the sum of the sub-group's earlier ``partition_numel()``,
``v_j = clamp(n_j - r s_j, 0, s_j)`` the entries that are not padding.

The later sub-groups' gradients at the first scaling step are DeepSpeed's reduced pieces (``averaged_gradients[j]``;
with offload, ``F_j.grad``), flattened into ``F_j.grad`` only when ``j`` is stepped. With ``offload_optimizer``
(``device: cpu``) ``F_i`` and its gradient live on the CPU and SGD-SaI steps there; with ``offload_param`` the model
pieces live on the CPU between uses; neither changes the layout.

Partition state also records ``world_size`` (the ranks it was cut for). Refused
(:class:`~sai_hf.sharding.base.UnsupportedShardingError`): ZeRO-3 model parameters handed to the optimizer themselves;
resuming at another world size; a partition group that is not every rank (hpZ, MiCS, expert or sequence parallel
groups); ``normalize="max"`` with several sub-groups where this DeepSpeed does not expose the later sub-groups'
gradients (NVMe swapping, Muon, another DeepSpeed version).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..sharding.base import Block, ParameterGroups, UnsupportedShardingError, world
from .partitions import Partitions, Piece, unexposed, unscale_factor

__all__ = ["Zero3Partitions", "DEEPSPEED_ZERO3_MESSAGE"]

DEEPSPEED_ZERO3_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) was handed DeepSpeed ZeRO stage 3 partitioned model parameters themselves "
    "(each rank holds only a piece of every tensor, and the optimizer cannot tell which): per-tensor g-SNR "
    "statistics would be wrong. Give the optimizer to deepspeed.initialize(model=..., optimizer=...) or to "
    "the Trainer with a ZeRO-3 config (configs/deepspeed/zero3.json): DeepSpeed's stage-3 optimizer then "
    "steps it on its fp32 partitions, which sai-hf maps back to the parameters exactly. Or use FSDP2."
)
_WORLD_SIZE_MESSAGE = (
    "SGD-SaI: this DeepSpeed ZeRO-3 checkpoint's optimizer state was saved with {saved} ranks and is "
    "resumed with {now}: every rank's partition of every parameter changed, so the momentum buffers no "
    "longer fit. Resume with {saved} ranks (the world size it was saved with), or start the optimizer "
    "afresh (load the model weights only: the scales are recomputed from the first gradient)."
)
_PARTITION_GROUP_MESSAGE = (
    "SGD-SaI under DeepSpeed ZeRO-3: sub-group {index} is partitioned over {count} of the {world} ranks "
    "(hpZ zero_hpz_partition_size, MiCS, expert or sequence parallelism): its g-SNR statistics would "
    "be summed over the wrong ranks. Use plain ZeRO-3 (configs/deepspeed/zero3.json) over one data-parallel group."
)


class Zero3Partitions(Partitions):
    """The fp32 sub-group partitions of DeepSpeed's stage-3 optimizer, found through the model's parameters
    (``_z3_optimizer``, linked when DeepSpeed wraps the optimizer); a ZeRO-3 model parameter itself is refused."""

    STATE_KEYS = frozenset({"blocks", "world_size"})
    STAGE, UNITS, ALTERNATIVE = "ZeRO-3", "sub-groups", " or FSDP2 (configs/accelerate/fsdp.yaml), where it is exact"

    def __init__(self, groups: ParameterGroups | None = None) -> None:
        super().__init__(groups)
        self._zero: Any = None

    def zero_optimizer(self) -> Any:
        """DeepSpeed's stage-3 optimizer that wraps this one (``None`` before it exists)."""
        if self._zero is None:
            added = self.groups.added
            self._zero = next((z for g in added for p in g if (z := getattr(p, "_z3_optimizer", None)) is not None), None)
        return self._zero

    def claims(self, param: Tensor) -> bool:
        """One of the stage-3 optimizer's fp32 sub-group partitions, or a ZeRO-3 parameter (to refuse it)."""
        if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
            return True
        zero = self.zero_optimizer()
        return zero is not None and any(param is f for f in zero.fp32_partitioned_groups_flat)

    # ------------------------------------------------------------------ the layout
    def index(self, partition: Tensor) -> int:
        """Index ``i`` of ``partition`` in ``fp32_partitioned_groups_flat``; anything else claimed is a ZeRO-3 model
        parameter, refused."""
        key = id(partition)
        if key not in self._index:
            zero = self.zero_optimizer()
            flats = zero.fp32_partitioned_groups_flat if zero is not None else []
            found = next((i for i, f in enumerate(flats) if f is partition), None)
            if found is None:
                raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)
            self._index[key] = found
        return self._index[key]

    def count(self) -> int:
        return len(self.zero_optimizer().fp16_groups)

    def check(self, optimizer: Any, state: dict[str, Any], stepping: bool) -> None:
        if stepping:
            _, world_size = world()
            saved = state.setdefault("world_size", world_size)
            if saved != world_size:
                raise UnsupportedShardingError(_WORLD_SIZE_MESSAGE.format(saved=saved, now=world_size))

    def layout(self, i: int, partition: Tensor) -> list[Piece]:
        zero = self.zero_optimizer()
        _, world_size = world()
        count = int(zero._get_sub_group_partition_count(i))
        if count != world_size:
            raise UnsupportedShardingError(_PARTITION_GROUP_MESSAGE.format(index=i, count=count, world=world_size))
        rank = int(zero._get_sub_group_partition_rank(i))
        out, offset = [], 0
        for p in zero.fp16_groups[i]:
            piece, numel = int(p.partition_numel()), int(p.ds_numel)
            out.append((p, numel, offset, max(0, min(piece, numel - rank * piece))))
            offset += piece
        if offset != partition.numel():
            raise UnsupportedShardingError(
                f"SGD-SaI: DeepSpeed ZeRO-3 sub-group {i} holds {partition.numel()} entries here, its parameters' "
                f"pieces {offset}: a layout sai-hf does not know (DeepSpeed version?)"
            )
        return out

    def later_partition(self, optimizer: Any, j: int) -> tuple[Tensor, Mapping[str, Any]]:
        zero = self.zero_optimizer()
        return zero.fp32_partitioned_groups_flat[j], optimizer.param_groups[zero.sub_group_to_group_id[j]]

    def piece_of(self, grads: list[Any], index: int, valid: int) -> Tensor | None:
        """DeepSpeed's reduced piece (its accumulation dtype: exact in fp32), without padding."""
        return grads[index].reshape(-1).narrow(0, 0, valid)

    def later_gradients(self, i: int) -> tuple[float | None, list[tuple[int, Any]]] | None:
        """Without offload, the reduced per-parameter pieces in ``averaged_gradients[j]``; with ``offload_optimizer``,
        the CPU partitions' ``grad``."""
        zero = self.zero_optimizer()
        self.unexposed = unexposed(zero, ("fp32_partitioned_groups_flat", "offload_optimizer", "fp16_groups"))
        if self.unexposed is not None:
            return None
        flats = zero.fp32_partitioned_groups_flat
        offload = bool(zero.offload_optimizer)
        averaged = None if offload else getattr(zero, "averaged_gradients", None)
        factor = unscale_factor(zero)
        out: list[tuple[int, Any]] = []
        for j in range(i + 1, len(flats)):
            if offload:
                raw: Any = flats[j].grad
            else:
                raw = averaged.get(j) if isinstance(averaged, Mapping) else None
                if raw is not None and len(raw) != len(zero.fp16_groups[j]):
                    raw = None
            if raw is None:
                self.unexposed = f"no reduced gradient of sub-group {j}"
                return None
            out.append((j, raw))
        return factor, out

    def resting_blocks(self, optimizer: Any, groups: Sequence[Mapping[str, Any]], present: set[int]) -> list[Block]:
        """Between steps DeepSpeed empties ``param_groups[k]["params"]``: the blocks of every sub-group partition not
        in ``groups``, in sub-group order (the same on every rank)."""
        zero = self.zero_optimizer()
        if zero is None:
            return []
        out: list[Block] = []
        for i, partition in enumerate(zero.fp32_partitioned_groups_flat):
            k = zero.sub_group_to_group_id.get(i)
            if id(partition) in present or k is None or k >= len(groups):
                continue
            self._index.setdefault(id(partition), i)
            out.extend(self.blocks(optimizer, groups[k], [partition], stepping=False))
        return out
