"""The one sharding interface: where each block's entries live on this rank, and how its statistics
combine across ranks.

SGD-SaI's scale of a block is a function of the whole block's gradient, computed from additive
statistics (:mod:`sai_hf.gsnr`): for any partition of a block's entries into disjoint pieces, the
whole block's statistics row is the element-wise sum of the pieces' rows. A
:class:`ShardingBackend` therefore answers, for the optimizer parameters it claims:

* **which blocks** they hold, and for each a :class:`Block`: the model parameter it is, this rank's
  local views of its parameter, gradient and momentum entries, and its state;
* **how its statistics combine** (:class:`Placement`): whether this rank's piece is part of the block
  (sharded), whether its row counts in the cross-rank sum (replicas count once), the whole numel.

:class:`ExactReducer` sums the rows of all blocks being scaled, from every backend, with one
``all_reduce`` after the ranks agreed on the list of blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..gsnr import STATISTICS_WIDTH

__all__ = ["UnsupportedShardingError", "Placement", "Block", "ParameterGroups", "ShardingBackend", "ExactReducer", "world"]

# Fingerprint of the block list: values below 2**16, so a sum of squares over up to 2**21 ranks is
# still an exact float64 integer.
_FINGERPRINT_MODULUS = 65521


class UnsupportedShardingError(RuntimeError):
    """The parameters are distributed in a way that does not allow exact per-tensor g-SNR."""


@dataclass(frozen=True)
class Placement:
    """How one block is spread over the ranks, as one rank sees it."""

    sharded: bool  # this rank's local piece is a part of the block (not all of it)
    contributes: bool  # this rank's statistics row is counted in the cross-rank sum
    numel: int  # elements of the whole block (the same on every rank)


@dataclass
class Block:
    """One block (one tensor of the model) as this rank sees it: ``local``, ``grad`` and ``buffer`` are plain tensors,
    this rank's entries of the parameter, its gradient (``None``: no entries here now) and its momentum (``None`` before
    the block's first update); ``state`` its SGD-SaI state (``gsnr``, ``scale``, ``gsnr_eps_free``, ``step``).
    ``may_lack_gradient``: ``grad`` may be ``None`` here while other ranks hold entries of it, so the block joins
    every reduction until it has its scale."""

    param: Tensor
    local: Tensor
    grad: Tensor | None
    buffer: Tensor | None
    state: dict[str, Any]
    group: Mapping[str, Any]
    placement: Placement
    backend: ShardingBackend
    may_lack_gradient: bool = False


class ParameterGroups:
    """Every parameter group of one optimizer: the parameters each held when added (a wrapper may replace them:
    DeepSpeed's flat partitions), and the groups themselves, also while a wrapper has narrowed ``param_groups`` to
    the one it steps (DeepSpeed ZeRO-1/2)."""

    def __init__(self) -> None:
        self.added: list[list[Tensor]] = []
        self._every: list[dict[str, Any]] = []

    def add(self, group: Mapping[str, Any]) -> None:
        self.added.append(list(group["params"]))

    def bind(self, param_groups: list[dict[str, Any]]) -> None:
        """Take ``param_groups`` (the optimizer's list, as built or loaded) as every group."""
        self._every = param_groups

    def every(self, current: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every group, given the optimizer's ``param_groups`` now (a list of new groups replaces the known ones)."""
        if not all(any(g is h for h in self._every) for g in current):
            self._every = current
        return self._every


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised default process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardingBackend:
    """How one kind of optimizer parameter is laid out across ranks. One instance per optimizer (it may hold state:
    FSDP1's registered views). The first backend of :data:`sai_hf.sharding.BACKENDS` that claims a parameter answers
    for it."""

    #: Keys this backend adds to ``optimizer.state`` entries besides the per-block ones.
    STATE_KEYS: frozenset[str] = frozenset()

    def __init__(self, groups: ParameterGroups | None = None) -> None:
        """``groups``: the optimizer's parameter groups (:class:`ParameterGroups`)."""

    def claims(self, param: Tensor) -> bool:
        """Whether this backend answers for optimizer parameter ``param``."""
        raise NotImplementedError

    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        """The blocks held by ``params`` (claimed parameters of ``group``), in a fixed order that is the same on every
        rank. ``stepping``: called for an optimizer step (not a report). Raises :class:`UnsupportedShardingError` for
        a layout without exact per-tensor statistics."""
        raise NotImplementedError

    def resting_blocks(self, optimizer: Any, groups: Sequence[Mapping[str, Any]], present: set[int]) -> list[Block]:
        """Blocks of parameters a wrapper keeps out of ``groups`` between its steps, for reports made outside a step;
        ``present``: ids of the parameters now in ``groups``."""
        return []

    def measured_ahead(self, optimizer: Any, blocks: Sequence[Block]) -> tuple[list[Block], Tensor | None]:
        """Blocks that later calls of this optimizer step update, to be scaled with ``blocks`` now, and their
        statistics rows (whole-block-piece rows as :func:`sai_hf.gsnr.gradient_statistics`); ``([], None)``: none."""
        return [], None

    def keep_buffer(self, block: Block, local: Tensor) -> None:
        """Store ``local``, the momentum buffer the block's first update created."""
        raise NotImplementedError

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether some block got its scale in an earlier optimizer step than the current one."""
        return any("scale" in b.state for b in blocks)

    def register(self, model: torch.nn.Module) -> int:
        """Learn from ``model`` what the parameters cannot tell (FSDP1); returns how many parameters were recorded."""
        return 0

    def check_blocks(self, blocks: Sequence[Block]) -> None:
        """Refuse, across ``blocks`` (about to be reduced, world size > 1), layouts no single parameter reveals
        (unregistered FSDP1 views sharing one storage)."""

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """Raise :class:`UnsupportedShardingError`, before training, for a configuration (Trainer arguments,
        accelerate state) this backend cannot run exactly."""


def _collective_device(device: torch.device) -> torch.device:
    """``device``, or the accelerator when the default group's backend has no CPU support (NCCL and
    a CPU-offloaded gradient)."""
    backend = str(torch.distributed.get_backend())
    if device.type != "cpu" or any(name in backend for name in ("gloo", "mpi", "ucc", "cpu:")):
        return device
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is not None:
        return torch.device(current.type, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


class ExactReducer:
    """Sums the ``(B, STATISTICS_WIDTH)`` statistics of fixed blocks over all ranks, counting each
    entry once: rows of ranks whose :class:`Placement` does not contribute are zeroed.

    Two ``all_reduce(SUM)``: first a fixed-size check ``[B, f, B^2, f^2]`` (``f`` a fingerprint of the
    blocks' sizes), equal to ``W [B, f, B^2, f^2]`` iff every rank holds the same list of blocks
    (equal mean and mean square: no spread across ranks), so ranks that disagree fail here, before
    a collective whose size depends on ``B``; then the rows."""

    def __init__(self, placements: Sequence[Placement], world_size: int) -> None:
        self.contributes = [placement.contributes for placement in placements]
        self.world = world_size
        fingerprint = 0
        for i, placement in enumerate(placements):
            fingerprint = (fingerprint + (i + 1) * (placement.numel % _FINGERPRINT_MODULUS)) % _FINGERPRINT_MODULUS
        count = float(len(placements))
        self.check = [count, float(fingerprint), count**2, float(fingerprint) ** 2]

    def __call__(self, stats: Tensor) -> Tensor:
        if stats.shape != (len(self.contributes), STATISTICS_WIDTH):
            raise ValueError(
                f"expected statistics of shape ({len(self.contributes)}, {STATISTICS_WIDTH}), got {tuple(stats.shape)}"
            )
        device = _collective_device(stats.device)
        check = torch.tensor(self.check, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.SUM)
        got = check.tolist()  # exact: integers below 2**53
        if got != [self.world * value for value in self.check]:
            raise UnsupportedShardingError(
                "SGD-SaI: the ranks reduced different lists of parameter blocks (this rank: "
                f"{int(self.check[0])} blocks, fingerprint {int(self.check[1])}; sums over ranks: {got}). "
                "Every rank must build the optimizer from the same parameters in the same order."
            )
        mask = torch.tensor(self.contributes, device=stats.device).unsqueeze(1)
        # where(), not a product: a NaN row of a non-contributing replica must not leak into the sum.
        buffer = torch.where(mask, stats, torch.zeros_like(stats)).to(device)
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        return buffer.to(stats.device)
