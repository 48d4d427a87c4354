"""DeepSpeed ZeRO stage 1 and 2: exact per-tensor g-SNR on DeepSpeed's flat fp32 partitions.

Under ZeRO-1/2 the optimizer that DeepSpeed wraps no longer holds the model's tensors: for every
parameter group ``k`` DeepSpeed concatenates the group's trainable parameters (the *blocks*
``b_1, b_2, ...``) into one flat buffer, pads it to a multiple of the world size, cuts it into one
contiguous *partition* per rank and replaces ``param_groups[k]["params"]`` by this rank's fp32
partition ``P_k``. Each block's entries form at most one contiguous *fragment* of ``P_k`` on a
rank (a block may be split between neighbouring ranks); DeepSpeed records it on the model
parameter as ``param._hp_mapping.hp_fragment_address`` (``start``, ``numel`` inside ``P_k``).

The statistics of a block are additive over disjoint pieces, so for every group being stepped::

    rows_b = statistics(g[start_b : start_b + numel_b])   if b has a fragment in this rank's P_k
           = zero row                                     otherwise
    stats  = all_reduce(SUM, rows)                        one collective for all blocks of the group

gives every rank the whole tensors' statistics, hence the single-process g-SNR and scale
(:meth:`sai_hf.SGDSaI.measured_gsnr` and :meth:`sai_hf.SGDSaI.assigned_scales`). The update runs per
fragment: :func:`sai_hf.functional.sgd_sai` on the views ``P_k[start:start+numel]``, its gradient and
momentum views, with the block's scale. Momentum lives in the partition's layout (one buffer like
``P_k``; zero in padding and in fragments not updated yet).

DeepSpeed steps the groups one at a time (``DeepSpeedZeroOptimizer._optimizer_step`` narrows
``param_groups`` to group ``k`` and calls ``step()``; the gradient of group ``k + 1`` does not exist
yet). So the reduction runs once per group, and quantities that couple groups are handled as:

* "deferred blocks drop eps" (a block scaled after the first scaling *optimizer step*) is decided
  from the partition step counters, identical to one process;
* ``gsnr_max`` (largest well-defined g-SNR of the first scaling step) is the max over the groups
  of that step, kept in every partition's state; a *degenerate* block of an earlier group of that
  same step falls back to the max over the groups measured so far (one process: over all groups);
* ``normalize="max"`` with more than one group would divide the first groups' scales by a partial
  max: refused with :class:`~sai_hf.sharding.base.UnsupportedShardingError`.

State of partition ``P_k`` (``optimizer.state[P_k]``, which DeepSpeed saves per rank in its
checkpoint)::

    momentum_buffer   tensor like P_k (absent with momentum=0)
    step              optimizer steps taken by this partition
    gsnr_max          see above (None before the first scaling step)
    blocks            {index of the block in its group: {"gsnr", "scale", "gsnr_eps_free",
                       "scaled_at", "step"}}

``blocks`` is indexed by the block's position in its parameter group, not by fragments, and holds
every block of the group on every rank (the scales are the same everywhere): it does not depend on
the world size.

Resuming from a DeepSpeed checkpoint restores ``optimizer.state`` per rank: the same world size
continues bit-exactly; another world size would hand a partition the momentum of another layout,
which :meth:`ZeroPartitions.step` refuses (DeepSpeed's universal checkpoint keeps only tensor state
per parameter, not ``blocks``: the scales would be lost, so it is not supported).

ZeRO-3 (parameters partitioned before the optimizer exists; ``ds_id``) and ``offload_optimizer``
(DeepSpeed's CPU optimizer path) are refused before training (:func:`refuse_unsupported_zero`, via
:meth:`ZeroPartitions.refuse_setup`), and ZeRO-3 parameters again at the first step
(:class:`Zero3Parameters`).

:class:`ZeroPartitions` is the optimizer's :class:`~sai_hf.sharding.base.BlockLayout` once
DeepSpeed has replaced its parameters by partitions (:meth:`ZeroPartitions.detect`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..functional import sgd_sai
from ..gsnr import gradient_statistics, zero_statistics
from .base import BlockLayout, Placement, ScaleRecord, StatisticsReducer, TensorBackend, UnsupportedShardingError

__all__ = [
    "ZeroPartitions",
    "Zero3Parameters",
    "deepspeed_in_use",
    "Fragment",
    "PARTITION_STATE_KEYS",
    "is_zero_partitioned",
    "deepspeed_config",
    "refuse_unsupported_zero",
    "refuse_unsupported_deepspeed",
    "DEEPSPEED_ZERO3_MESSAGE",
    "DEEPSPEED_OFFLOAD_MESSAGE",
]

DEEPSPEED_ZERO3_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed ZeRO stage 3: the parameters are partitioned "
    "before the optimizer exists, so per-tensor g-SNR statistics cannot be attributed exactly. Use ZeRO "
    "stage 2 (configs/deepspeed/zero2.json) or FSDP2 (configs/accelerate/fsdp.yaml), both exact."
)
DEEPSPEED_OFFLOAD_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed zero_optimization.offload_optimizer: "
    "its CPU-offloaded step path is not covered by sai-hf's exact per-tensor g-SNR. Remove "
    "offload_optimizer and use ZeRO stage 2 (configs/deepspeed/zero2.json) or FSDP2."
)
DEEPSPEED_OPTIMIZER_SECTION_MESSAGE = (
    "--optim sgd_sai with a DeepSpeed config that has an 'optimizer' section: DeepSpeed would build "
    "its own optimizer and SGD-SaI would not be used. Remove the 'optimizer' section (see "
    "configs/deepspeed/zero2.json)."
)
_LAYOUT_MISMATCH_MESSAGE = (
    "SGD-SaI: the momentum buffer restored for a DeepSpeed partition has shape {saved}, the partition "
    "{now}: the checkpoint was saved with another world size (or parameter grouping). Resuming "
    "SGD-SaI from a ZeRO checkpoint is supported at the same world size only."
)
_NORMALIZE_MAX_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO with {groups} parameter groups is not exact: "
    "DeepSpeed steps the groups one at a time, so the largest g-SNR over all blocks is not known "
    "when the first group is updated. Use normalize='none' (the default), one parameter group, or FSDP2."
)


#: Keys of a partition's state besides ``momentum_buffer`` and ``step`` (see the module docstring).
PARTITION_STATE_KEYS = frozenset({"blocks", "gsnr_max"})


@dataclass(frozen=True)
class Fragment:
    """The entries ``[start, start + numel)`` of partition ``P_k`` that belong to block ``index``
    (the ``index``-th trainable parameter of group ``k``)."""

    index: int
    start: int
    numel: int


def is_zero_partitioned(model_params: Sequence[Tensor]) -> bool:
    """Whether DeepSpeed ZeRO-1/2 has linked ``model_params`` to flat partitions (``_hp_mapping``)."""
    return any(hasattr(p, "_hp_mapping") for p in model_params)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ZeroPartitions(BlockLayout):
    """SGD-SaI's view of DeepSpeed ZeRO-1/2: which blocks live where in the flat partitions.

    Built by :class:`sai_hf.SGDSaI` at its first step under DeepSpeed (:meth:`detect`), from the
    parameter groups it was constructed with (``model_groups``: the model's parameters, in
    DeepSpeed's order).
    """

    STATE_KEYS = PARTITION_STATE_KEYS

    @classmethod
    def detect(cls, model_groups: Sequence[Sequence[Tensor]]) -> ZeroPartitions | None:
        """The layout, if DeepSpeed ZeRO-1/2 has linked the model's parameters to flat partitions."""
        return cls(model_groups) if is_zero_partitioned([p for g in model_groups for p in g]) else None

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """DeepSpeed ZeRO-3, optimizer offload or an ``optimizer`` section (:func:`refuse_unsupported_deepspeed`)."""
        refuse_unsupported_deepspeed(args)

    def __init__(self, model_groups: Sequence[Sequence[Tensor]]) -> None:
        # DeepSpeed links (sets ``_hp_mapping`` on) exactly the trainable parameters of each group.
        self.blocks: list[list[Tensor]] = [[p for p in group if hasattr(p, "_hp_mapping")] for group in model_groups]
        self._group_of_partition: dict[int, int] = {}

    # ------------------------------------------------------------------ layout
    def group_index(self, partition: Tensor) -> int:
        """Index ``k`` of the parameter group whose partition is ``partition`` (the partition being
        stepped: a partition that holds no fragment here, only padding, is the one group that no
        fragment locates)."""
        key = id(partition)
        if key not in self._group_of_partition:
            found = self._located_group(partition)
            if found is None:
                located = set(self._group_of_partition.values())
                unlocated = [k for k in range(len(self.blocks)) if k not in located]
                if len(unlocated) != 1:
                    raise RuntimeError("SGD-SaI: cannot tell which DeepSpeed parameter group a partition belongs to")
                found = unlocated[0]
            self._group_of_partition[key] = found
        return self._group_of_partition[key]

    def _located_group(self, partition: Tensor) -> int | None:
        """The group one of whose blocks has a fragment in ``partition`` (same storage), if any."""
        for k, blocks in enumerate(self.blocks):
            if any(p._hp_mapping is not None and _same_storage(p._hp_mapping.hp_fragment, partition) for p in blocks):
                return k
        return None

    def fragments(self, k: int) -> list[Fragment]:
        """The fragments of group ``k``'s blocks inside this rank's partition, in partition order."""
        out = []
        for index, p in enumerate(self.blocks[k]):
            mapping = p._hp_mapping
            if mapping is not None:
                address = mapping.hp_fragment_address
                out.append(Fragment(index, int(address.start), int(address.numel)))
        return sorted(out, key=lambda f: f.start)

    # ------------------------------------------------------------------ statistics
    def local_statistics(self, k: int, grad: Tensor, indices: Sequence[int]) -> Tensor:
        """Statistics rows of blocks ``indices`` of group ``k`` from this rank's fragments of
        ``grad`` (the partition's gradient); a zero row for a block with no fragment here."""
        where = {f.index: f for f in self.fragments(k)}
        rows = zero_statistics(len(indices), grad.device)
        present = [j for j, i in enumerate(indices) if i in where]
        if present:
            views = [grad.narrow(0, where[indices[j]].start, where[indices[j]].numel) for j in present]
            rows[torch.tensor(present, device=grad.device)] = gradient_statistics(views).to(rows)
        return rows

    @staticmethod
    def reduce(stats: Tensor) -> Tensor:
        """Sum ``stats`` over all ranks (one ``all_reduce``); every block's entries are counted once
        because the partitions are disjoint."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return stats
        buffer = stats.clone()
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        return buffer

    # ------------------------------------------------------------------ state
    @staticmethod
    def partition_state(optimizer: Any, partition: Tensor) -> dict[str, Any]:
        state = optimizer.state[partition]
        state.setdefault("step", 0)
        state.setdefault("gsnr_max", None)
        state.setdefault("blocks", {})
        return state

    def block_states(self, optimizer: Any) -> list[tuple[Tensor, Mapping[str, Any]]]:
        """``(model parameter, its per-block state)`` of every block, from whichever partition state
        (every rank keeps every block of its groups)."""
        out = []
        partitions = self._partitions(optimizer)
        for k, blocks in enumerate(self.blocks):
            state = optimizer.state.get(partitions[k], {}) if k in partitions else {}
            entries = state.get("blocks", {})
            out.extend((p, entries.get(i, {})) for i, p in enumerate(blocks))
        return out

    def pending_blocks(self, optimizer: Any) -> list[Tensor]:
        """The partitions that have a gradient and no scale (partitions never get one: blocks inside
        them do, in :meth:`step`)."""
        return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def initialize_scales(
        self, optimizer: Any, params: Sequence[Tensor] | None, reduce_statistics: StatisticsReducer | None
    ) -> list[ScaleRecord]:
        """Nothing: DeepSpeed steps from within ``backward``, and only there do the partitions have
        gradients, so the scales are computed inside :meth:`step`."""
        return []

    def measure_gsnr(self, optimizer: Any, reduce_statistics: StatisticsReducer | None) -> dict[Tensor, float]:
        """Not measured under ZeRO (the gradients are gone after the engine's step): ``{}``."""
        return {}

    def _partitions(self, optimizer: Any) -> dict[int, Tensor]:
        """Group index -> partition, for the partitions ``optimizer`` has state for."""
        out = {}
        for p in optimizer.state:
            k = self._group_of_partition.get(id(p))
            if k is None:
                k = self._located_group(p)
            if k is not None:
                out[k] = p
        return out

    def _scaling_started_before(self, optimizer: Any, step: int) -> bool:
        return any(
            entry.get("scaled_at", step) < step
            for state in optimizer.state.values()
            for entry in state.get("blocks", {}).values()
        )

    def _first_step_gsnr_max(self, optimizer: Any) -> float | None:
        for state in optimizer.state.values():
            if state.get("gsnr_max") is not None:
                return state["gsnr_max"]
        return None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, optimizer: Any) -> None:
        """One ZeRO optimizer step of every group in ``optimizer.param_groups`` (DeepSpeed passes one)."""
        for group in optimizer.param_groups:
            for partition in group["params"]:
                if partition.grad is not None:
                    self._step_partition(optimizer, group, partition)

    def _step_partition(self, optimizer: Any, group: dict[str, Any], partition: Tensor) -> None:
        k = self.group_index(partition)
        if group["normalize"] == "max" and len(self.blocks) > 1:
            raise_unsupported(_NORMALIZE_MAX_MESSAGE.format(groups=len(self.blocks)))
        state = self.partition_state(optimizer, partition)
        state["step"] += 1
        grad = partition.grad
        # Blocks without a scale are the same on every rank (scales are global): all ranks reduce.
        pending = [i for i in range(len(self.blocks[k])) if "scale" not in state["blocks"].get(i, {})]
        if pending:
            self._assign(optimizer, group, state, k, grad, pending)
        self._update(optimizer, group, state, k, partition, grad)

    def _assign(self, optimizer, group, state, k: int, grad: Tensor, pending: list[int]) -> None:
        stats = self.reduce(self.local_statistics(k, grad, pending))
        step = state["step"]
        started = self._scaling_started_before(optimizer, step)
        values, statuses = optimizer.measured_gsnr(stats, [group["eps"]] * len(pending), eps_free=started)
        numels = [int(self.blocks[k][i].numel()) for i in pending]
        stored = self._first_step_gsnr_max(optimizer)
        if not started:  # the first scaling step: the max runs over the groups of this step
            first = optimizer.first_step_gsnr_max(values, statuses, numels, group["scale_rule"])
            candidates = [v for v in (stored, first) if v is not None]
            stored = max(candidates) if candidates else None
        assigned = optimizer.assigned_scales(values, statuses, stored, group["normalize"], numels, group["scale_rule"])
        for partition_state in optimizer.state.values():
            if "blocks" in partition_state:
                partition_state["gsnr_max"] = stored
        state["gsnr_max"] = stored
        group["gsnr_max"] = stored
        for i, scaled in zip(pending, assigned):
            if scaled is None:
                continue
            state["blocks"][i] = {
                "gsnr": scaled.gsnr,
                "scale": scaled.scale,
                "gsnr_eps_free": bool(started),
                "scaled_at": step,
                "step": 0,
            }

    def _update(self, optimizer, group, state, k: int, partition: Tensor, grad: Tensor) -> None:
        momentum = group["momentum"]
        fragments = [f for f in self.fragments(k) if "scale" in state["blocks"].get(f.index, {})]
        if not fragments:
            return
        if momentum != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
        flat_buffer = state.get("momentum_buffer")
        if flat_buffer is not None and flat_buffer.shape != partition.shape:
            raise_unsupported(_LAYOUT_MISMATCH_MESSAGE.format(saved=tuple(flat_buffer.shape), now=tuple(partition.shape)))
        entries = [state["blocks"][f.index] for f in fragments]
        params = [partition.narrow(0, f.start, f.numel) for f in fragments]
        grads = [grad.narrow(0, f.start, f.numel) for f in fragments]
        buffers: list[Tensor | None] = [
            None if flat_buffer is None or e["step"] == 0 else flat_buffer.narrow(0, f.start, f.numel)
            for f, e in zip(fragments, entries)
        ]
        sgd_sai(
            params,
            grads,
            buffers,
            [e["scale"] for e in entries],
            lr=group["lr"],
            momentum=momentum,
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            fused=group["fused"],
            momentum_dtype=group["momentum_dtype"],
            steps=[e["step"] for e in entries],
        )
        for f, e, buf in zip(fragments, entries, buffers):
            if flat_buffer is not None and e["step"] == 0:  # a first update made a new buffer: m_1 = g_1
                flat_buffer.narrow(0, f.start, f.numel).copy_(buf)
            e["step"] += 1


def raise_unsupported(message: str) -> None:
    raise UnsupportedShardingError(message)


class Zero3Parameters(TensorBackend):
    """A ZeRO-3 parameter (``ds_id`` / ``ds_tensor``: partitioned before the optimizer exists):
    claimed only to be refused, in one process too."""

    def claims(self, param: Tensor) -> bool:
        return hasattr(param, "ds_id") or hasattr(param, "ds_tensor")

    def placement(self, param: Tensor, rank: int, world_size: int) -> Placement:
        raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)


# --------------------------------------------------------------------------- configuration checks
def deepspeed_config(args: Any = None) -> dict[str, Any] | None:
    """The DeepSpeed config in use as a dict (``args.hf_deepspeed_config``, ``args.deepspeed`` as a
    dict or JSON path, or accelerate's DeepSpeed plugin), or ``None`` if unknown."""
    import json

    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None and isinstance(getattr(hf_config, "config", None), dict):
        return hf_config.config
    value = getattr(args, "deepspeed", None)
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return json.load(fh)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        try:
            from accelerate.state import AcceleratorState

            plugin = AcceleratorState._shared_state.get("deepspeed_plugin")
        except ImportError:  # pragma: no cover
            plugin = None
    config = getattr(plugin, "deepspeed_config", None)
    return config if isinstance(config, dict) else None


def _offloaded(section: Any) -> bool:
    if not isinstance(section, Mapping):
        return False
    device = section.get("device", "none")
    return str(device).lower() not in ("none", "", "null")


def refuse_unsupported_zero(config: Mapping[str, Any] | None) -> None:
    """Raise :class:`~sai_hf.sharding.base.UnsupportedShardingError` for a DeepSpeed config SGD-SaI
    cannot run exactly: ZeRO stage 3, ``offload_optimizer``, or an ``optimizer`` section (DeepSpeed
    would replace SGD-SaI). Stages 0, 1 and 2 pass."""
    if not config:
        return
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if str(stage) == "3":
        raise_unsupported(DEEPSPEED_ZERO3_MESSAGE)
    if _offloaded(zero.get("offload_optimizer")) or _offloaded(zero.get("offload_param")):
        raise_unsupported(DEEPSPEED_OFFLOAD_MESSAGE)
    if "optimizer" in config:
        raise_unsupported(DEEPSPEED_OPTIMIZER_SECTION_MESSAGE)


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
    """If DeepSpeed is in use, raise :class:`~sai_hf.sharding.base.UnsupportedShardingError` for the
    configurations that SGD-SaI cannot run exactly (ZeRO stage 3, optimizer offload, a DeepSpeed
    ``optimizer`` section; :func:`refuse_unsupported_zero`). ZeRO stages 1 and 2 are supported."""
    if deepspeed_in_use(args):
        refuse_unsupported_zero(deepspeed_config(args))
