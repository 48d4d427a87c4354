"""Exact g-SNR statistics under sharding: one abstraction (:mod:`sai_hf.sharding.base`), one module
per backend.

===========================  ==============================================================
module                       what the optimizer's parameters are
===========================  ==============================================================
:mod:`.local`                whole tensors on every rank (one process, DDP)
:mod:`.dtensor`              DTensors (FSDP2): ``to_local()`` shards and replicas
:mod:`.fsdp1`                FSDP1 ``use_orig_params=True`` views (registered from the model)
:mod:`.deepspeed_zero`       DeepSpeed ZeRO-1/2 flat partitions; blocks are their fragments
===========================  ==============================================================

An :class:`sai_hf.SGDSaI` owns one :class:`~sai_hf.sharding.base.BlockLayout`
(``optimizer.layout()``), made by :func:`new_layout` when the optimizer is built: a
:class:`~sai_hf.sharding.tensors.TensorBlocks` over fresh instances of :data:`TENSOR_BACKENDS`.
It is decided once, at the first call after the optimizer's parameters stop being the model's own
tensors (a wrapper such as DeepSpeed replaced them): :func:`replaced_layout` asks each of
:data:`PARTITIONED_LAYOUTS` in turn (``detect(model_groups)``) and the first that recognises the
layout replaces the :class:`~sai_hf.sharding.tensors.TensorBlocks`.

Adding a backend: a new module with a :class:`~sai_hf.sharding.base.TensorBackend` (each
parameter still one tensor) or a :class:`~sai_hf.sharding.base.BlockLayout` with a ``detect``
classmethod (the optimizer's parameters replaced), and its entry in the list below.

The public helpers keep their names: :func:`statistics_reducer`, :func:`local_statistics`,
:func:`register_sharded_model`, :func:`refuse_unsupported_setup`, :class:`UnsupportedShardingError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (
    BlockLayout,
    ExactReducer,
    Placement,
    ReductionSchedule,
    ScaleRecord,
    StatisticsReducer,
    TensorBackend,
    UnsupportedShardingError,
)
from .deepspeed_zero import Zero3Parameters, ZeroPartitions
from .dtensor import DTensorShards
from .fsdp1 import Fsdp1Views
from .local import WholeTensors
from .tensors import TensorBlocks

__all__ = [
    "BlockLayout",
    "TensorBackend",
    "TensorBlocks",
    "Placement",
    "ExactReducer",
    "ReductionSchedule",
    "ScaleRecord",
    "StatisticsReducer",
    "UnsupportedShardingError",
    "TENSOR_BACKENDS",
    "PARTITIONED_LAYOUTS",
    "new_layout",
    "replaced_layout",
    "statistics_reducer",
    "local_statistics",
    "register_sharded_model",
    "refuse_unsupported_setup",
]

#: Per-tensor backends, in order of precedence: the first that claims a parameter answers for it
#: (the last, :class:`~sai_hf.sharding.local.WholeTensors`, claims every parameter).
TENSOR_BACKENDS: list[type[TensorBackend]] = [Fsdp1Views, Zero3Parameters, DTensorShards, WholeTensors]

#: Layouts of wrappers that replace the optimizer's parameters by their own buffers, tried in order.
PARTITIONED_LAYOUTS: list[type[BlockLayout]] = [ZeroPartitions]


def new_layout(optimizer: torch.optim.Optimizer) -> TensorBlocks:
    """The layout of a freshly built optimizer: every parameter is a block (:data:`TENSOR_BACKENDS`)."""
    return TensorBlocks([backend() for backend in TENSOR_BACKENDS], ReductionSchedule(optimizer))


def replaced_layout(model_groups: Sequence[Sequence[Tensor]]) -> BlockLayout | None:
    """The layout of an optimizer whose parameters a wrapper replaced, from the model's parameter
    groups it was built with; ``None`` if no :data:`PARTITIONED_LAYOUTS` entry recognises it."""
    for layout in PARTITIONED_LAYOUTS:
        found = layout.detect(model_groups)
        if found is not None:
            return found
    return None


def statistics_reducer(blocks: Sequence[Tensor], layout: TensorBlocks | None = None) -> StatisticsReducer | None:
    """The exact cross-rank reducer for the statistics of ``blocks`` (in this order), or ``None``.

    ``None`` when no block is sharded across ranks (one process; DDP, whose gradients are already
    all-reduced and identical everywhere). Otherwise a function ``(B, STATISTICS_WIDTH) ->
    (B, STATISTICS_WIDTH)`` that zeroes the rows this rank must not count and sums over all ranks
    with one ``all_reduce`` (:class:`~sai_hf.sharding.base.ExactReducer`). Call it on every rank,
    with the same blocks in the same order.

    ``layout``: an optimizer's layout (``optimizer.layout()``), which knows that optimizer's
    registered FSDP1 views; by default a fresh one (DTensors and plain tensors).
    Raises :class:`UnsupportedShardingError` for layouts without exact per-tensor statistics
    (FSDP1 ``use_orig_params=False``, DeepSpeed ZeRO-3, ``Partial`` gradients, meshes not spanning
    all ranks, unregistered FSDP1 views).
    """
    return (layout or _fresh_tensor_blocks()).reducer(blocks)


def local_statistics(blocks: Sequence[Tensor], layout: TensorBlocks | None = None) -> Tensor:
    """:func:`sai_hf.gsnr.gradient_statistics` of ``blocks``' local gradients, with a zero row for a
    block whose gradient is ``None`` on this rank (``layout`` as in :func:`statistics_reducer`)."""
    return (layout or _fresh_tensor_blocks()).local_statistics(blocks)


def _fresh_tensor_blocks() -> TensorBlocks:
    return TensorBlocks([backend() for backend in TENSOR_BACKENDS])


def register_sharded_model(model: torch.nn.Module, optimizer: Any) -> int:
    """Tell ``optimizer`` (an :class:`sai_hf.SGDSaI`, possibly wrapped, e.g. by accelerate) about
    ``model``: records which of its parameters are FSDP1 ``use_orig_params=True`` shard views,
    which FSDP1 leaves unmarked, in the optimizer's layout. Idempotent; returns the number of
    parameters recorded. FSDP2, DDP and DeepSpeed need no registration.

    :class:`sai_hf.GSNRCallback` does it with the Trainer's model. Plain-PyTorch FSDP1 users call it
    once after wrapping and building the optimizer, and call ``optimizer.initialize_scales()`` on
    every rank before each ``optimizer.step()`` (it returns at once when every block has its
    scale): FSDP1 sets ``grad=None`` outside the local shard, so whether ``step()`` finds a block
    still waiting for its scale differs between ranks, while the reduction needs all of them.
    """
    from ..optimizer import SGDSaI

    for _ in range(8):
        if isinstance(optimizer, SGDSaI):
            return optimizer.register_model(model)
        optimizer = getattr(optimizer, "optimizer", None)
    raise TypeError("register_sharded_model: optimizer is not an sai_hf.SGDSaI (nor wraps one)")


def refuse_unsupported_setup(args: Any = None) -> None:
    """Refuse, before any training, configurations whose per-tensor statistics cannot be exact
    (every registered backend's ``refuse_setup``: DeepSpeed ZeRO-3 / optimizer offload / an
    ``optimizer`` section, an accelerate FSDP1 plugin with ``use_orig_params=False``). Called by
    :class:`sai_hf.integration.OptimArgsCheck` when the Trainer is built; the same parameter layouts
    are refused again at the first step."""
    for backend in [*PARTITIONED_LAYOUTS, *TENSOR_BACKENDS]:
        backend.refuse_setup(args)


def extra_state_keys() -> frozenset[str]:
    """State keys the registered layouts add besides the per-block ones (for :mod:`sai_hf.checkpoint`)."""
    return frozenset().union(*(layout.STATE_KEYS for layout in PARTITIONED_LAYOUTS))
