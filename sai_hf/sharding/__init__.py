"""Exact g-SNR statistics under sharding: one interface (:class:`~sai_hf.sharding.base.ShardingBackend`),
one module per backend.

===========================  ==============================================================
module                       what the optimizer's parameters are; its blocks
===========================  ==============================================================
:mod:`.fsdp1`                FSDP1 ``use_orig_params=True`` views (registered from the model)
:mod:`.dtensor`              DTensors (FSDP2): ``to_local()`` shards and replicas
:mod:`.local`                whole tensors on every rank (one process, DDP)
===========================  ==============================================================

An :class:`sai_hf.SGDSaI` holds one :class:`Backends`: one instance of each of :data:`BACKENDS`, the first that
claims an optimizer parameter answering for it. Adding a backend is one module with a
:class:`~sai_hf.sharding.base.ShardingBackend` subclass, placed in :data:`BACKENDS` by :func:`add_backends`: the
DeepSpeed adapter (:mod:`sai_hf.deepspeed`, a layer above the optimizer) adds its flat-partition backends there
when ``deepspeed`` is imported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..gsnr import present_statistics
from .base import Block, ExactReducer, ParameterGroups, Placement, ShardingBackend, UnsupportedShardingError, world
from .dtensor import DTensorShards
from .fsdp1 import Fsdp1Views
from .local import WholeTensors

__all__ = [
    "Block", "ShardingBackend", "Placement", "ExactReducer", "UnsupportedShardingError", "BACKENDS", "add_backends",
    "Backends", "refuse_unsupported_setup", "statistics_reducer", "local_statistics", "world",
]  # fmt: skip

#: Backends in order of precedence: the first that claims an optimizer parameter answers for it
#: (the last, :class:`~sai_hf.sharding.local.WholeTensors`, claims every parameter).
BACKENDS: list[type[ShardingBackend]] = [Fsdp1Views, DTensorShards, WholeTensors]


def add_backends(*backends: type[ShardingBackend]) -> None:
    """Put ``backends`` first in :data:`BACKENDS` (ahead of the per-tensor ones), in this order; idempotent. Optimizers
    built earlier take them too, at their next use of :attr:`Backends.backends`."""
    BACKENDS[:] = [*backends, *(b for b in BACKENDS if b not in backends)]


class Backends:
    """One optimizer's backends: which one answers for each of its parameters (:meth:`backend`), the blocks they hold
    (:meth:`blocks`), and the exact reduction of their statistics (:meth:`reducer`). ``groups``: the optimizer's
    parameter groups (:meth:`add_group` as they are added)."""

    def __init__(self) -> None:
        self.groups = ParameterGroups()
        self._instances: list[ShardingBackend] = []
        # id(param) -> (param, its backend); cleared by registration (it changes which backend claims a parameter).
        self._claimed: dict[int, tuple[Tensor, ShardingBackend]] = {}

    @property
    def backends(self) -> list[ShardingBackend]:
        """One instance of each of :data:`BACKENDS`, in its order (kept across backends added later)."""
        if [type(b) for b in self._instances] != BACKENDS:
            made = {type(b): b for b in self._instances}
            self._instances = [made.get(backend) or backend(self.groups) for backend in BACKENDS]
            self._claimed.clear()
        return self._instances

    def backend_of_type(self, kind: type[ShardingBackend]) -> ShardingBackend | None:
        """This optimizer's instance of backend ``kind`` (``None`` where :data:`BACKENDS` lacks it)."""
        return next((b for b in self.backends if type(b) is kind), None)

    def state_keys(self, groups: Sequence[dict[str, Any]] | None = None) -> frozenset[str]:
        """State keys the backends add besides the per-block ones (for :mod:`sai_hf.checkpoint`): those of the backends
        answering for the parameters of ``groups``, or of every backend (``None``)."""
        if groups is None:
            return frozenset().union(*(b.STATE_KEYS for b in self.backends))
        return frozenset().union(*(self.backend(p).STATE_KEYS for group in groups for p in group["params"]))

    def add_group(self, group: dict[str, Any]) -> None:
        self.groups.add(group)

    def backend(self, param: Tensor) -> ShardingBackend:
        """The backend that answers for ``param`` (the first that claims it)."""
        backends = self.backends  # first: a backend added since clears the cache
        cached = self._claimed.get(id(param))
        if cached is not None and cached[0] is param:
            return cached[1]
        backend = next(b for b in backends if b.claims(param))
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

    def measured_ahead(self, optimizer: Any, blocks: Sequence[Block]) -> tuple[list[Block], Tensor | None]:
        """The blocks later calls of this step update, measured now, and their statistics (DeepSpeed's partitions)."""
        for backend in self.backends:
            ahead, rows = backend.measured_ahead(optimizer, blocks)
            if ahead:
                return ahead, rows
        return [], None

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether some block got its scale in an earlier optimizer step (asked of the backends of ``blocks``)."""
        return any(backend.scaling_started(optimizer, blocks) for backend in {id(b.backend): b.backend for b in blocks}.values())

    def reducer(self, blocks: Sequence[Block]) -> ExactReducer | None:
        """The exact cross-rank reducer of ``blocks``' statistics, ``None`` where nothing needs summing (one process;
        no block sharded: DDP gradients are already all-reduced)."""
        rank, world_size = world()
        if world_size == 1:
            return None
        for backend in self.backends:
            backend.check_blocks(blocks)
        if not any(b.placement.sharded for b in blocks):
            return None
        return ExactReducer([b.placement for b in blocks], world_size)

    def register(self, model: torch.nn.Module) -> int:
        """Tell every backend about ``model`` (FSDP1 views); returns the parameters recorded."""
        self._claimed.clear()
        return sum(backend.register(model) for backend in self.backends)


def refuse_unsupported_setup(args: Any = None) -> None:
    """Refuse, before any training, configurations whose per-tensor statistics cannot be exact (every backend's
    ``refuse_setup``). Called when the Trainer is built; the same parameter layouts are refused again at the first
    step."""
    for backend in BACKENDS:
        backend.refuse_setup(args)


def _tensor_blocks(tensors: Sequence[Tensor]) -> tuple[Backends, list[Block]]:
    """The blocks of plain ``tensors`` (no optimizer: throwaway state)."""
    backends = Backends()
    group = {"params": list(tensors)}
    backends.add_group(group)
    return backends, backends.blocks(SimpleNamespace(state=defaultdict(dict)), [group], stepping=False)


def statistics_reducer(tensors: Sequence[Tensor]) -> ExactReducer | None:
    """The exact cross-rank reducer for the statistics of ``tensors`` (in this order), or ``None`` where nothing needs
    summing (one process, DDP). A collective: call it on every rank with the same tensors. Raises
    :class:`UnsupportedShardingError` for layouts without exact per-tensor statistics (``Partial`` gradients, meshes
    not spanning all ranks, FlatParameters, unregistered FSDP1 views; ZeRO-3 parameters, once ``deepspeed`` is imported)."""
    backends, blocks = _tensor_blocks(tensors)
    return backends.reducer(blocks)


def local_statistics(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`sai_hf.gsnr.present_statistics` of plain ``tensors``' gradients (DTensors: their local shards)."""
    blocks = _tensor_blocks(tensors)[1]
    return present_statistics([b.grad for b in blocks], blocks[0].local.device if blocks else torch.device("cpu"))
