"""The sharding abstraction: where each block's entries live on this rank, and how to sum its
statistics across ranks.

SGD-SaI's scale of a block is a function of the whole block's gradient, computed from additive
statistics (:mod:`sai_hf.gsnr`): for any partition of a block's entries into disjoint pieces, the
whole block's statistics row is the element-wise sum of the pieces' rows. Every sharding backend
therefore has to answer two questions per block:

* **where** its entries live on this rank: the local gradient pieces whose statistics this rank
  measures, and the local parameter / gradient / momentum views the update applies the block's
  scale to;
* **how** to sum its statistics across ranks: which ranks' rows count (each entry exactly once:
  rows of ranks that hold a *replica* of what another rank counts are masked out), and one
  ``all_reduce(SUM)`` for all blocks together, with a fingerprint proving every rank reduced the
  same blocks in the same order (:class:`ExactReducer`).

Two interfaces carry these answers:

* :class:`BlockLayout`: the one object an :class:`sai_hf.SGDSaI` owns (``optimizer.layout()``).
  ``SGDSaI.step``, ``initialize_scales``, ``measure_gsnr``, ``block_states`` and ``scales`` only
  call it. Implementations: :class:`sai_hf.sharding.tensors.TensorBlocks` (each optimizer
  parameter is one block) and :class:`sai_hf.sharding.deepspeed_zero.ZeroPartitions` (the
  optimizer holds DeepSpeed's flat partitions; blocks are fragments of them).
* :class:`TensorBackend`: for :class:`~sai_hf.sharding.tensors.TensorBlocks`, how one kind of
  optimizer parameter is laid out (:mod:`~sai_hf.sharding.local`, :mod:`~sai_hf.sharding.dtensor`,
  :mod:`~sai_hf.sharding.fsdp1`); the first backend that claims a parameter answers for it.

Backends are listed in :mod:`sai_hf.sharding` (``TENSOR_BACKENDS``, ``PARTITIONED_LAYOUTS``):
adding one is one new module and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..gsnr import STATISTICS_WIDTH, BlockStatus

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import SGDSaI

__all__ = [
    "UnsupportedShardingError",
    "StatisticsReducer",
    "Placement",
    "ScaleRecord",
    "TensorBackend",
    "BlockLayout",
    "ExactReducer",
    "ReductionSchedule",
    "world",
]

#: ``(B, STATISTICS_WIDTH)`` per-piece statistics -> their sums over the ranks holding the pieces
#: (the type of :meth:`TensorBackend`-based reducers and of ``reduce_statistics`` arguments).
StatisticsReducer = Callable[[Tensor], Tensor]

# Fingerprint of the block list: values below 2**16, so a sum of squares over up to 2**21 ranks is
# still an exact float64 integer.
_FINGERPRINT_MODULUS = 65521


class UnsupportedShardingError(RuntimeError):
    """The parameters are distributed in a way that does not allow exact per-tensor g-SNR."""


@dataclass(frozen=True)
class ScaleRecord:
    """A block that received its scale: what :meth:`sai_hf.SGDSaI.initialize_scales` returns."""

    param: Tensor
    gsnr: float
    scale: float
    numel: int
    status: BlockStatus


@dataclass(frozen=True)
class Placement:
    """How one block is spread over the ranks, as one rank sees it."""

    sharded: bool  # this rank's local gradient is a part of the block (not all of it)
    contributes: bool  # this rank's statistics row is counted in the cross-rank sum
    numel: int  # elements of the whole block (the same on every rank)


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised default process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- per-tensor backends
class TensorBackend:
    """How one kind of optimizer parameter (a block of :class:`~sai_hf.sharding.tensors.TensorBlocks`)
    is laid out across ranks. One instance per optimizer; it may hold state (FSDP1's views).

    The defaults describe a whole tensor present on this rank (:mod:`sai_hf.sharding.local`).
    """

    def claims(self, param: Tensor) -> bool:
        """Whether this backend answers for ``param`` (the first claiming backend does). The answer
        is cached per parameter: it may only change through :meth:`register_model`."""
        return False

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        """Where ``param``'s block lives: sharded here or not, counted here or not, its whole numel.
        Raises :class:`UnsupportedShardingError` for a layout without exact per-tensor statistics."""
        raise NotImplementedError

    def local(self, tensor: Tensor) -> Tensor:
        """The entries of ``tensor`` (a parameter, its gradient or momentum) stored on this rank,
        as a plain tensor: what statistics are measured on and the update runs on."""
        return tensor

    def like(self, local: Tensor, param: Tensor) -> Tensor:
        """A new local buffer (momentum) wrapped the way ``param`` is (the inverse of :meth:`local`)."""
        return local

    def may_lack_gradient(self, param: Tensor) -> bool:
        """Whether ``param.grad`` can be ``None`` here while other ranks hold gradient entries of
        the block (such blocks join every reduction, with a zero row)."""
        return False

    def numel(self, param: Tensor) -> int:
        """Number of elements of the whole block (not of the local piece)."""
        return int(param.numel())

    def register_model(self, model: torch.nn.Module) -> int:
        """Learn from ``model`` what its parameters cannot tell (FSDP1); returns how many
        parameters were recorded."""
        return 0

    def check_blocks(self, blocks: Sequence[Tensor]) -> None:
        """Refuse, across ``blocks`` (the blocks about to be reduced, world size > 1), layouts no
        single parameter reveals (e.g. unregistered FSDP1 views sharing one storage)."""

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """Raise :class:`UnsupportedShardingError`, before training, for a configuration (Trainer
        arguments, accelerate state) this backend cannot run exactly."""


# --------------------------------------------------------------------------- the optimizer's layout
class BlockLayout:
    """The blocks of one :class:`sai_hf.SGDSaI`: where their entries live on this rank, how their
    statistics are summed across ranks, and where their state is kept. Owned by the optimizer
    (``optimizer.layout()``); every method takes the optimizer it serves."""

    #: Keys this layout may add to ``optimizer.state`` entries besides the per-block ones
    #: (accepted by the state-dict check, :mod:`sai_hf.checkpoint`).
    STATE_KEYS: frozenset[str] = frozenset()

    def block_states(self, optimizer: SGDSaI) -> list[tuple[Tensor, Mapping[str, Any]]]:
        """``(model parameter, its SGD-SaI state)`` for every block, in parameter-group order."""
        raise NotImplementedError

    def pending_blocks(self, optimizer: SGDSaI) -> list[Tensor]:
        """Blocks that have a local gradient now but no scale yet."""
        raise NotImplementedError

    def initialize_scales(
        self, optimizer: SGDSaI, params: Sequence[Tensor] | None, reduce_statistics: StatisticsReducer | None
    ) -> list[ScaleRecord]:
        """Measure and assign the scales of ``params`` (default: every block) that have none yet
        (see :meth:`sai_hf.SGDSaI.initialize_scales`)."""
        raise NotImplementedError

    def measure_gsnr(self, optimizer: SGDSaI, reduce_statistics: StatisticsReducer | None) -> dict[Tensor, float]:
        """The g-SNR of every scaled block's current gradient (see :meth:`sai_hf.SGDSaI.measure_gsnr`)."""
        raise NotImplementedError

    def step(self, optimizer: SGDSaI) -> None:
        """One update of every block that has a gradient and a scale (scaling pending blocks first)."""
        raise NotImplementedError

    def block_numel(self, param: Tensor) -> int:
        """Number of elements of the whole block of model parameter ``param``."""
        return int(param.numel())

    def register_model(self, model: torch.nn.Module) -> int:
        """Learn from ``model`` what its parameters cannot tell (see :meth:`TensorBackend.register_model`)."""
        return 0

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """Raise :class:`UnsupportedShardingError`, before training, for a configuration (Trainer
        arguments, accelerate state) this layout cannot run exactly."""


# --------------------------------------------------------------------------- the reduction
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
    entry once: rows of ranks whose :class:`Placement` does not contribute are zeroed, then ONE
    ``all_reduce(SUM)`` of the rows plus a check row ``[B, f, f^2]`` (``f`` a fingerprint of the
    blocks' sizes) that proves every rank reduced the same list of blocks."""

    def __init__(self, placements: Sequence[Placement], world_size: int) -> None:
        self.contributes = [placement.contributes for placement in placements]
        self.world = world_size
        fingerprint = 0
        for i, placement in enumerate(placements):
            fingerprint = (fingerprint + (i + 1) * (placement.numel % _FINGERPRINT_MODULUS)) % _FINGERPRINT_MODULUS
        self.check = [float(len(placements)), float(fingerprint), float(fingerprint) ** 2] + [0.0] * (STATISTICS_WIDTH - 3)

    def __call__(self, stats: Tensor) -> Tensor:
        if stats.shape != (len(self.contributes), STATISTICS_WIDTH):
            raise ValueError(
                f"expected statistics of shape ({len(self.contributes)}, {STATISTICS_WIDTH}), got {tuple(stats.shape)}"
            )
        mask = torch.tensor(self.contributes, device=stats.device).unsqueeze(1)
        check = torch.tensor([self.check], dtype=stats.dtype, device=stats.device)
        # where(), not a product: a NaN row of a non-contributing replica must not leak into the sum.
        buffer = torch.cat((torch.where(mask, stats, torch.zeros_like(stats)), check))
        buffer = buffer.to(_collective_device(stats.device))
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        # Every rank contributed the same [B, f, f^2] iff sum == W*[B, f, f^2] (equal mean and mean
        # square: zero variance across ranks). Exact: all values are integers below 2**53.
        got = buffer[-1].tolist()
        if got != [self.world * value for value in self.check]:
            raise UnsupportedShardingError(
                "SGD-SaI: the ranks reduced different lists of parameter blocks (this rank: "
                f"{int(self.check[0])} blocks, fingerprint {int(self.check[1])}; sums over ranks: {got}). "
                "Every rank must build the optimizer from the same parameters in the same order."
            )
        return buffer[:-1].to(stats.device)


class ReductionSchedule:
    """At most one cross-rank reduction per optimizer step (of :class:`~sai_hf.sharding.tensors.TensorBlocks`).

    :class:`sai_hf.GSNRCallback` reduces just before ``optimizer.step()``, and ``step()`` then calls
    :meth:`sai_hf.SGDSaI.initialize_scales` again when some local gradient still has no scale (a
    deferred block). Under FSDP1 that second call happens only on the ranks holding a piece of the
    deferred block, and a collective that some ranks skip deadlocks; so :meth:`due` says ``True``
    for the first reduction of a step and ``False`` after it (steps are counted by a step
    post-hook, the same on every rank). Nothing is lost: the gradients have not changed since the
    first reduction of the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.completed_steps = 0
        self.reduced_at_step: int | None = None
        optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.completed_steps += 1

    def due(self) -> bool:
        """``True`` for the first reduction of the current optimizer step (and records it)."""
        if self.reduced_at_step == self.completed_steps:
            return False
        self.reduced_at_step = self.completed_steps
        return True
