"""DeepSpeed ZeRO stage 1 and 2: where the blocks are in the flat partitions (the sequence: :mod:`.partitions`).

For every parameter group ``k`` DeepSpeed concatenates the group's trainable parameters (the blocks) into one flat
buffer, pads it to a multiple of the world size, cuts it into one contiguous partition per rank and replaces
``param_groups[k]["params"]`` by this rank's fp32 partition ``P_k``. Each block's entries form at most one contiguous
fragment of ``P_k`` on a rank, which DeepSpeed records on the model parameter as
``param._hp_mapping.hp_fragment_address`` (``start``, ``numel`` inside ``P_k``; ``_hp_mapping`` is ``None`` where the
block has no entries here).

The later groups' gradients at the first scaling step are DeepSpeed's own per-parameter fragments
(``_hp_mapping.get_lp_grad_fragment``, what ``safe_get_full_grad`` reads; with ``offload_optimizer``, views of the CPU
partitions' gradients). They need DeepSpeed's optimizer, which the parameters do not reveal:
:func:`sai_hf.deepspeed.find_zero_optimizer` finds it among the optimizer's wrappers (:func:`sai_hf.register_sharded_model`;
the Trainer's callback calls it).

Group indices: DeepSpeed's engine drops the optimizer's empty parameter groups before wrapping it (the Trainer's
no-weight-decay group is empty under PEFT LoRA), so its group ``k`` is the ``k``-th *non-empty* group as constructed.
A group whose parameters are all frozen is kept (its partition is padding only, and it has no blocks). Resuming at
another world size: the momentum buffer does not fit the partition, which is refused at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..sharding.base import ParameterGroups, UnsupportedShardingError
from .partitions import NORMALIZE_MAX_MESSAGE, Partitions, Piece, unexposed, unscale_factor

__all__ = ["ZeroFragments"]

_GROUP_COUNT_MESSAGE = (
    "SGD-SaI under DeepSpeed ZeRO-1/2: the optimizer was constructed with {constructed} non-empty parameter "
    "groups, DeepSpeed steps {stepped}: sai-hf cannot tell which of DeepSpeed's flat partitions holds which "
    "group (were parameter groups added or removed after deepspeed.initialize?). Build the optimizer with "
    "its final groups before handing it to DeepSpeed."
)


class ZeroFragments(Partitions):
    """The flat partitions DeepSpeed ZeRO-1/2 put in place of the model's parameters (linked, ``_hp_mapping``, when
    DeepSpeed wraps the optimizer)."""

    STATE_KEYS = frozenset({"blocks", "gsnr_max"})  # gsnr_max: written by sai-hf 0.1.0 checkpoints
    STAGE, UNITS, ALTERNATIVE = "ZeRO-1/2", "parameter groups", ", or put every trainable parameter in one group"

    def __init__(self, groups: ParameterGroups | None = None) -> None:
        super().__init__(groups)
        self._linked: list[list[Tensor]] | None = None
        self.zero: Any = None  # DeepSpeed's ZeRO-1/2 optimizer, once found (:func:`sai_hf.deepspeed.find_zero_optimizer`)

    def linked(self) -> list[list[Tensor]] | None:
        """The linked model parameters of each of DeepSpeed's groups, once DeepSpeed has linked them."""
        added = self.groups.added
        if self._linked is None and any(hasattr(p, "_hp_mapping") for g in added for p in g):
            self._linked = [[p for p in group if hasattr(p, "_hp_mapping")] for group in added if len(group)]
        return self._linked

    def claims(self, param: Tensor) -> bool:
        """A tensor that is not one of the model's parameters, once DeepSpeed linked them to partitions."""
        return self.linked() is not None and not any(p is param for g in self.groups.added for p in g)

    # ------------------------------------------------------------------ the layout
    def index(self, partition: Tensor) -> int:
        """Index ``k`` of the group whose partition is ``partition`` (a partition that holds only padding here is the
        one group that no fragment locates)."""
        key = id(partition)
        if key not in self._index:
            found = self._located(partition)
            if found is None:
                located = set(self._index.values())
                unlocated = [k for k in range(len(self.linked() or [])) if k not in located]
                if len(unlocated) != 1:
                    raise RuntimeError("SGD-SaI: cannot tell which DeepSpeed parameter group a partition belongs to")
                found = unlocated[0]
            self._index[key] = found
        return self._index[key]

    def _located(self, partition: Tensor) -> int | None:
        """The group one of whose blocks has a fragment in ``partition`` (same storage), if any."""
        ptr = partition.untyped_storage().data_ptr()
        for k, blocks in enumerate(self.linked() or []):
            if any(p._hp_mapping is not None and p._hp_mapping.hp_fragment.untyped_storage().data_ptr() == ptr for p in blocks):
                return k
        return None

    def count(self) -> int:
        return len(self.linked() or [])

    def check(self, optimizer: Any, state: dict[str, Any], stepping: bool) -> None:
        stepped = len(self.groups.every(optimizer.param_groups))
        if self.count() and self.count() != stepped:
            raise UnsupportedShardingError(_GROUP_COUNT_MESSAGE.format(constructed=self.count(), stepped=stepped))
        state.setdefault("step", 0)

    def layout(self, k: int, partition: Tensor) -> list[Piece]:
        out = []
        for p in (self.linked() or [])[k]:
            mapping = p._hp_mapping
            if mapping is None:  # no fragment of this block on this rank
                out.append((p, int(p.numel()), 0, 0))
            else:
                address = mapping.hp_fragment_address
                out.append((p, int(p.numel()), int(address.start), int(address.numel)))
        return out

    def later_partition(self, optimizer: Any, j: int) -> tuple[Tensor, Mapping[str, Any]]:
        return self.zero.single_partition_of_fp32_groups[j], self.groups.every(optimizer.param_groups)[j]

    def piece_of(self, grads: list[Any], index: int, valid: int) -> Tensor | None:
        return grads[index]

    def later_gradients(self, k: int) -> tuple[float | None, list[tuple[int, Any]]] | None:
        """Each later group's blocks' gradient fragments: ``p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)``,
        flattened (the block's reduced entries of this rank's partition in DeepSpeed's accumulation dtype, which it
        casts to the fp32 partition's gradient exactly; where DeepSpeed keeps the whole gradient, the fragment's range
        of it). ``None`` also where DeepSpeed's optimizer is not registered."""
        blocks = self.linked()
        if self.zero is None or blocks is None:
            return None
        self.unexposed = _unexposed(self.zero, [p for group in blocks[k + 1 :] for p in group])
        if self.unexposed is not None:
            return None
        factor = unscale_factor(self.zero)
        partitions = self.zero.single_partition_of_fp32_groups
        if len(partitions) != len(blocks):
            raise UnsupportedShardingError(_GROUP_COUNT_MESSAGE.format(constructed=len(blocks), stepped=len(partitions)))
        out: list[tuple[int, Any]] = []
        for j in range(k + 1, len(blocks)):
            fragments: list[Tensor | None] = []
            for p in blocks[j]:
                mapping = p._hp_mapping
                if mapping is None:
                    fragments.append(None)
                    continue
                g = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
                numel = int(mapping.hp_fragment_address.numel)
                if g.numel() != numel:
                    g = g.narrow(0, int(mapping.lp_fragment_address.start), numel)
                fragments.append(g)
            out.append((j, fragments))
        return factor, out

    def normalize_max_refusal(self) -> str:
        if self.zero is not None:
            return super().normalize_max_refusal()
        return NORMALIZE_MAX_MESSAGE.format(
            stage=self.STAGE, count=self.count(), units=self.UNITS, why="sai-hf has not found DeepSpeed's optimizer",
            advice="Register DeepSpeed's optimizer (the Trainer's GSNRCallback does it; plain DeepSpeed: "
            "sai_hf.register_sharded_model(model, engine.optimizer) before the first step), or use", alternative="",
        )  # fmt: skip


def _unexposed(zero: Any, later: Sequence[Tensor]) -> str | None:
    """:func:`~.partitions.unexposed`, and what the ``later`` groups' blocks lack for reading their gradient fragments."""
    missing = unexposed(zero, ("single_partition_of_fp32_groups",))
    if missing is not None:
        return missing
    for p in later:
        mapping = p._hp_mapping
        if mapping is None:
            continue
        if not hasattr(p, "_index_in_param_group"):
            return "no _index_in_param_group on the parameters"
        for name in ("get_lp_grad_fragment", "hp_fragment_address", "lp_fragment_address"):
            if not hasattr(mapping, name):
                return f"no {type(mapping).__name__}.{name}"
    return None
