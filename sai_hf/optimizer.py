"""``SGDSaI``: SGD with momentum and learning-rate Scaling at Initialization (arXiv 2412.11768).

Each parameter tensor is a block ``i`` with a learning-rate scale ``s_i`` fixed once, from the
gradient signal-to-noise ratio of the first gradient the block receives in an optimizer step
(:mod:`sai_hf.gsnr`)::

    gsnr_i = ||g_i|| / (std(g_i) + eps)
    s_i    = gsnr_i                    normalize="none"  (sgd-sai 1.0.3, the official code; default)
    s_i    = gsnr_i / max_k gsnr_k     normalize="max"   (the paper's Algorithm 1)

and every step applies the update of :func:`sai_hf.functional.sgd_sai`::

    m <- g (first update), then m <- mu m + (1 - mu) g;   p <- p (1 - lr wd) - lr s_i m
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import gsnr, native
from .checkpoint import buffers_in_saved_dtype, prepare_state_dict, user_stacklevel, warn_restored_options
from .functional import sgd_sai
from .gsnr import NORMALIZATIONS, SCALE_RULES, BlockStatus
from .hyperparameters import check_shared, validate_hyperparameters
from .sharding import Backends, Block

__all__ = [
    "SGDSaI", "ScaleRecord", "StatisticsReducer", "NORMALIZATIONS", "SCALE_RULES", "validate_hyperparameters",
    "find_sgd_sai", "wrappers",
]  # fmt: skip

#: ``(B, STATISTICS_WIDTH)`` per-piece statistics -> their sums over the ranks holding the pieces.
StatisticsReducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ScaleRecord:
    """A block that received its scale (what :meth:`SGDSaI.initialize_scales` returns)."""

    param: Tensor
    gsnr: float
    scale: float
    numel: int
    status: BlockStatus


class SGDSaI(Optimizer):
    r"""SGD-SaI: momentum SGD whose per-tensor learning rates are fixed from the first gradient's g-SNR.

    Args:
        params: parameters or parameter groups (as for any ``torch.optim.Optimizer``).
        lr: learning rate ``eta``. Under ``normalize="none"`` block ``i``'s rate is ``lr * gsnr_i`` (a large matrix's
            g-SNR is about ``sqrt(numel)``), so useful values are of AdamW's order and published ``sgd-sai`` learning
            rates carry over. Under ``"max"``, ``lr`` equal to ``gsnr_max`` times the ``"none"`` one gives the same run.
        momentum: ``mu`` in [0, 1); ``m = mu m + (1 - mu) g``. ``0`` keeps no buffer.
        weight_decay: decoupled weight decay ``p *= 1 - lr * weight_decay`` (not scaled by g-SNR).
        eps: added to the gradient std in the g-SNR denominator.
        normalize: ``"none"`` (official ``sgd-sai==1.0.3`` scales, the default) or ``"max"`` (the paper: divide by the
            largest g-SNR of the first scaling step; blocks scaled later share that divisor, so their scale can exceed 1).
        maximize: ascend instead of descend (negates the gradient).
        scale_rule: ``"gsnr"`` (default) or ``"sqrt_numel"``: ``sqrt(numel_i)`` in place of ``gsnr_i`` (the authors'
            unreleased ``v1.1.0-nightly`` rule); the g-SNR is still measured and stored, and blocks are still scaled at
            their first usable gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path.
        fused: one pass per block (the memory-bandwidth floor). ``foreach=None, fused=None`` (default) takes it
            wherever it applies, the multi-tensor path otherwise (:func:`sai_hf.functional.sgd_sai`).
        momentum_dtype: dtype of the momentum buffers (default: each parameter's own). ``torch.bfloat16`` for float32
            parameters halves optimizer memory; the update is computed in the parameter's precision and written back
            with unbiased stochastic rounding.

    Where the g-SNR is not defined (``sai_hf`` departs from the official code here):

    * **Deferred blocks.** A block whose gradient is absent, all zero or non-finite gets no scale and is not touched
      (no momentum, no weight decay) until its first step with a non-zero finite gradient (PEFT ``lora_A``).
    * **Deferred blocks drop eps.** Blocks scaled after the first scaling step use ``norm / std``: their first
      non-zero gradient is tiny by construction (``lora_A``'s ~1e-9 < ``eps``), where ``norm / (std + eps)`` would
      measure magnitude, not signal-to-noise. Blocks scaled at the first step keep the official formula.
    * **Degenerate blocks.** A one-element block, or a gradient with (near) zero variance, gets ``gsnr_max`` as its
      g-SNR (scale 1.0 under ``"max"``; 1.0 before ``gsnr_max`` is known) and one warning, not ``|g| / eps``.

    State (``state_dict``): per block ``momentum_buffer`` (when ``momentum > 0``), ``gsnr``, ``scale``,
    ``gsnr_eps_free``, ``step`` (its update count); per group ``gsnr_max``. A sharding backend may keep blocks' state
    elsewhere (DeepSpeed ZeRO: its partitions' state). Resuming continues exactly; scales are never recomputed. Scales
    are host floats: a step syncs the device only while a block with a gradient waits for its scale (one transfer).
    ``sharding`` (:class:`sai_hf.sharding.Backends`): where each block's entries live, and how their statistics
    combine across ranks.
    """

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, eps: float = 1e-8,
        normalize: str = "none", maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
        momentum_dtype: torch.dtype | None = None, scale_rule: str = "gsnr",
    ) -> None:  # fmt: skip
        if isinstance(lr, Tensor):
            raise ValueError("Invalid lr: a Tensor learning rate is not supported, pass a float")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, normalize=normalize, maximize=maximize)
        defaults.update(fused=fused, foreach=foreach, momentum_dtype=momentum_dtype, scale_rule=scale_rule)
        validate_hyperparameters(**defaults)
        self.sharding = Backends()
        super().__init__(params, {**defaults, "gsnr_max": None})
        if any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            native.library()  # build the CPU kernels (g-SNR statistics, update) now, not in the first step
        self._warned_degenerate = False
        self.sharding.groups.bind(self.param_groups)
        self._register_state_dict_layout()

    def _register_state_dict_layout(self) -> None:
        # state_dict() lists every block with the same keys (placeholders, dropped on load): torch.distributed.checkpoint
        # loads only the keys of a fresh optimizer's template, in which every block is deferred.
        if getattr(self, "_state_dict_layout_hooks", None) is None:  # load_state_dict calls __setstate__
            self._state_dict_layout_hooks = (
                self.register_state_dict_post_hook(_complete_state_dict),
                self.register_load_state_dict_pre_hook(_drop_placeholders),
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checked = {k: v for k, v in param_group.items() if k not in ("params", "gsnr_max") and k in self.defaults}
        validate_hyperparameters(**checked)
        check_shared(param_group, self.param_groups, self.defaults)
        super().add_param_group(param_group)
        self.sharding.add_group(self.param_groups[-1])
        # A group added after scaling started shares the divisor of the first scaling step.
        known = [g["gsnr_max"] for g in self.param_groups if g.get("gsnr_max") is not None]
        if known:
            param_group["gsnr_max"] = known[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this package (any version) or of the official ``sgd-sai`` (its g-SNR values become the
        scales), after checking every buffer against its parameter; buffers keep their saved dtype
        (:mod:`sai_hf.checkpoint`). ``ValueError`` for another optimizer's state, naming what it looks like."""
        state_dict = prepare_state_dict(self, state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            missing = [key for key in ("lr", "momentum", "weight_decay", "eps") if key not in group]
            try:
                if missing:
                    raise ValueError(f"missing {missing}")
                validate_hyperparameters(**{k: v for k, v in group.items() if k in self.defaults and k != "gsnr_max"})
            except ValueError as err:
                raise ValueError(f"Optimizer state dict: parameter group #{index}: {err}") from None
        warn_restored_options(self, state_dict)
        super().load_state_dict(state_dict)
        buffers_in_saved_dtype(self, state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._warned_degenerate = getattr(self, "_warned_degenerate", False)
        if not hasattr(self, "sharding"):
            self.sharding = Backends()
            for group in self.param_groups:
                self.sharding.add_group(group)
        self.sharding.groups.bind(self.param_groups)
        self._register_state_dict_layout()
        for group in self.param_groups:  # torch.optim's pattern: every option present in an unpickled group
            for key, value in (("normalize", "none"), ("scale_rule", "gsnr"), ("maximize", False), ("gsnr_max", None)):
                group.setdefault(key, value)
            for key in ("foreach", "fused", "momentum_dtype"):
                group.setdefault(key, None)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step::

            blocks  = this rank's views of every block of the groups being stepped (sharding backends)
            pending = blocks without a scale that have a gradient here, or may have one on another rank,
                      and the blocks later calls of this step update, measured now (a wrapper stepping in calls)
            scale pending blocks: statistics -> exact cross-rank sum -> g-SNR -> scale (sai_hf.gsnr)
            update every scaled block that has a gradient (sai_hf.functional.sgd_sai)

        ``pending`` is the same on every rank (scales are), so the reduction is entered by all ranks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _refuse_sparse_gradients(self.param_groups)
        blocks = self.sharding.blocks(self, self.param_groups, stepping=True)
        ahead, ahead_rows = self.sharding.measured_ahead(self, blocks)
        self._scale([*blocks, *ahead], [b for b in blocks if _pending(b)] + ahead, None, ahead_rows)
        self._update(blocks)
        return loss

    def _statistics(self, blocks: Sequence[Block], ahead_rows: Tensor | None = None) -> Tensor:
        """``(B, STATISTICS_WIDTH)`` statistics of ``blocks``' local gradients (:mod:`sai_hf.gsnr`); ``ahead_rows``: those
        of the last ones, measured by their backend."""
        counted = len(blocks) - (0 if ahead_rows is None else len(ahead_rows))
        stats = gsnr.present_statistics([b.grad for b in blocks[:counted]], blocks[0].local.device)
        if ahead_rows is None:
            return stats
        return torch.cat((stats, ahead_rows.to(stats.device))) if counted else ahead_rows

    def _scale(
        self, blocks: Sequence[Block], pending: Sequence[Block], reduce_statistics: StatisticsReducer | None,
        ahead_rows: Tensor | None = None,
    ) -> list[ScaleRecord]:  # fmt: skip
        """Compute and store the scales of ``pending`` (some of ``blocks``): one host sync, and one cross-rank
        reduction where a block is sharded. ``ahead_rows``: the statistics of the last pending blocks."""
        if not pending:
            return []
        started = self.sharding.scaling_started(self, blocks)
        reduce = reduce_statistics or self.sharding.reducer(pending)
        eps = [b.group["eps"] for b in pending]
        values, statuses = gsnr.measure(self._statistics(pending, ahead_rows), eps, [started] * len(pending), reduce)
        groups = self.sharding.groups.every(self.param_groups)
        first_step = self.gsnr_max is None or not started  # (a wrapper may step its groups one call each)
        numels = [b.placement.numel for b in pending]
        rule = groups[0]["scale_rule"]
        gsnr_max, assigned = gsnr.scales(values, statuses, numels, self.gsnr_max, groups[0]["normalize"], rule, first_step)
        if first_step:
            for group in groups:
                group["gsnr_max"] = gsnr_max
        if rule == "gsnr" and BlockStatus.DEGENERATE in statuses and not self._warned_degenerate:
            self._warned_degenerate = True
            warnings.warn(
                f"SGDSaI: {statuses.count(BlockStatus.DEGENERATE)} block(s) have a gradient with no usable variance "
                "(one element, or all entries equal): g-SNR is undefined there. They get the largest well-defined "
                "g-SNR of the first step instead of |g|/eps.",
                stacklevel=user_stacklevel(),  # the user's opt.step() line, past torch.no_grad's wrapper
            )
        records = []
        for block, scaled in zip(pending, assigned):
            if scaled is not None:
                block.state.update(gsnr=scaled.gsnr, scale=scaled.scale, gsnr_eps_free=started)
                records.append(ScaleRecord(block.param, scaled.gsnr, scaled.scale, block.placement.numel, scaled.status))
        return records

    def _update(self, blocks: Sequence[Block]) -> None:
        """:func:`sai_hf.functional.sgd_sai` on the local views of every scaled block with a
        gradient here, group by group; blocks without a scale are not touched."""
        by_group: dict[int, list[Block]] = {}
        for b in blocks:
            if b.grad is not None and "scale" in b.state:
                by_group.setdefault(id(b.group), []).append(b)
        for chosen in by_group.values():
            group = chosen[0].group
            buffers = [b.buffer for b in chosen]
            steps = [b.state.get("step", 0) for b in chosen]
            options = ("lr", "momentum", "weight_decay", "maximize", "foreach", "fused", "momentum_dtype")
            sgd_sai(
                [b.local for b in chosen], [b.grad for b in chosen], buffers, [b.state["scale"] for b in chosen],  # type: ignore[misc]
                steps=steps, **{key: group[key] for key in options},
            )  # fmt: skip
            for b, buf, count in zip(chosen, buffers, steps):
                b.state["step"] = count + 1
                if b.buffer is None and buf is not None:
                    b.backend.keep_buffer(b, buf)

    # ------------------------------------------------------------------ scales, outside the step
    @property
    def gsnr_max(self) -> float | None:
        """The ``normalize="max"`` divisor: the largest well-defined g-SNR of the first scaling step
        (under ``scale_rule="sqrt_numel"`` its largest ``sqrt(numel)``); ``None`` before it."""
        groups = self.sharding.groups.every(self.param_groups)
        return groups[0]["gsnr_max"] if groups else None

    def blocks(self) -> list[Block]:
        """This rank's view of every block (:class:`sai_hf.sharding.Block`): its model parameter, local entries and
        gradient, state (``gsnr``, ``scale``, ``gsnr_eps_free`` once scaled), placement (``placement.numel``: whole size)."""
        return self.sharding.blocks(self, self.param_groups, stepping=False)

    def has_scale(self, param: Tensor) -> bool:
        """Whether optimizer parameter ``param`` already has its fixed scale."""
        return "scale" in self.state.get(param, {})

    def pending_params(self) -> list[Tensor]:
        """Blocks (model parameters) that have a gradient here now but no scale yet."""
        return [b.param for b in self.blocks() if b.grad is not None and "scale" not in b.state]

    @torch.no_grad()
    def initialize_scales(
        self, params: Iterable[Tensor] | None = None, reduce_statistics: StatisticsReducer | None = None
    ) -> list[ScaleRecord]:
        """Scale, now, the pending blocks (of ``params``, default all) as :meth:`step` would, without
        updating. ``step()`` does this by itself; call it to inspect scales before the first step, or
        to sum the statistics with your own ``reduce_statistics`` (``(B, STATISTICS_WIDTH)`` rows ->
        their sums over ranks). A collective under sharding: call it on every rank, with the same
        ``params``. Under DeepSpeed ZeRO (gradients exist only inside the engine's step) it returns ``[]``."""
        _refuse_sparse_gradients(self.param_groups)
        blocks = self.blocks()
        chosen = None if params is None else {id(p) for p in params}
        pending = [b for b in blocks if _pending(b) and (chosen is None or id(b.param) in chosen)]
        return self._scale(blocks, pending, reduce_statistics)

    @torch.no_grad()
    def measure_gsnr(self, reduce_statistics: StatisticsReducer | None = None) -> dict[Tensor, float]:
        """g-SNR of every scaled block's *current* gradient, computed as its scale was (same eps rule and reduction;
        scales unchanged); blocks without a gradient on every rank are left out. A collective: call it on every rank."""
        blocks = [b for b in self.blocks() if "scale" in b.state and (b.grad is not None or b.may_lack_gradient)]
        if not blocks:
            return {}
        eps_free = [bool(b.state.get("gsnr_eps_free", False)) for b in blocks]
        reduce = reduce_statistics or self.sharding.reducer(blocks)
        values, statuses = gsnr.measure(self._statistics(blocks), [b.group["eps"] for b in blocks], eps_free, reduce)
        return {b.param: v for b, v, s in zip(blocks, values, statuses) if s == BlockStatus.SCALED}

    def scales(self, names: Mapping[Tensor, str] | None = None) -> dict[Any, float]:
        """The fixed scale of every scaled block, keyed by model parameter (or by name with ``names``)."""
        key = (lambda p: names.get(p, p)) if names is not None else (lambda p: p)
        return {key(b.param): b.state["scale"] for b in self.blocks() if "scale" in b.state}

    def all_blocks_scaled(self) -> bool:
        """Whether every block has its fixed scale (the same answer on every rank)."""
        return all("scale" in b.state for b in self.blocks())

    def register_model(self, model: torch.nn.Module) -> int:
        """Tell the sharding backends about ``model`` (FSDP1 views, which the parameters do not reveal); idempotent,
        returns the number of parameters recorded."""
        return self.sharding.register(model=model)


def _complete_state_dict(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Every block in ``state_dict["state"]`` with the keys of a scaled one (NaN scale, zero buffer,
    step 0 where the block has none yet)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = state_dict["state"][index] = dict(state_dict["state"].get(index, {}))  # not the live state's dict
            for key, value in (("step", 0), ("gsnr", math.nan), ("scale", math.nan), ("gsnr_eps_free", False)):
                entry.setdefault(key, value)
            if group["momentum"] != 0 and "momentum_buffer" not in entry:
                entry["momentum_buffer"] = torch.zeros_like(p, dtype=group.get("momentum_dtype") or p.dtype)
            index += 1
    return state_dict


def _drop_placeholders(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_complete_state_dict`: a NaN scale is no scale, step 0 means no buffer yet."""
    state = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        scale = entry.get("scale")
        if isinstance(scale, float) and math.isnan(scale):
            entry.pop("scale")
            entry.pop("gsnr", None)
            entry.pop("gsnr_eps_free", None)
        if int(entry.get("step", 0)) == 0:
            entry.pop("momentum_buffer", None)
            entry.pop("step", None)
        if entry:
            state[key] = entry
    return {**state_dict, "state": state}


def _refuse_sparse_gradients(param_groups: Sequence[Mapping[str, Any]]) -> None:
    """``ValueError`` naming the first parameter with a sparse gradient (g-SNR and the update are dense)."""
    for index, p in enumerate(p for group in param_groups for p in group["params"]):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise ValueError(
                f"SGDSaI does not support sparse gradients: parameter #{index} (shape {tuple(p.shape)}) has a "
                f"{p.grad.layout} gradient. Use dense gradients (e.g. torch.nn.Embedding(..., sparse=False))."
            )


def _pending(block: Block) -> bool:
    """Waiting for its scale, with a gradient here or possibly on another rank (the same on every rank)."""
    return "scale" not in block.state and (block.grad is not None or block.may_lack_gradient)


def wrappers(optimizer: Any) -> tuple[list[Any], SGDSaI | None]:
    """The objects around an :class:`SGDSaI` in ``optimizer``, outermost first, following ``.optimizer`` (e.g.
    accelerate's ``AcceleratedOptimizer``, then DeepSpeed's ZeRO optimizer), and the :class:`SGDSaI` (``[], None``
    where ``optimizer`` holds none)."""
    chain = []
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, SGDSaI):
            break
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return (chain, optimizer) if isinstance(optimizer, SGDSaI) else ([], None)


def find_sgd_sai(optimizer: Any) -> SGDSaI | None:
    """The :class:`SGDSaI` inside ``optimizer`` (unwrapping e.g. accelerate's ``AcceleratedOptimizer``)."""
    return wrappers(optimizer)[1]


