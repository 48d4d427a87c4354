"""Exact g-SNR statistics under sharding: one interface (:class:`~sai_hf.sharding.base.ShardingBackend`),
one module per backend.

===========================  ==============================================================
module                       what the optimizer's parameters are; its blocks
===========================  ==============================================================
:mod:`.deepspeed_zero`       DeepSpeed ZeRO-1/2 flat partitions; blocks are their fragments
                             (ZeRO-3 model parameters in an optimizer: refused)
:mod:`.deepspeed_zero3`      DeepSpeed ZeRO-3 fp32 sub-group partitions; blocks are the
                             parameters' per-rank pieces
:mod:`.fsdp1`                FSDP1 ``use_orig_params=True`` views (registered from the model)
:mod:`.dtensor`              DTensors (FSDP2): ``to_local()`` shards and replicas
:mod:`.local`                whole tensors on every rank (one process, DDP)
===========================  ==============================================================

An :class:`sai_hf.SGDSaI` builds one instance of each of :data:`BACKENDS`; the first that claims an
optimizer parameter answers for it. Adding a backend is one module with a
:class:`~sai_hf.sharding.base.ShardingBackend` subclass and its entry in :data:`BACKENDS`.
DeepSpeed configuration checks live in :mod:`.deepspeed_config`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..gsnr import gradient_statistics, zero_statistics
from .base import Block, ExactReducer, Placement, ShardingBackend, UnsupportedShardingError, world
from .deepspeed_zero import Zero3Parameters, ZeroFragments
from .deepspeed_zero3 import Zero3Partitions
from .dtensor import DTensorShards
from .fsdp1 import Fsdp1Views
from .local import WholeTensors

__all__ = [
    "Block",
    "ShardingBackend",
    "Placement",
    "ExactReducer",
    "UnsupportedShardingError",
    "BACKENDS",
    "STATE_KEYS",
    "Backends",
    "refuse_unsupported_setup",
    "block_statistics",
    "statistics_reducer",
    "local_statistics",
    "world",
]

#: Backends in order of precedence: the first that claims an optimizer parameter answers for it
#: (the last, :class:`~sai_hf.sharding.local.WholeTensors`, claims every parameter).
BACKENDS: list[type[ShardingBackend]] = [
    ZeroFragments,
    Zero3Partitions,
    Zero3Parameters,
    Fsdp1Views,
    DTensorShards,
    WholeTensors,
]

#: State keys the backends add besides the per-block ones (for :mod:`sai_hf.checkpoint`).
STATE_KEYS: frozenset[str] = frozenset().union(*(backend.STATE_KEYS for backend in BACKENDS))


class Backends:
    """One optimizer's backends: which one answers for each of its parameters, and the blocks they
    hold (:meth:`blocks`)."""

    def __init__(self, model_groups: Sequence[Sequence[Tensor]]) -> None:
        self.backends = [backend(model_groups) for backend in BACKENDS]
        # id(param) -> (param, its backend); cleared when a model is registered (registration
        # changes which backend claims a parameter).
        self._claimed: dict[int, tuple[Tensor, ShardingBackend]] = {}

    def backend(self, param: Tensor) -> ShardingBackend:
        """The backend that answers for ``param`` (the first that claims it)."""
        cached = self._claimed.get(id(param))
        if cached is not None and cached[0] is param:
            return cached[1]
        backend = next(b for b in self.backends if b.claims(param))
        self._claimed[id(param)] = (param, backend)
        return backend

    def blocks(self, optimizer: Any, groups: Sequence[dict[str, Any]], stepping: bool) -> list[Block]:
        """Every block held by the parameters of ``groups``, in parameter order (the same on every rank)."""
        out: list[Block] = []
        for group in groups:
            runs: list[tuple[ShardingBackend, list[Tensor]]] = []  # consecutive parameters of one backend
            for p in group["params"]:
                backend = self.backend(p)
                if runs and runs[-1][0] is backend:
                    runs[-1][1].append(p)
                else:
                    runs.append((backend, [p]))
            for backend, params in runs:
                out.extend(backend.blocks(optimizer, group, params, stepping))
        if not stepping:  # reports: also the parameters a wrapper keeps out of the groups between steps
            present = {id(p) for group in groups for p in group["params"]}
            for backend in self.backends:
                out.extend(backend.resting_blocks(optimizer, groups, present))
        return out

    def reducer(self, blocks: Sequence[Block]) -> ExactReducer | None:
        """The exact cross-rank reducer of ``blocks``' statistics, ``None`` where nothing needs
        summing (one process; no block sharded: DDP gradients are already all-reduced)."""
        rank, world_size = world()
        if world_size == 1:
            return None
        for backend in self.backends:
            backend.check_blocks(blocks)
        if not any(b.placement.sharded for b in blocks):
            return None
        return ExactReducer([b.placement for b in blocks], world_size)

    def register_model(self, model: torch.nn.Module, wrappers: Sequence[Any] = ()) -> int:
        """Tell every backend about ``model`` (FSDP1 views) and the optimizer's ``wrappers`` (DeepSpeed
        ZeRO-1/2's optimizer); returns the parameters recorded."""
        self._claimed.clear()
        return sum(backend.register_model(model, wrappers) for backend in self.backends)

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether some block got its scale in an earlier optimizer step (asked of the backends of ``blocks``)."""
        backends = {id(b.backend): b.backend for b in blocks}
        return any(backend.scaling_started(optimizer, blocks) for backend in backends.values())


def refuse_unsupported_setup(args: Any = None) -> None:
    """Refuse, before any training, configurations whose per-tensor statistics cannot be exact
    (every backend's ``refuse_setup``). Called when the Trainer is built; the same parameter
    layouts are refused again at the first step."""
    for backend in BACKENDS:
        backend.refuse_setup(args)


def block_statistics(blocks: Sequence[Block]) -> Tensor:
    """:func:`sai_hf.gsnr.gradient_statistics` of ``blocks``' local gradients, a zero row (no
    entries here) where a block has no gradient on this rank: ``(B, STATISTICS_WIDTH)``. A block's
    ``grad_factor`` ``c`` scales its row as the gradient ``c g`` would: ``[n, c S, c S', c^2 C, c^2 P]``."""
    present = [i for i, b in enumerate(blocks) if b.grad is not None]
    if len(present) == len(blocks):
        rows = gradient_statistics([b.grad for b in blocks])
    else:
        rows = zero_statistics(len(blocks), blocks[0].local.device if blocks else torch.device("cpu"))
        if present:
            found = gradient_statistics([blocks[i].grad for i in present])
            rows = rows.to(found.device, found.dtype)
            rows[torch.tensor(present, device=found.device)] = found
    factors = [b.grad_factor for b in blocks]
    if any(f is not None for f in factors):
        c = torch.tensor([1.0 if f is None else float(f) for f in factors], dtype=rows.dtype, device=rows.device)
        one = torch.ones_like(c)
        rows = rows * torch.stack((one, c, c, c * c, c * c), dim=1)
    return rows


def _tensor_blocks(tensors: Sequence[Tensor]) -> tuple[Backends, list[Block]]:
    """The blocks of plain ``tensors`` (no optimizer: throwaway state)."""
    backends = Backends([list(tensors)])
    return backends, backends.blocks(SimpleNamespace(state=defaultdict(dict)), [{"params": list(tensors)}], stepping=False)


def statistics_reducer(tensors: Sequence[Tensor]) -> ExactReducer | None:
    """The exact cross-rank reducer for the statistics of ``tensors`` (in this order), or ``None``
    where nothing needs summing (one process, DDP). A collective: call it on every rank with the
    same tensors. Raises :class:`UnsupportedShardingError` for layouts without exact per-tensor
    statistics (``Partial`` gradients, meshes not spanning all ranks, ZeRO-3 parameters,
    FlatParameters, unregistered FSDP1 views)."""
    backends, blocks = _tensor_blocks(tensors)
    return backends.reducer(blocks)


def local_statistics(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`block_statistics` of plain ``tensors`` (DTensors: their local shards)."""
    return block_statistics(_tensor_blocks(tensors)[1])
