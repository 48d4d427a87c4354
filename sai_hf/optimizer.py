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

from .checkpoint import buffers_in_saved_dtype, prepare_state_dict
from . import native
from .gsnr import BlockStatus, gsnr_from_statistics
from .sharding import BlockLayout, ScaleRecord, StatisticsReducer, new_layout, replaced_layout

__all__ = [
    "SGDSaI",
    "ScaleRecord",
    "AssignedScale",
    "StatisticsReducer",
    "NORMALIZATIONS",
    "SCALE_RULES",
    "validate_hyperparameters",
]

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("none", "max")
#: Accepted values of ``scale_rule``: what a block's scale is built from (see :class:`SGDSaI`).
SCALE_RULES = ("gsnr", "sqrt_numel")
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
class AssignedScale:
    """A block's g-SNR (the measured one; under ``scale_rule="gsnr"`` after the degenerate
    fallback: the value its scale is built from) and its scale."""

    gsnr: float
    scale: float
    status: BlockStatus


class SGDSaI(Optimizer):
    r"""SGD-SaI: momentum SGD whose per-tensor learning rates are fixed from the first gradient's g-SNR.

    Args:
        params: parameters or parameter groups (as for any ``torch.optim.Optimizer``).
        lr: learning rate ``eta``. Under ``normalize="none"`` the effective rate of block ``i`` is
            ``lr * gsnr_i``; g-SNR of a large matrix is about ``sqrt(numel)`` (tens to hundreds), so
            useful values are of AdamW's order (1e-4 .. 1e-3), and published ``sgd-sai`` learning
            rates carry over unchanged. Under ``normalize="max"`` the scales of the blocks scaled at
            the first step are in (0, 1] and ``lr`` is the rate of the highest-g-SNR block: useful
            values are 10-100x larger (SGD's order). Blocks scaled later (deferred, e.g. LoRA's
            ``lora_A``) share that divisor, so their scale can exceed 1.
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
    ``scale`` (floats), ``step`` (the block's update count, an int); per group ``gsnr_max`` (the largest well-defined g-SNR of the first scaling
    step that has one). Resuming from a state dict continues exactly; scales are never recomputed.

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
        self._layout: BlockLayout = new_layout(self)
        self._layout_decided = False  # see layout()
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
        if not hasattr(self, "_layout"):
            self._layout = new_layout(self)
            self._layout_decided = False
        self._register_state_dict_layout()
        for group in self.param_groups:
            group.setdefault("normalize", "none")
            group.setdefault("scale_rule", "gsnr")
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("momentum_dtype", None)
            group.setdefault("gsnr_max", None)

    # ------------------------------------------------------------------ scales
    @property
    def gsnr_max(self) -> float | None:
        """The ``normalize="max"`` divisor: the largest well-defined g-SNR of the first scaling step
        (under ``scale_rule="sqrt_numel"`` its largest ``sqrt(numel)``); ``None`` before it."""
        return self.param_groups[0]["gsnr_max"] if self.param_groups else None

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    def has_scale(self, param: Tensor) -> bool:
        """Whether ``param`` already has its fixed scale."""
        return "scale" in self.state.get(param, {})

    def pending_params(self) -> list[Tensor]:
        """Parameters that have a gradient now but no scale yet."""
        return self.layout().pending_blocks(self)

    @torch.no_grad()
    def initialize_scales(
        self,
        params: Iterable[Tensor] | None = None,
        reduce_statistics: StatisticsReducer | None = None,
    ) -> list[ScaleRecord]:
        """Compute and store the scale of every given block that has a usable gradient and no scale.

        Called lazily by :meth:`step`, and by :class:`sai_hf.GSNRCallback` just before the
        Trainer's optimizer step. ``params`` defaults to every block of the optimizer.
        Blocks whose gradient is absent, zero or non-finite stay pending. One host sync (a
        cross-rank reduction adds one: the check that all ranks reduced the same blocks).

        ``reduce_statistics`` sums the per-shard statistics across ranks. By default
        (``None``) the optimizer's layout picks it (:meth:`layout`,
        :meth:`sai_hf.sharding.tensors.TensorBlocks.reducer`): none for unsharded gradients (one
        process, DDP), the exact one-``all_reduce`` reducer when some gradient is a shard (FSDP2
        DTensors, registered FSDP1 views). With a reducer this is a collective: call it on every
        rank, with the same ``params``; blocks whose gradient may be absent on this rank only (FSDP1
        views outside the local shard) take part with zero statistics, and at most one reduction
        runs per optimizer step (:class:`sai_hf.sharding.base.ReductionSchedule`).

        Under DeepSpeed ZeRO the scales are computed inside :meth:`step` (DeepSpeed steps from
        within ``backward``, and only there do the partitions have gradients): this returns ``[]``.
        """
        _refuse_sparse_gradients(self.param_groups)
        return self.layout().initialize_scales(self, None if params is None else list(params), reduce_statistics)

    # ------------------------------------------------------------------ measuring and assigning
    @staticmethod
    def measured_gsnr(
        stats: Tensor, eps: Sequence[float], eps_free: bool | Sequence[bool] = False
    ) -> tuple[list[float], list[BlockStatus]]:
        """Measuring: the g-SNR and :class:`BlockStatus` of each row of the (reduced) statistics
        ``stats`` (:func:`sai_hf.gsnr.gsnr_from_statistics`), as host values: the one host sync.

        ``eps[i]`` is block ``i``'s eps; ``eps_free`` (one bool, or one per block) drops it:
        ``gsnr = norm / std`` (see "deferred blocks drop eps" in the class docstring)."""
        eps_t = torch.tensor(list(eps), dtype=stats.dtype, device=stats.device)
        eps_free_t = torch.as_tensor(eps_free, device=stats.device)
        gsnr, status = gsnr_from_statistics(stats, eps_t, eps_free=eps_free_t)
        values, codes = torch.stack((gsnr, status.to(gsnr.dtype))).tolist()
        return values, [BlockStatus(int(c)) for c in codes]

    @staticmethod
    def first_step_gsnr_max(
        values: Sequence[float],
        statuses: Sequence[BlockStatus],
        numels: Sequence[int] | None = None,
        scale_rule: str = "gsnr",
    ) -> float | None:
        """The ``normalize="max"`` divisor of a first scaling step, ``None`` if there is none: the
        largest well-defined (``SCALED``) g-SNR among ``values``; under ``scale_rule="sqrt_numel"``
        the largest ``sqrt(numels[i])`` among the blocks that are not ``PENDING``."""
        if scale_rule == "sqrt_numel":
            known = [math.sqrt(n) for n, s in zip(_required(numels), statuses) if s != BlockStatus.PENDING]
        else:
            known = [v for v, s in zip(values, statuses) if s == BlockStatus.SCALED]
        return max(known) if known else None

    def assigned_scales(
        self,
        values: Sequence[float],
        statuses: Sequence[BlockStatus],
        gsnr_max: float | None,
        normalize: str,
        numels: Sequence[int] | None = None,
        scale_rule: str = "gsnr",
    ) -> list[AssignedScale | None]:
        """Assigning: the scale of each measured block (``None`` where it stays ``PENDING``)::

            basis_i = gsnr_i                                          scale_rule="gsnr"
            basis_i = gsnr_max (1.0 before any well-defined g-SNR)    ... if DEGENERATE (warned once)
            basis_i = sqrt(numels[i])                                 scale_rule="sqrt_numel"
            scale_i = basis_i                                         normalize="none"
            scale_i = basis_i / gsnr_max (1.0 before it is known)     normalize="max"

        ``gsnr_max`` is the divisor of :meth:`first_step_gsnr_max` (same ``scale_rule``). The
        returned g-SNR is ``basis_i`` under ``"gsnr"``, the measured g-SNR (0 if degenerate) under
        ``"sqrt_numel"``.
        """
        out: list[AssignedScale | None] = []
        degenerate = 0
        sizes = _required(numels) if scale_rule == "sqrt_numel" else [0] * len(values)
        for value, status, numel in zip(values, statuses, sizes):
            if status == BlockStatus.PENDING:
                out.append(None)
                continue
            if scale_rule == "sqrt_numel":
                basis = math.sqrt(numel)
            else:
                if status == BlockStatus.DEGENERATE:
                    value = gsnr_max if gsnr_max is not None else 1.0
                    degenerate += 1
                basis = value
            if normalize == "max":
                scale = basis / gsnr_max if gsnr_max is not None else 1.0
            else:
                scale = basis
            out.append(AssignedScale(float(value), float(scale), status))
        if degenerate and not self._warned_degenerate:
            self._warned_degenerate = True
            warnings.warn(
                f"SGDSaI: {degenerate} block(s) have a gradient with no usable variance (one element, or all "
                "entries equal): g-SNR is undefined there. They get the largest well-defined g-SNR of the "
                "first step instead of |g|/eps.",
                stacklevel=3,
            )
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (computing the scales of blocks that have none yet)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        _refuse_sparse_gradients(self.param_groups)
        self.layout().step(self)
        return loss

    @torch.no_grad()
    def measure_gsnr(self, reduce_statistics: StatisticsReducer | None = None) -> dict[Tensor, float]:
        """g-SNR of every scaled block's *current* gradient, computed exactly as its scale was
        (same eps rule, same cross-rank reduction); the scales are not changed. Blocks without a
        gradient on every rank are left out. A collective under sharding: call it on every rank."""
        return self.layout().measure_gsnr(self, reduce_statistics)

    def scales(self, names: Mapping[Tensor, str] | None = None) -> dict[Any, float]:
        """The fixed scale of every scaled block, keyed by model parameter (or by name with ``names``)."""
        return {
            (names.get(p, p) if names is not None else p): state["scale"]
            for p, state in self.block_states()
            if "scale" in state
        }

    # ------------------------------------------------------------------ blocks and their layout
    def layout(self) -> BlockLayout:
        """This optimizer's :class:`~sai_hf.sharding.base.BlockLayout`: where each block's entries
        live on this rank and how its statistics are summed across ranks (:mod:`sai_hf.sharding`).

        A :class:`~sai_hf.sharding.tensors.TensorBlocks` (every parameter is a block) from
        construction on. Decided once, at the first call after the optimizer's parameters stopped
        being the model's own tensors (DeepSpeed ZeRO replaces them by flat partitions when it wraps
        the optimizer; so in practice at the first step): the layout that recognises the
        replacement (:func:`sai_hf.sharding.replaced_layout`) takes over."""
        if not self._layout_decided:
            current = group_of_params(self.param_groups)
            model_params = group_of_params([{"params": g} for g in self._model_param_groups])
            if model_params and not (len(current) == len(model_params) and current[0] is model_params[0]):
                self._layout = replaced_layout(self._model_param_groups) or self._layout
                self._layout_decided = True
        return self._layout

    def register_model(self, model: torch.nn.Module) -> int:
        """Tell the layout about ``model`` (FSDP1 views, which the parameters do not reveal);
        idempotent, returns the number of parameters recorded. See :func:`sai_hf.register_sharded_model`."""
        return self.layout().register_model(model)

    def block_numel(self, param: Tensor) -> int:
        """Number of elements of the whole block of model parameter ``param`` (not of a local shard)."""
        return self.layout().block_numel(param)

    def block_states(self) -> list[tuple[Tensor, Mapping[str, Any]]]:
        """``(model parameter, its SGD-SaI state)`` of every block: ``gsnr``, ``scale``,
        ``gsnr_eps_free`` once it is scaled. The model parameters are those the optimizer was built
        with (under DeepSpeed ZeRO the optimizer itself only holds flat partitions)."""
        return self.layout().block_states(self)

    def all_blocks_scaled(self) -> bool:
        """Whether every block has its fixed scale (the same answer on every rank)."""
        return all("scale" in state for _, state in self.block_states())


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


def _required(numels: Sequence[int] | None) -> Sequence[int]:
    if numels is None:
        raise ValueError('scale_rule="sqrt_numel" needs the blocks\' numels')
    return numels


def group_of_params(param_groups: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    """All parameters of ``param_groups``, in order."""
    return [p for group in param_groups for p in group["params"]]

