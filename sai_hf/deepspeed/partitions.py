"""What DeepSpeed ZeRO-1, 2 and 3 share: blocks are the model parameters' pieces in flat fp32 partitions, which
DeepSpeed steps one at a time. One sequence for every stage (:class:`Partitions`); each stage says where the pieces
are (:mod:`.zero12`, :mod:`.zero3`).

DeepSpeed replaces the optimizer's parameters by flat fp32 *partitions* ``P_i`` (one per parameter group under
ZeRO-1/2, per sub-group under ZeRO-3) and calls the optimizer's ``step`` once per partition, with ``param_groups``
narrowed to the one it steps. Block ``b`` of partition ``i`` is ``P_i[o_b : o_b + v_b]`` on this rank (``v_b = 0``: no
entries here, a zero statistics row); the same range of ``P_i.grad`` and of the partition's momentum buffer. The
ranks hold disjoint pieces, so every rank's row counts.

* **Steps** are counted per partition (``step``), and a block's ``scaled_at`` is the step it got its scale in: "deferred
  blocks drop eps" holds from the step after the first scaling step, as in one process, although one step is several
  calls.
* **The first scaling step** (no block has a scale yet): the call for the first partition also measures every later
  partition of the step (:meth:`Partitions.measured_ahead`), from the gradients DeepSpeed has already reduced, their
  statistics scaled by the factor DeepSpeed's ``unscale_and_clip_grads`` applies later (:func:`unscale_factor`; no
  copy of a gradient is made). One reduction of all blocks: ``normalize="max"`` and degenerate blocks get the largest
  g-SNR of all blocks, as in one process. Those blocks are updated in their own partition's call. Where DeepSpeed
  does not expose them, each partition is measured in its own call, and ``normalize="max"`` is refused.
* **Buffers**: one momentum buffer like ``P_i`` (absent with ``momentum=0``), zero where no block was updated yet; a
  block's first update (``m_1 = g_1``) is copied into its range.

State of ``P_i`` (``optimizer.state[P_i]``, saved per rank in DeepSpeed's checkpoint)::

    momentum_buffer   tensor like P_i (absent with momentum=0)
    step              optimizer steps taken by this partition
    blocks            {index of the block in its partition: {"gsnr", "scale", "gsnr_eps_free", "scaled_at", "step"}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..gsnr import present_statistics, scaled_statistics
from ..sharding.base import Block, ParameterGroups, Placement, ShardingBackend, UnsupportedShardingError

__all__ = ["Partitions", "Piece", "unexposed", "unscale_factor", "NORMALIZE_MAX_MESSAGE"]

#: ``(model parameter, its numel, its offset in the partition here, its entries here)``.
Piece = tuple[Tensor, int, int, int]

NORMALIZE_MAX_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed {stage} with {count} {units} is not exact here: DeepSpeed steps the "
    "{units} one at a time, and {why}, so the largest g-SNR over all blocks is not known when the first is updated. "
    "{advice} normalize='none' (the default; multiply the learning rate by the largest first-step g-SNR, gsnr_max in "
    "gsnr.json, for the same run){alternative}."
)
_LAYOUT_MISMATCH_MESSAGE = (
    "SGD-SaI: the momentum buffer restored for a DeepSpeed {stage} partition has shape {saved}, the partition {now}: "
    "the checkpoint was saved with another world size, parameter grouping or sub_group_size. Resume with the "
    "configuration it was saved with, or start the optimizer afresh (load the model weights only)."
)


class Partitions(ShardingBackend):
    """The flat partitions of one DeepSpeed stage: the sequence of a call (:meth:`blocks`, :meth:`measured_ahead`,
    :meth:`keep_buffer`, the end of the call), over a stage's layout (the methods below ``layout``)."""

    STAGE = ""  # "ZeRO-1/2", "ZeRO-3"
    UNITS = ""  # what DeepSpeed steps one at a time
    ALTERNATIVE = ""  # the other way out of the normalize="max" refusal

    def __init__(self, groups: ParameterGroups | None = None) -> None:
        self.groups = groups or ParameterGroups()
        self._index: dict[int, int] = {}  # id(partition) -> its index
        self._steps: dict[int, int] = {}  # id(block state) -> the step its last call counted
        self._stepped: tuple[int, Mapping[str, Any]] | None = None  # the partition of this call, and its group
        self._slots: dict[int, Tensor] = {}  # id(block state) -> its range of the momentum buffer, for this call
        self._unscaled: list[tuple[dict[str, Any], int]] = []  # blocks of this call without a scale, and the step
        self._hook: Any = None
        self.unexposed: str | None = None  # why the later partitions' gradients could not be read, once tried

    # ------------------------------------------------------------------ a stage's layout
    def index(self, partition: Tensor) -> int:  # its index among DeepSpeed's partitions (refusing what it cannot map)
        raise NotImplementedError

    def count(self) -> int:  # how many partitions DeepSpeed steps, one call each
        raise NotImplementedError

    def layout(self, i: int, partition: Tensor) -> list[Piece]:  # partition i's blocks here, the same order everywhere
        raise NotImplementedError

    def check(self, optimizer: Any, state: dict[str, Any], stepping: bool) -> None:  # refuse a state it cannot continue
        """(Another world size or grouping.)"""

    def later_gradients(self, i: int) -> tuple[float | None, list[tuple[int, Any]]] | None:
        """``(factor, [(j, gradient of partition j)])`` for the partitions DeepSpeed steps after ``i`` in this step,
        before it multiplies them by ``factor`` (:func:`unscale_factor`); ``None`` where it does not expose them (why:
        ``unexposed``). A gradient is a flat tensor like the partition, or a list of per-block ones (:meth:`piece_of`).
        Nothing is caught: an error while reading them propagates instead of turning into a refusal."""
        raise NotImplementedError

    def piece_of(self, grads: list[Any], index: int, valid: int) -> Tensor | None:  # block index's entries in grads
        raise NotImplementedError

    def later_partition(self, optimizer: Any, j: int) -> tuple[Tensor, Mapping[str, Any]]:  # partition j, its group
        raise NotImplementedError

    def normalize_max_refusal(self) -> str:
        """The refusal of ``normalize="max"`` where the later partitions could not be measured ahead."""
        return NORMALIZE_MAX_MESSAGE.format(
            stage=self.STAGE, count=self.count(), units=self.UNITS, advice="Use", alternative=self.ALTERNATIVE,
            why=f"this DeepSpeed does not expose the later {self.UNITS}' gradients when the first is stepped ({self.unexposed})",
        )  # fmt: skip

    # ------------------------------------------------------------------ ShardingBackend
    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        out: list[Block] = []
        for partition in params:
            i = self.index(partition)
            state = optimizer.state[partition]
            self.check(optimizer, state, stepping)
            if stepping:
                self._begin_call(optimizer, group, partition, state)
                self._stepped = (i, group)
            out.extend(self._blocks_of(i, group, partition, state, partition.grad, state.get("step", 0), stepping))
        return out

    def _begin_call(self, optimizer: Any, group: Mapping[str, Any], partition: Tensor, state: dict[str, Any]) -> None:
        """Count the partition's step; its momentum buffer, allocated at the first."""
        if self._hook is None:
            self._hook = optimizer.register_step_post_hook(self._end_call)
        state["step"] = state.get("step", 0) + 1
        flat = state.get("momentum_buffer")
        if group["momentum"] != 0 and flat is None:
            state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
        elif flat is not None and flat.shape != partition.shape:
            raise UnsupportedShardingError(
                _LAYOUT_MISMATCH_MESSAGE.format(stage=self.STAGE, saved=tuple(flat.shape), now=tuple(partition.shape))
            )

    def _blocks_of(
        self, i: int, group: Mapping[str, Any], partition: Tensor, state: dict[str, Any],
        grad: Tensor | list[Any] | None, step: int, stepping: bool, ahead: bool = False,
    ) -> list[Block]:  # fmt: skip
        """The blocks of partition ``i``. ``grad``: the partition's gradient (``None``: none here), or per-block
        gradients (:meth:`later_gradients`). ``ahead``: measured now, updated in the partition's own call."""
        entries = state.setdefault("blocks", {})
        flat = None if ahead else state.get("momentum_buffer")
        out: list[Block] = []
        for index, (p, numel, start, valid) in enumerate(self.layout(i, partition)):
            entry = entries.setdefault(index, {})
            if grad is None or valid == 0:
                g = None
            elif isinstance(grad, list):
                g = self.piece_of(grad, index, valid)
            else:
                g = grad.narrow(0, start, valid)
            slot = None if flat is None else flat.narrow(0, start, valid)
            self._steps[id(entry)] = step
            if stepping:
                if slot is not None:
                    self._slots[id(entry)] = slot
                if "scale" not in entry:
                    self._unscaled.append((entry, step))
            out.append(Block(
                param=p, local=partition.narrow(0, start, valid), grad=g,
                buffer=slot if entry.get("step", 0) > 0 else None, state=entry, group=group,
                placement=Placement(sharded=True, contributes=True, numel=numel), backend=self,
                may_lack_gradient=grad is not None,
            ))  # fmt: skip
        return out

    def measured_ahead(self, optimizer: Any, blocks: Sequence[Block]) -> tuple[list[Block], Tensor | None]:
        """At the first scaling step, the blocks of the partitions DeepSpeed steps after this call's, and their
        statistics rows scaled by DeepSpeed's later factor (``[n, c S, c S', c^2 C, c^2 P]``)."""
        stepped, self._stepped = self._stepped, None
        if stepped is None or self.count() <= 1 or _any_scale(optimizer):
            return [], None
        i, group = stepped
        later = self.later_gradients(i)
        if later is None:
            if group["normalize"] == "max":
                raise UnsupportedShardingError(self.normalize_max_refusal())
            return [], None
        factor, sources = later
        ahead: list[Block] = []
        for j, grads in sources:
            partition, later_group = self.later_partition(optimizer, j)
            state = optimizer.state[partition]
            self.check(optimizer, state, True)
            ahead.extend(self._blocks_of(j, later_group, partition, state, grads, state.get("step", 0) + 1, True, ahead=True))
        if not ahead:
            return [], None
        rows = present_statistics([b.grad for b in ahead], ahead[0].local.device)
        return ahead, scaled_statistics(rows, factor)

    def keep_buffer(self, block: Block, local: Tensor) -> None:
        """The first update's ``m_1 = g_1`` goes into the block's range of the partition's momentum buffer."""
        self._slots[id(block.state)].copy_(local)

    def _end_call(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """After each call (a step post-hook): a block scaled in it records the step as ``scaled_at``."""
        for entry, step in self._unscaled:
            if "scale" in entry:
                entry["scaled_at"] = step
        self._unscaled.clear()
        self._slots.clear()

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether a block of any partition was scaled in an earlier step than this one (the partitions of one step
        are stepped in separate calls)."""
        now = max((self._steps.get(id(b.state), 0) for b in blocks if b.backend is self), default=0)
        return any(
            entry.get("scaled_at", now) < now
            for state in optimizer.state.values()
            for entry in state.get("blocks", {}).values()
            if "scale" in entry
        )


def _any_scale(optimizer: Any) -> bool:
    """Whether some block of some partition has its scale (the same answer on every rank)."""
    return any("scale" in entry for state in optimizer.state.values() for entry in state.get("blocks", {}).values())


def unexposed(zero: Any, needed: Sequence[str]) -> str | None:
    """What DeepSpeed's optimizer ``zero`` lacks for measuring the later partitions ahead (``None``: nothing): Muon
    (its update is not a gradient), NVMe swapping, an attribute (of ``needed``, or :func:`unscale_factor`'s) another
    DeepSpeed version does not have, or the gradient norm where clipping applies."""
    if getattr(zero, "use_muon", False):
        return "Muon"
    if getattr(zero, "swap_optimizer", False):
        return "NVMe swapping"
    for name in (*needed, "loss_scale", "clip_grad", "_global_grad_norm"):
        if not hasattr(zero, name):
            return f"no {type(zero).__name__}.{name}"
    if zero.clip_grad > 0.0 and zero._global_grad_norm is None:
        return "gradient clipping without a global gradient norm"
    return None


def unscale_factor(zero: Any) -> float | None:
    """The factor DeepSpeed's ``unscale_and_clip_grads`` multiplies this step's gradients by, ``None`` for 1, from its
    own operands (every stage)::

        combined = loss_scale * max(1, (total_norm / loss_scale + 1e-6) / clip_grad)   (clip_grad > 0)
        combined = loss_scale                                                          (otherwise)
        factor   = 1 / combined

    ``total_norm / loss_scale`` is DeepSpeed's ``_global_grad_norm`` of this step. A 0-d tensor where clipping
    applies: one host sync, at the first scaling step only."""
    combined: Any = zero.loss_scale
    if zero.clip_grad > 0.0:
        clip = torch.clamp(torch.as_tensor((zero._global_grad_norm + 1e-6) / zero.clip_grad), min=1.0)
        combined = clip * zero.loss_scale
    factor = float(1.0 / combined)
    return None if factor == 1.0 else factor
