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

from . import native, scaling
from .checkpoint import buffers_in_saved_dtype, prepare_state_dict
from .functional import sgd_sai
from .gsnr import BlockStatus
from .scaling import NORMALIZATIONS, SCALE_RULES
from .sharding import Backends, Block, block_statistics

__all__ = [
    "SGDSaI",
    "ScaleRecord",
    "StatisticsReducer",
    "NORMALIZATIONS",
    "SCALE_RULES",
    "validate_hyperparameters",
    "find_sgd_sai",
    "register_sharded_model",
]

#: ``(B, STATISTICS_WIDTH)`` per-piece statistics -> their sums over the ranks holding the pieces.
StatisticsReducer = Callable[[Tensor], Tensor]
#: Hyperparameters every parameter group must share (the first scaling step's divisor is global).
SHARED_HYPERPARAMETERS = ("normalize", "scale_rule")


def validate_hyperparameters(**values: Any) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter among ``values``.

    Known keys: ``lr`` (>= 0), ``momentum`` (in [0, 1)), ``weight_decay`` (>= 0), ``eps`` (>= 0),
    ``normalize`` (one of :data:`NORMALIZATIONS`), ``scale_rule`` (one of :data:`SCALE_RULES`), every
    number finite; ``maximize`` (a bool);
    ``momentum_dtype`` (a floating ``torch.dtype`` or None); ``fused`` / ``foreach`` (a bool or
    None, not both True).
    """
    for key, value in values.items():
        if key == "maximize":
            if not isinstance(value, bool):
                raise ValueError(f"Invalid maximize={value!r}: expected True or False")
            continue
        if key in ("fused", "foreach"):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {key}={value!r}: expected True, False or None")
            continue
        if key in ("normalize", "scale_rule"):
            accepted = NORMALIZATIONS if key == "normalize" else SCALE_RULES
            if value not in accepted:
                raise ValueError(f"Invalid {key}={value!r}: expected one of {list(accepted)}")
            continue
        if key == "momentum_dtype":
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise ValueError(f"Invalid momentum_dtype={value!r}: expected a floating torch.dtype or None")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Invalid {key}={value!r}: expected a finite number")
        if key == "momentum" and not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid momentum={value!r}: must be in [0, 1)")
        if key in ("lr", "eps", "weight_decay") and value < 0.0:
            raise ValueError(f"Invalid {key}={value!r}: must be >= 0")
    if values.get("fused") and values.get("foreach"):
        raise ValueError("Invalid fused=True with foreach=True: choose one path")


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
        lr: learning rate ``eta``. Under ``normalize="none"`` the effective rate of block ``i`` is
            ``lr * gsnr_i``; g-SNR of a large matrix is about ``sqrt(numel)`` (tens to hundreds), so
            useful values are of AdamW's order (1e-4 .. 1e-3), and published ``sgd-sai`` learning
            rates carry over unchanged. Under ``normalize="max"`` every scale is divided by
            ``gsnr_max`` (the largest first-step g-SNR, about ``sqrt(numel)`` of the largest block;
            ``gsnr.json`` lists every block's g-SNR), so ``lr`` under ``"max"`` equal to ``gsnr_max``
            times ``lr`` under ``"none"`` gives the same run. Blocks scaled later (deferred, e.g.
            LoRA's ``lora_A``) share that divisor, so their scale can exceed 1.
        momentum: ``mu`` in [0, 1); ``m = mu m + (1 - mu) g``. ``0`` keeps no buffer.
        weight_decay: decoupled weight decay ``p *= 1 - lr * weight_decay`` (not scaled by g-SNR).
        eps: added to the gradient std in the g-SNR denominator.
        normalize: ``"none"`` (official ``sgd-sai==1.0.3`` scales, the default) or ``"max"`` (the
            paper: divide by the largest g-SNR among the blocks scaled at the first step; blocks
            scaled later use that same divisor).
        maximize: ascend instead of descend (negates the gradient).
        scale_rule: what the scale is built from. ``"gsnr"`` (default): the g-SNR above.
            ``"sqrt_numel"``: ``sqrt(numel_i)`` in place of ``gsnr_i`` (then divided by the largest
            ``sqrt(numel)`` of the first scaling step under ``normalize="max"``), the rule of the
            authors' later, unreleased ``v1.1.0-nightly`` branch. Since
            ``gsnr = sqrt(n) sqrt(1 + mu^2 / var)`` (unbiased corrections aside), the two differ only
            where a block's gradient mean is large against its spread; the g-SNR is still measured
            and stored (``gsnr.json`` shows both), and blocks are still scaled at their first usable
            gradient (deferred blocks stay untouched until then).
        foreach: use the multi-tensor ``torch._foreach_*`` path.
        fused: use torch's fused SGD kernel, one pass per block (the memory-bandwidth floor). With
            ``foreach=None, fused=None`` (default) the fused path is taken wherever it applies
            (floating-point parameters on CPU/CUDA/MPS/XPU, momentum in the parameter dtype), the
            multi-tensor path otherwise.
        momentum_dtype: dtype of the momentum buffers (default: each parameter's own dtype).
            ``torch.bfloat16`` for float32 parameters halves optimizer memory (0.5x parameter
            bytes, a quarter of AdamW's); the update is computed in the parameter's precision and
            written back to the buffer with unbiased stochastic rounding.

    Where the g-SNR is not defined, the behaviour is (``sai_hf`` fixes the official code here):

    * **Deferred blocks.** A block whose gradient is absent, all zero or non-finite gets no scale
      and is not touched (no momentum, no weight decay) until the first step where it is non-zero
      and finite; its scale is computed then. This is what makes PEFT LoRA ``lora_A`` train: its
      first gradient is exactly 0 because ``lora_B`` starts at 0.
    * **Deferred blocks drop eps.** Such a block's first non-zero gradient is tiny by
      construction (``lora_A``'s is ~1e-9, below ``eps=1e-8``), so ``norm / (std + eps)`` would
      measure the gradient's magnitude, not its signal-to-noise ratio (a 4x64 ``lora_A`` gets
      ~2 instead of ~16). Blocks scaled after the first scaling step therefore use the
      scale-invariant limit ``norm / std``. Blocks scaled at the first step keep the official
      formula (bit-compatible with ``sgd-sai``).
    * **Degenerate blocks.** A one-element block, or a non-zero gradient with (near) zero
      variance, has no meaningful g-SNR (the official code gives ``|g| / eps``, ~1e8, and the
      weight runs to -inf). It gets ``gsnr_max`` as its g-SNR (scale 1.0 under
      ``normalize="max"``), and a warning is issued once. ``gsnr_max`` is the largest well-defined
      g-SNR of the first scaling step that has one (the first step, unless it scaled only
      degenerate blocks); before it is known a degenerate block gets 1.0.

    State (``state_dict``): per block ``momentum_buffer`` (when ``momentum > 0``), ``gsnr`` and
    ``scale`` (floats), ``gsnr_eps_free``, ``step`` (the block's update count); per group
    ``gsnr_max``. A sharding backend may keep blocks' state elsewhere (DeepSpeed ZeRO: in its
    partitions' state, :mod:`sai_hf.sharding.deepspeed_zero`). Resuming from a state dict continues
    exactly; scales are never recomputed.

    Host syncs: scales are host floats, so a step syncs the device only while some block that has a
    gradient is still waiting for its scale (one batched transfer for all of them; normally just the
    first step).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        normalize: str = "none",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        momentum_dtype: torch.dtype | None = None,
        scale_rule: str = "gsnr",
    ) -> None:
        if isinstance(lr, Tensor):
            raise ValueError("Invalid lr: a Tensor learning rate is not supported, pass a float")
        validate_hyperparameters(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            normalize=normalize,
            maximize=maximize,
            fused=fused,
            foreach=foreach,
            momentum_dtype=momentum_dtype,
            scale_rule=scale_rule,
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            normalize=normalize,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            momentum_dtype=momentum_dtype,
            scale_rule=scale_rule,
            gsnr_max=None,
        )
        super().__init__(params, defaults)
        if any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            native.library()  # build the CPU kernels (g-SNR statistics, update) now, not in the first step
        self._warned_degenerate = False
        self._every_group = self.param_groups
        self._backends = Backends(self._model_param_groups)
        self._register_state_dict_layout()

    def _register_state_dict_layout(self) -> None:
        # state_dict() lists every block with the same keys; load_state_dict() drops the placeholders.
        # torch.distributed.checkpoint (FSDP2 resume) loads exactly the keys of a template built
        # from a freshly created optimizer after a zero-gradient step, which creates no SGD-SaI
        # state (every block is deferred): without placeholders the scales would not be loaded.
        if getattr(self, "_state_dict_layout_hooks", None) is None:  # load_state_dict calls __setstate__
            self._state_dict_layout_hooks = (
                self.register_state_dict_post_hook(_complete_state_dict),
                self.register_load_state_dict_pre_hook(_drop_placeholders),
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checked = {k: v for k, v in param_group.items() if k not in ("params", "gsnr_max") and k in self.defaults}
        validate_hyperparameters(**checked)
        for key in SHARED_HYPERPARAMETERS:
            value = param_group.get(key, self.defaults[key])
            if self.param_groups and value != self.param_groups[0][key]:
                source = "given" if key in param_group else "the optimizer's default"
                raise ValueError(
                    f"Invalid {key}={value!r} ({source}) for parameter group #{len(self.param_groups)}: "
                    f"all groups share one {key}, and group #0 has {self.param_groups[0][key]!r}"
                )
        super().add_param_group(param_group)
        # The model's parameters as constructed: DeepSpeed ZeRO later replaces them by flat partitions.
        if not hasattr(self, "_model_param_groups"):
            self._model_param_groups: list[list[Tensor]] = []
        self._model_param_groups.append(list(self.param_groups[-1]["params"]))
        # A group added after scaling started shares the divisor of the first scaling step.
        known = [g["gsnr_max"] for g in self.param_groups if g.get("gsnr_max") is not None]
        if known:
            param_group["gsnr_max"] = known[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this package (any version) or of the official ``sgd-sai`` package
        (imported: its g-SNR values become the scales), after checking that every buffer fits its
        parameter; momentum buffers keep the dtype they were saved in (see :mod:`sai_hf.checkpoint`).
        Raises ``ValueError`` for another optimizer's state, naming what it looks like."""
        state_dict = prepare_state_dict(self, state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            missing = [key for key in ("lr", "momentum", "weight_decay", "eps") if key not in group]
            try:
                if missing:
                    raise ValueError(f"missing {missing}")
                validate_hyperparameters(**{k: v for k, v in group.items() if k in self.defaults and k != "gsnr_max"})
            except ValueError as err:
                raise ValueError(f"Optimizer state dict: parameter group #{index}: {err}") from None
        super().load_state_dict(state_dict)
        buffers_in_saved_dtype(self, state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._warned_degenerate = getattr(self, "_warned_degenerate", False)
        if not hasattr(self, "_model_param_groups"):
            self._model_param_groups = [list(g["params"]) for g in self.param_groups]
        if not hasattr(self, "_backends"):
            self._backends = Backends(self._model_param_groups)
        self._every_group = self.param_groups
        self._register_state_dict_layout()
        for group in self.param_groups:
            group.setdefault("normalize", "none")
            group.setdefault("scale_rule", "gsnr")
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("momentum_dtype", None)
            group.setdefault("gsnr_max", None)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step::

            blocks  = this rank's views of every block of the groups being stepped (sharding backends)
            pending = blocks without a scale that have a gradient here, or may have one on another rank
            scale pending blocks: statistics -> exact cross-rank sum -> sai_hf.scaling -> block state
            update every scaled block that has a gradient (sai_hf.functional.sgd_sai)

        ``pending`` is the same on every rank (scales are), so the reduction is entered by all ranks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _refuse_sparse_gradients(self.param_groups)
        blocks = self._backends.blocks(self, self.param_groups, stepping=True)
        self._scale(blocks, [b for b in blocks if _pending(b)], None)
        self._update(blocks)
        return loss

    def _scale(self, blocks: Sequence[Block], pending: Sequence[Block], reduce_statistics: StatisticsReducer | None) -> list[ScaleRecord]:
        """Compute and store the scales of ``pending`` (some of ``blocks``): one host sync, and one
        cross-rank reduction where a block is sharded."""
        if not pending:
            return []
        started = self._backends.scaling_started(self, blocks)
        reduce_statistics = reduce_statistics or self._backends.reducer(pending)
        stats = block_statistics(pending)
        if reduce_statistics is not None:
            stats = reduce_statistics(stats)
        values, statuses = scaling.measured_gsnr(stats, [b.group["eps"] for b in pending], [started] * len(pending))
        numels = [b.placement.numel for b in pending]
        groups = self._all_groups()
        rule, normalize = groups[0]["scale_rule"], groups[0]["normalize"]
        gsnr_max = self.gsnr_max
        if gsnr_max is None or not started:  # the first scaling step (its groups may come one by one)
            known = [v for v in (gsnr_max, scaling.first_step_gsnr_max(values, statuses, numels, rule)) if v is not None]
            gsnr_max = max(known) if known else None
            for group in groups:
                group["gsnr_max"] = gsnr_max
        assigned = scaling.assigned_scales(values, statuses, numels, gsnr_max, normalize, rule)
        if rule == "gsnr" and BlockStatus.DEGENERATE in statuses and not self._warned_degenerate:
            self._warned_degenerate = True
            warnings.warn(
                f"SGDSaI: {statuses.count(BlockStatus.DEGENERATE)} block(s) have a gradient with no usable variance "
                "(one element, or all entries equal): g-SNR is undefined there. They get the largest well-defined "
                "g-SNR of the first step instead of |g|/eps.",
                stacklevel=3,
            )
        records = []
        for block, scaled in zip(pending, assigned):
            if scaled is None:
                continue
            block.state.update(gsnr=scaled.gsnr, scale=scaled.scale, gsnr_eps_free=started)
            if block.step_index is not None:
                block.state["scaled_at"] = block.step_index
            records.append(ScaleRecord(block.param, scaled.gsnr, scaled.scale, block.placement.numel, scaled.status))
        return records

    def _update(self, blocks: Sequence[Block]) -> None:
        """:func:`sai_hf.functional.sgd_sai` on the local views of every scaled block with a
        gradient here, group by group; blocks without a scale are not touched."""
        by_group: dict[int, list[Block]] = {}
        for b in blocks:
            if b.grad is not None and "scale" in b.state and not b.scale_only:
                by_group.setdefault(id(b.group), []).append(b)
        for chosen in by_group.values():
            group = chosen[0].group
            buffers = [b.buffer for b in chosen]
            steps = [b.state.get("step", 0) for b in chosen]
            sgd_sai(
                [b.local for b in chosen],
                [b.grad for b in chosen],  # type: ignore[misc]
                buffers,
                [b.state["scale"] for b in chosen],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
                momentum_dtype=group["momentum_dtype"],
                steps=steps,
            )
            for b, buf, count in zip(chosen, buffers, steps):
                b.state["step"] = count + 1
                if b.buffer is None and buf is not None:
                    b.backend.keep_buffer(b, buf)

    # ------------------------------------------------------------------ scales, outside the step
    @property
    def gsnr_max(self) -> float | None:
        """The ``normalize="max"`` divisor: the largest well-defined g-SNR of the first scaling step
        (under ``scale_rule="sqrt_numel"`` its largest ``sqrt(numel)``); ``None`` before it."""
        groups = self._all_groups()
        return groups[0]["gsnr_max"] if groups else None

    def _all_groups(self) -> list[dict[str, Any]]:
        """Every parameter group, also while a wrapper has narrowed ``param_groups`` to the one it
        steps (DeepSpeed ZeRO steps the groups one at a time, on the same group dicts)."""
        if not all(any(g is h for h in self._every_group) for g in self.param_groups):
            self._every_group = self.param_groups
        return self._every_group

    def blocks(self) -> list[Block]:
        """This rank's view of every block (:class:`sai_hf.sharding.Block`): the model parameter it
        is, its local entries and gradient, its state (``gsnr``, ``scale``, ``gsnr_eps_free`` once
        scaled) and its placement (``placement.numel``: the whole block's size)."""
        return self._backends.blocks(self, self.param_groups, stepping=False)

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
        """g-SNR of every scaled block's *current* gradient, computed exactly as its scale was
        (same eps rule, same cross-rank reduction); the scales are not changed. Blocks without a
        gradient on every rank are left out. A collective under sharding: call it on every rank."""
        blocks = [b for b in self.blocks() if "scale" in b.state and (b.grad is not None or b.may_lack_gradient)]
        if not blocks:
            return {}
        reduce_statistics = reduce_statistics or self._backends.reducer(blocks)
        stats = block_statistics(blocks)
        if reduce_statistics is not None:
            stats = reduce_statistics(stats)
        eps_free = [bool(b.state.get("gsnr_eps_free", False)) for b in blocks]
        values, statuses = scaling.measured_gsnr(stats, [b.group["eps"] for b in blocks], eps_free)
        return {b.param: v for b, v, s in zip(blocks, values, statuses) if s == BlockStatus.SCALED}

    def scales(self, names: Mapping[Tensor, str] | None = None) -> dict[Any, float]:
        """The fixed scale of every scaled block, keyed by model parameter (or by name with ``names``)."""
        return {
            (names.get(b.param, b.param) if names is not None else b.param): b.state["scale"]
            for b in self.blocks()
            if "scale" in b.state
        }

    def all_blocks_scaled(self) -> bool:
        """Whether every block has its fixed scale (the same answer on every rank)."""
        return all("scale" in b.state for b in self.blocks())

    def register_model(self, model: torch.nn.Module) -> int:
        """Tell the sharding backends about ``model`` (FSDP1 views, which the parameters do not
        reveal); idempotent, returns the number of parameters recorded."""
        return self._backends.register_model(model)


def _complete_state_dict(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Every block in ``state_dict["state"]`` with the keys of a scaled one (NaN scale, zero buffer,
    step 0 where the block has none yet)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = state_dict["state"].setdefault(index, {})
            entry.setdefault("step", 0)
            entry.setdefault("gsnr", math.nan)
            entry.setdefault("scale", math.nan)
            entry.setdefault("gsnr_eps_free", False)
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
    for index, p in enumerate(group_of_params(param_groups)):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise ValueError(
                f"SGDSaI does not support sparse gradients: parameter #{index} (shape {tuple(p.shape)}) has a "
                f"{p.grad.layout} gradient. Use dense gradients (e.g. torch.nn.Embedding(..., sparse=False))."
            )


def _pending(block: Block) -> bool:
    """Waiting for its scale, with a gradient here or possibly on another rank (the same on every rank)."""
    return "scale" not in block.state and (block.grad is not None or block.may_lack_gradient)


def find_sgd_sai(optimizer: Any) -> SGDSaI | None:
    """The :class:`SGDSaI` inside ``optimizer`` (unwrapping e.g. accelerate's ``AcceleratedOptimizer``)."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, SGDSaI):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def register_sharded_model(model: torch.nn.Module, optimizer: Any) -> int:
    """Tell ``optimizer`` (an :class:`SGDSaI`, possibly wrapped, e.g. by accelerate) about ``model``:
    records which of its parameters are FSDP1 ``use_orig_params=True`` shard views, which FSDP1
    leaves unmarked. Idempotent; returns the number of parameters recorded. FSDP2, DDP and DeepSpeed
    need no registration; :class:`sai_hf.GSNRCallback` does it with the Trainer's model. Plain-PyTorch
    FSDP1 users call it once after wrapping and building the optimizer."""
    sai = find_sgd_sai(optimizer)
    if sai is None:
        raise TypeError("register_sharded_model: optimizer is not an sai_hf.SGDSaI (nor wraps one)")
    return sai.register_model(model)


def group_of_params(param_groups: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    """All parameters of ``param_groups``, in order."""
    return [p for group in param_groups for p in group["params"]]

