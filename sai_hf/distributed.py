"""Exact g-SNR statistics for parameters whose gradients are sharded across ranks.

SGD-SaI's scale of a block is a function of the whole tensor's gradient (see :mod:`sai_hf.gsnr`).
Under FSDP2 (DTensor ``Shard`` placements) and FSDP1 with ``use_orig_params=True`` (flattened
views into a sharded ``FlatParameter``) each rank only holds a part of every gradient. The g-SNR
is computed from the additive statistics (:mod:`sai_hf.gsnr`), and for any partition of a
tensor's entries into disjoint pieces the whole tensor's statistics are the element-wise sum of the
pieces' statistics. So the exact reduction is:

* every rank computes the ``(B, STATISTICS_WIDTH)`` statistics of its local pieces
  (:func:`sai_hf.gsnr.gradient_statistics`; an absent local gradient is a zero row);
* for every block, exactly one copy of each entry is counted: rows of ranks that hold a *replica*
  of data another rank also counts (a plain, unsharded tensor on every rank but rank 0; a DTensor on
  every rank whose coordinate on a ``Replicate`` mesh dimension is not 0; FSDP1 hybrid-shard
  replicas) are zeroed, rows of ranks that hold a disjoint shard are kept;
* ONE ``all_reduce(SUM)`` of that float64 tensor over all ranks, for all blocks together.

The sums are the statistics of the whole tensors, identical on every rank, so every rank computes
the same g-SNR and scale as a single process would (up to float64 summation order). The update
itself keeps running on the local shards.

All ranks must reduce the same blocks in the same order. :class:`sai_hf.SGDSaI` builds that list
from its parameter groups (not from which gradients happen to be present locally: under FSDP1 a
parameter outside the local shard has ``grad=None``), and the collective carries a fingerprint of
the list that is checked on every rank.

Layouts that cannot give exact per-tensor statistics are refused with
:class:`UnsupportedShardingError` instead of training with silently wrong scales: FSDP1 with
``use_orig_params=False`` (the optimizer sees the ``FlatParameter``: many tensors concatenated),
DeepSpeed ZeRO-3 (partitions parameters before the optimizer exists; ZeRO-1/2 are handled by
:mod:`sai_hf.deepspeed_zero`), ``Partial``
DTensor gradients, and device meshes that do not span all ranks (e.g. pipeline parallelism).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .deepspeed_zero import DEEPSPEED_ZERO3_MESSAGE, deepspeed_config, refuse_unsupported_zero
from .gsnr import STATISTICS_WIDTH, _local, gradient_statistics, zero_statistics

__all__ = [
    "UnsupportedShardingError",
    "statistics_reducer",
    "register_sharded_model",
    "local_statistics",
    "gradient_may_be_absent_locally",
    "block_numel",
    "ReductionSchedule",
    "deepspeed_in_use",
    "refuse_unsupported_deepspeed",
    "refuse_unsupported_setup",
]

# ``(B, STATISTICS_WIDTH)`` per-shard statistics -> their sums over ranks (``sai_hf.optimizer.StatisticsReducer``).
_Reducer = Callable[[Tensor], Tensor]

# Fingerprint of the block list: values below 2**16, so a sum of squares over up to 2**21 ranks is
# still an exact float64 integer.
_FINGERPRINT_MODULUS = 65521


class UnsupportedShardingError(RuntimeError):
    """The parameters are distributed in a way that does not allow exact per-tensor g-SNR."""


_FLAT_PARAMETER_MESSAGE = (
    "SGD-SaI does not support FSDP1 with use_orig_params=False: the optimizer gets FlatParameters, "
    "each many tensors concatenated, so per-tensor g-SNR is impossible. Set use_orig_params=True "
    "(accelerate: fsdp_use_orig_params: true) or, better, use FSDP2 (fsdp_version: 2)."
)


# --------------------------------------------------------------------------- torch.distributed
def _world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised default process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _dtensor_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return ()
    return (DTensor,)


# --------------------------------------------------------------------------- FSDP1 views
@dataclass(frozen=True)
class _Fsdp1View:
    """An original parameter of an FSDP1 ``use_orig_params=True`` module: a flat view into the
    local shard of a ``FlatParameter`` (empty, with ``grad=None``, where the shard holds none of it),
    or, with ``NO_SHARD``, a whole-tensor view into an unsharded one (``sharded=False``)."""

    sharded: bool
    shard_group: Any
    replicate_group: Any | None  # hybrid sharding: the group that holds replicas of the shards
    numel: int  # elements of the whole original tensor


_FSDP1_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_sharded_model(model: torch.nn.Module) -> int:
    """Record which parameters of ``model`` are FSDP1 ``use_orig_params=True`` shard views.

    FSDP1 leaves no mark on the original parameters, so the optimizer cannot recognise them by
    itself; after this call :func:`statistics_reducer` (and so :meth:`sai_hf.SGDSaI.step`) reduces
    their statistics exactly (``NO_SHARD`` views are recorded as whole tensors). FSDP2 needs no
    registration (its parameters are DTensors). Idempotent; returns the number of parameters of
    ``model`` recorded.

    :class:`sai_hf.GSNRCallback` calls it with the Trainer's model, so Trainer users need nothing.
    Plain-PyTorch FSDP1 users call it once after wrapping, and call ``optimizer.initialize_scales()``
    on every rank before each ``optimizer.step()`` (it returns at once when every block has its
    scale): FSDP1 sets ``grad=None`` outside the local shard, so whether ``step()`` finds a block
    still waiting for its scale differs between ranks, while the reduction needs all of them.
    """
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
            continue  # use_orig_params=False: the optimizer holds the FlatParameter (refused later)
        sharded = bool(handle.uses_sharded_strategy)  # NO_SHARD: whole tensors, nothing to reduce
        hybrid = "HYBRID" in str(getattr(handle, "_sharding_strategy", ""))
        replicate_group = getattr(module, "_inter_node_pg", None) if hybrid else None
        for param, numel in zip(originals, flat._numels):
            _FSDP1_VIEWS[param] = _Fsdp1View(sharded, handle.process_group, replicate_group, int(numel))
            count += 1
    return count


def gradient_may_be_absent_locally(param: Tensor) -> bool:
    """Whether ``param.grad`` can be ``None`` on this rank while other ranks have a gradient for it
    (an FSDP1 view outside the local shard). Such blocks enter the reduction with a zero row."""
    view = _FSDP1_VIEWS.get(param)
    return view is not None and view.sharded


def block_numel(param: Tensor) -> int:
    """Number of elements of the whole block (not of the local shard)."""
    view = _FSDP1_VIEWS.get(param)
    return view.numel if view is not None else int(param.numel())


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Layout:
    sharded: bool  # this rank's local gradient is a part of the block
    contributes: bool  # this rank's row is counted in the sum
    numel: int  # elements of the whole block (the same on every rank)


def _layout(param: Tensor, rank: int, world: int, dtensor: tuple[type, ...]) -> _Layout:
    if getattr(param, "_is_flat_param", False):
        raise UnsupportedShardingError(_FLAT_PARAMETER_MESSAGE)
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)
    view = _FSDP1_VIEWS.get(param)
    if view is not None and view.sharded:
        dist = torch.distributed
        replicas = dist.get_world_size(view.replicate_group) if view.replicate_group is not None else 1
        if dist.get_world_size(view.shard_group) * replicas != world:
            raise UnsupportedShardingError(
                "SGD-SaI: an FSDP1 module's process groups do not span all ranks "
                f"({dist.get_world_size(view.shard_group)} x {replicas} != world size {world}); the ranks "
                "holding replicas of its shards cannot be told apart. Use one FSDP group over all ranks "
                "(or hybrid sharding, or FSDP2)."
            )
        first_replica = view.replicate_group is None or dist.get_rank(view.replicate_group) == 0
        return _Layout(sharded=True, contributes=first_replica, numel=view.numel)
    grad = param.grad
    source = grad if grad is not None and isinstance(grad, dtensor) else param
    if dtensor and isinstance(source, dtensor):
        mesh, placements = source.device_mesh, source.placements
        if mesh.size() != world:
            raise UnsupportedShardingError(
                f"SGD-SaI: a DTensor parameter lives on a device mesh of {mesh.size()} ranks but the world "
                f"has {world}; ranks outside the mesh may hold replicas of it (pipeline or nested data "
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
        return _Layout(sharded=sharded, contributes=contributes, numel=int(source.numel()))
    # A plain tensor: the same whole gradient on every rank (DDP all-reduces it before the step).
    return _Layout(sharded=False, contributes=rank == 0, numel=int(param.numel()))


def _refuse_unregistered_flat_views(blocks: Sequence[Tensor], dtensor: tuple[type, ...]) -> None:
    """Two 1-D optimizer parameters sharing one storage are flat views into one buffer: the
    signature of FSDP1 ``use_orig_params=True`` (every original parameter becomes a 1-D view of the
    local shard, or of one shared empty tensor), whose views we must know to reduce them exactly."""
    seen: dict[int, int] = {}
    for i, p in enumerate(blocks):
        if p.dim() != 1 or (dtensor and isinstance(p, dtensor)) or p in _FSDP1_VIEWS:
            continue
        try:
            key = p.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            continue
        if key in seen:
            raise UnsupportedShardingError(
                f"SGD-SaI: parameters #{seen[key]} and #{i} share one storage, as FSDP1 "
                "(use_orig_params=True) shard views do; their local gradients are shards and the g-SNR "
                "would be silently wrong. Call sai_hf.register_sharded_model(model) once after wrapping "
                "(the Trainer does this automatically), or use FSDP2."
            )
        seen[key] = i


# --------------------------------------------------------------------------- the reduction
def deepspeed_in_use(args: Any = None) -> bool:
    """Whether DeepSpeed is configured: ``args.deepspeed`` (TrainingArguments), the DeepSpeed plugin
    that transformers derives from ``accelerate launch`` (``args.deepspeed_plugin``), the environment
    ``accelerate launch`` sets (``ACCELERATE_USE_DEEPSPEED``), or an initialised accelerate state."""
    if args is not None and (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None):
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    shared = getattr(AcceleratorState, "_shared_state", {})
    return shared.get("distributed_type") == DistributedType.DEEPSPEED


def refuse_unsupported_deepspeed(args: Any = None) -> None:
    """If DeepSpeed is in use, raise :class:`UnsupportedShardingError` for the configurations that
    SGD-SaI cannot run exactly (ZeRO stage 3, optimizer offload, a DeepSpeed ``optimizer`` section;
    :func:`sai_hf.deepspeed_zero.refuse_unsupported_zero`). ZeRO stages 1 and 2 are supported."""
    if deepspeed_in_use(args):
        refuse_unsupported_zero(deepspeed_config(args))


def refuse_unsupported_setup(args: Any = None) -> None:
    """Refuse, before any training, the configurations whose per-tensor statistics cannot be exact:
    DeepSpeed ZeRO-3 or optimizer offload, and an accelerate FSDP1 plugin with ``use_orig_params=False`` (the optimizer would
    get FlatParameters). Called by :class:`sai_hf.integration.OptimArgsCheck` when the Trainer is
    built; the same layouts are also refused at the first step by :func:`statistics_reducer`."""
    refuse_unsupported_deepspeed(args)
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return
    plugin = getattr(AcceleratorState, "_shared_state", {}).get("fsdp_plugin")
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not getattr(plugin, "use_orig_params", True):
        raise UnsupportedShardingError(_FLAT_PARAMETER_MESSAGE)


def local_statistics(blocks: Sequence[Tensor]) -> Tensor:
    """:func:`sai_hf.gsnr.gradient_statistics` of ``blocks``' local gradients, with a zero row
    (no entries here) for a block whose gradient is ``None`` on this rank."""
    present = [i for i, p in enumerate(blocks) if p.grad is not None]
    if len(present) == len(blocks):
        return gradient_statistics([p.grad for p in blocks])
    device = _local(blocks[0]).device if blocks else torch.device("cpu")
    rows = zero_statistics(len(blocks), device)
    if present:
        found = gradient_statistics([blocks[i].grad for i in present])
        rows = rows.to(found.device, found.dtype)
        rows[torch.tensor(present, device=found.device)] = found
    return rows


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


class _ExactReducer:
    """Sums the ``(B, STATISTICS_WIDTH)`` statistics of fixed blocks over all ranks, counting each entry once."""

    def __init__(self, layouts: Sequence[_Layout], world: int) -> None:
        self.contributes = [layout.contributes for layout in layouts]
        self.world = world
        fingerprint = 0
        for i, layout in enumerate(layouts):
            fingerprint = (fingerprint + (i + 1) * (layout.numel % _FINGERPRINT_MODULUS)) % _FINGERPRINT_MODULUS
        self.check = [float(len(layouts)), float(fingerprint), float(fingerprint) ** 2] + [0.0] * (STATISTICS_WIDTH - 3)

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


def statistics_reducer(blocks: Sequence[Tensor]) -> _Reducer | None:
    """The exact cross-rank reducer for the statistics of ``blocks`` (in this order), or ``None``.

    ``None`` when no block is sharded across ranks (one process; DDP, whose gradients are already
    all-reduced and identical everywhere): the local statistics are the whole tensors' already.
    Otherwise a function ``(B, STATISTICS_WIDTH) -> (B, STATISTICS_WIDTH)`` that zeroes the rows this rank must not count, and
    sums over all ranks with one ``all_reduce`` (see the module docstring). Call it on every rank,
    with the same blocks in the same order.

    Raises :class:`UnsupportedShardingError` for layouts without exact per-tensor statistics
    (FSDP1 ``use_orig_params=False``, DeepSpeed ZeRO-3, ``Partial`` gradients, meshes not spanning all
    ranks, unregistered FSDP1 views).
    """
    rank, world = _world()
    dtensor = _dtensor_types()
    layouts = [_layout(p, rank, world, dtensor) for p in blocks]
    if world == 1:
        return None
    _refuse_unregistered_flat_views(blocks, dtensor)
    if not any(layout.sharded for layout in layouts):
        return None
    return _ExactReducer(layouts, world)


# --------------------------------------------------------------------------- rank agreement
class ReductionSchedule:
    """At most one cross-rank reduction per optimizer step; owned by :class:`sai_hf.SGDSaI`.

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
