"""Each optimizer parameter is one block: one process, DDP, FSDP2 (DTensors), FSDP1 views.

:class:`TensorBlocks` is the :class:`~sai_hf.sharding.base.BlockLayout` of an optimizer that holds
the model's own tensors. Per-parameter questions (local pieces, placement, whole numel) go to the
first :class:`~sai_hf.sharding.base.TensorBackend` that claims the parameter; the state of block
``p`` is ``optimizer.state[p]``. For the blocks being scaled::

    rows   = statistics of each block's local gradient (a zero row where it is absent here)
    rows   = ExactReducer(placements)(rows)     only if some block is sharded and world size > 1
    scales = optimizer.assigned_scales(optimizer.measured_gsnr(rows))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..functional import sgd_sai
from ..gsnr import BlockStatus, gradient_statistics, zero_statistics
from .base import BlockLayout, ExactReducer, ReductionSchedule, ScaleRecord, StatisticsReducer, TensorBackend, world

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import SGDSaI

__all__ = ["TensorBlocks"]


class TensorBlocks(BlockLayout):
    """The blocks are the optimizer's parameters; ``backends`` answer for them, first claim wins."""

    def __init__(self, backends: Sequence[TensorBackend], schedule: ReductionSchedule | None = None) -> None:
        self.backends = list(backends)
        self.schedule = schedule  # the optimizer's; None: every reduction is due (no optimizer steps)
        # id(param) -> (param, its backend): the step asks for every parameter; cleared when a model
        # is registered (registration changes which backend claims a parameter).
        self._claimed: dict[int, tuple[Tensor, TensorBackend]] = {}

    # ------------------------------------------------------------------ where the entries live
    def backend(self, param: Tensor) -> TensorBackend:
        """The backend that answers for ``param`` (the first that claims it)."""
        cached = self._claimed.get(id(param))
        if cached is not None and cached[0] is param:
            return cached[1]
        for backend in self.backends:
            if backend.claims(param):
                self._claimed[id(param)] = (param, backend)
                return backend
        raise LookupError("no sharding backend claims this parameter")  # the last one claims all

    def block_numel(self, param: Tensor) -> int:
        return self.backend(param).numel(param)

    def register_model(self, model: torch.nn.Module) -> int:
        self._claimed.clear()
        return sum(backend.register_model(model) for backend in self.backends)

    def may_lack_gradient(self, param: Tensor) -> bool:
        return any(backend.may_lack_gradient(param) for backend in self.backends)

    def local_statistics(self, blocks: Sequence[Tensor]) -> Tensor:
        """:func:`sai_hf.gsnr.gradient_statistics` of ``blocks``' local gradients, with a zero row
        (no entries here) for a block whose gradient is ``None`` on this rank."""
        present = [i for i, p in enumerate(blocks) if p.grad is not None]
        local = [self.backend(blocks[i]).local(blocks[i].grad) for i in present]
        if len(present) == len(blocks):
            return gradient_statistics(local)
        device = self.backend(blocks[0]).local(blocks[0]).device if blocks else torch.device("cpu")
        rows = zero_statistics(len(blocks), device)
        if present:
            found = gradient_statistics(local)
            rows = rows.to(found.device, found.dtype)
            rows[torch.tensor(present, device=found.device)] = found
        return rows

    # ------------------------------------------------------------------ how to sum across ranks
    def reducer(self, blocks: Sequence[Tensor]) -> StatisticsReducer | None:
        """The exact cross-rank reducer for the statistics of ``blocks`` (in this order), or ``None``
        when no block is sharded (one process, DDP: the local statistics are the whole tensors').
        A reducer is a collective: call it on every rank with the same blocks in the same order.
        Raises :class:`~sai_hf.sharding.base.UnsupportedShardingError` for layouts without exact
        per-tensor statistics (even in one process, for the layouts no rank could reduce)."""
        rank, world_size = world()
        placements = [self.backend(p).placement(p, rank, world_size) for p in blocks]
        if world_size == 1:
            return None
        for backend in self.backends:
            backend.check_blocks(blocks)
        if not any(placement.sharded for placement in placements):
            return None
        return ExactReducer(placements, world_size)

    def _reduced_statistics(self, blocks: Sequence[Tensor], reduce_statistics: StatisticsReducer | None) -> Tensor:
        stats = self.local_statistics(blocks)
        return reduce_statistics(stats) if reduce_statistics is not None else stats

    # ------------------------------------------------------------------ BlockLayout
    def block_states(self, optimizer: SGDSaI) -> list[tuple[Tensor, Mapping[str, Any]]]:
        return [(p, optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]]

    def pending_blocks(self, optimizer: SGDSaI) -> list[Tensor]:
        return [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and not optimizer.has_scale(p)
        ]

    def initialize_scales(
        self, optimizer: SGDSaI, params: Sequence[Tensor] | None, reduce_statistics: StatisticsReducer | None
    ) -> list[ScaleRecord]:
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        every = [p for group in optimizer.param_groups for p in group["params"]]
        candidates = every if params is None else params
        todo = [
            p
            for p in candidates
            if id(p) in group_of and not optimizer.has_scale(p) and (p.grad is not None or self.may_lack_gradient(p))
        ]
        if not todo:
            return []
        if reduce_statistics is None:
            reduce_statistics = self.reducer(todo)
        if reduce_statistics is not None and self.schedule is not None and not self.schedule.due():
            return []
        scaling_started = any(optimizer.has_scale(p) for p in every)
        stats = self._reduced_statistics(todo, reduce_statistics)
        eps = [group_of[id(p)]["eps"] for p in todo]
        values, statuses = optimizer.measured_gsnr(stats, eps, eps_free=scaling_started)
        rule = optimizer.param_groups[0]["scale_rule"]
        numels = [self.block_numel(p) for p in todo]
        gsnr_max = optimizer.gsnr_max
        if gsnr_max is None:
            gsnr_max = optimizer.first_step_gsnr_max(values, statuses, numels, rule)
            if gsnr_max is not None:
                for group in optimizer.param_groups:
                    group["gsnr_max"] = gsnr_max
        normalize = optimizer.param_groups[0]["normalize"]
        assigned = optimizer.assigned_scales(values, statuses, gsnr_max, normalize, numels, rule)
        records: list[ScaleRecord] = []
        for p, scaled, numel in zip(todo, assigned, numels):
            if scaled is None:
                continue
            state = optimizer.state[p]
            state["gsnr"] = scaled.gsnr
            state["scale"] = scaled.scale
            state["gsnr_eps_free"] = bool(scaling_started)
            records.append(ScaleRecord(p, scaled.gsnr, scaled.scale, numel, scaled.status))
        return records

    def measure_gsnr(self, optimizer: SGDSaI, reduce_statistics: StatisticsReducer | None) -> dict[Tensor, float]:
        blocks = [p for group in optimizer.param_groups for p in group["params"] if optimizer.has_scale(p)]
        blocks = [p for p in blocks if p.grad is not None or self.may_lack_gradient(p)]
        if not blocks:
            return {}
        if reduce_statistics is None:
            reduce_statistics = self.reducer(blocks)
        stats = self._reduced_statistics(blocks, reduce_statistics)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        eps_free = [bool(optimizer.state[p].get("gsnr_eps_free", False)) for p in blocks]
        values, statuses = optimizer.measured_gsnr(stats, [group_of[id(p)]["eps"] for p in blocks], eps_free=eps_free)
        return {p: v for p, v, c in zip(blocks, values, statuses) if c == BlockStatus.SCALED}

    def step(self, optimizer: SGDSaI) -> None:
        if self.pending_blocks(optimizer):
            optimizer.initialize_scales()
        for group in optimizer.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor | None] = []
            scales: list[float] = []
            steps: list[int] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = optimizer.state.get(p)
                if not state or "scale" not in state:
                    continue  # deferred: no scale yet, leave the block untouched
                params.append(p)
                grads.append(p.grad)
                buffers.append(state.get("momentum_buffer"))
                scales.append(state["scale"])
                steps.append(state.get("step", 0))
            if not params:
                continue
            # The update runs on the local pieces; a new momentum buffer is wrapped like its
            # parameter (FSDP2: a DTensor, so that sharded checkpoints see one).
            backends = [self.backend(p) for p in params]
            local_buffers = [None if b is None else backend.local(b) for b, backend in zip(buffers, backends)]
            sgd_sai(
                [backend.local(p) for p, backend in zip(params, backends)],
                [backend.local(g) for g, backend in zip(grads, backends)],
                local_buffers,
                scales,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
                momentum_dtype=group["momentum_dtype"],
                steps=steps,
            )
            for p, backend, buf, local_buf, count in zip(params, backends, buffers, local_buffers, steps):
                state = optimizer.state[p]
                state["step"] = count + 1
                if buf is None and local_buf is not None:
                    buf = backend.like(local_buf, p)
                if buf is not None:
                    state["momentum_buffer"] = buf
