"""DeepSpeed ZeRO stage 1 and 2: blocks are fragments of DeepSpeed's flat fp32 partitions.

Under ZeRO-1/2 the optimizer that DeepSpeed wraps no longer holds the model's tensors: for every
parameter group ``k`` DeepSpeed concatenates the group's trainable parameters (the *blocks*
``b_1, b_2, ...``) into one flat buffer, pads it to a multiple of the world size, cuts it into one
contiguous *partition* per rank and replaces ``param_groups[k]["params"]`` by this rank's fp32
partition ``P_k``. Each block's entries form at most one contiguous *fragment* of ``P_k`` on a
rank; DeepSpeed records it on the model parameter as ``param._hp_mapping.hp_fragment_address``
(``start``, ``numel`` inside ``P_k``). A block's local views are ``P_k[start : start + numel]`` (and
the same range of its gradient and of the momentum buffer); a block with no fragment on this rank
has no local gradient and joins the reduction with a zero row. The partitions are disjoint, so
every rank's row counts.

DeepSpeed steps the groups one at a time (``_optimizer_step`` narrows ``param_groups`` to group
``k``; the fp32 gradient partition of group ``k + 1`` does not exist yet). So:

* "deferred blocks drop eps" is decided from the partitions' step counters (``scaled_at``), as in
  one process;
* at the first scaling step (no block has a scale yet) the call for the first group also measures
  every later group, from the gradients DeepSpeed has already reduced: DeepSpeed's own per-parameter
  gradient fragments (``_hp_mapping.get_lp_grad_fragment``, what ``safe_get_full_grad`` reads; with
  ``offload_optimizer`` views of the CPU partitions' gradients), their statistics scaled by the factor
  DeepSpeed's ``unscale_and_clip_grads`` will apply (:func:`unscale_factor`: loss scale and clipping,
  recomputed from the same operands; no copy of a gradient is made). One reduction of all blocks, and
  ``normalize="max"`` and degenerate blocks get the largest g-SNR of all blocks, as in one process.
  Those blocks are updated in their own group's call. This needs DeepSpeed's optimizer, which the
  parameters do not reveal: :meth:`ZeroFragments.register_model` learns it from the optimizer's
  wrappers (:class:`sai_hf.GSNRCallback` registers the Trainer's; plain DeepSpeed:
  ``sai_hf.register_sharded_model(model, engine.optimizer)``). Without it each group is measured in
  its own call, and ``normalize="max"`` with more than one group (which would divide the first
  groups' scales by a partial maximum) is refused.

State of partition ``P_k`` (``optimizer.state[P_k]``, saved per rank in DeepSpeed's checkpoint)::

    momentum_buffer   tensor like P_k (absent with momentum=0); zero where no fragment was updated yet
    step              optimizer steps taken by this partition
    blocks            {index of the block in its group: {"gsnr", "scale", "gsnr_eps_free",
                       "scaled_at", "step"}}    (every block of the group, on every rank)

Resuming at the same world size continues bit-exactly; at another world size the momentum buffer
does not fit the partition, which is refused at the first step.

Group indices: DeepSpeed's engine drops the optimizer's empty parameter groups before wrapping it
(``param_groups[:] = [pg for pg in param_groups if len(pg["params"]) != 0]``; the Trainer's
no-weight-decay group is empty under PEFT LoRA or with biases and norms frozen), so its group ``k``
(partition ``P_k``) is the ``k``-th *non-empty* group as the optimizer was constructed. A group
whose parameters are all frozen is kept (it has a partition of padding only, and no blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Block, Placement, ShardingBackend, UnsupportedShardingError
from .deepspeed_config import DEEPSPEED_ZERO3_MESSAGE, refuse_unsupported_deepspeed

__all__ = ["ZeroFragments", "Zero3Parameters", "unscale_factor"]

_LAYOUT_MISMATCH_MESSAGE = (
    "SGD-SaI: the momentum buffer restored for a DeepSpeed partition has shape {saved}, the partition "
    "{now}: the checkpoint was saved with another world size (or parameter grouping). Resuming "
    "SGD-SaI from a ZeRO checkpoint is supported at the same world size only: resume with the world "
    "size it was saved with, or start the optimizer afresh (load the model weights only)."
)
_NORMALIZE_MAX_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO-1/2 with {groups} parameter groups is not exact here: "
    "DeepSpeed steps the groups one at a time, and the optimizer does not know DeepSpeed's, so the largest "
    "g-SNR over all blocks is not known when the first group is updated. Register DeepSpeed's optimizer "
    "(the Trainer's GSNRCallback does it; plain DeepSpeed: sai_hf.register_sharded_model(model, "
    "engine.optimizer) before the first step), or use normalize='none' (the default; multiply the learning "
    "rate by the largest first-step g-SNR, gsnr_max in gsnr.json, for the same run)."
)
_NORMALIZE_MAX_UNEXPOSED_MESSAGE = (
    "SGD-SaI: normalize='max' under DeepSpeed ZeRO-1/2 with {groups} parameter groups is not exact here: "
    "DeepSpeed steps the groups one at a time, and this DeepSpeed's optimizer (registered) does not expose "
    "the later groups' gradients when the first is stepped ({reason}), so the largest g-SNR over all blocks "
    "is not known when the first group is updated. Use normalize='none' (the default; multiply the learning "
    "rate by the largest first-step g-SNR, gsnr_max in gsnr.json, for the same run), or put every trainable "
    "parameter in one group."
)
_GROUP_COUNT_MESSAGE = (
    "SGD-SaI under DeepSpeed ZeRO-1/2: the optimizer was constructed with {constructed} non-empty parameter "
    "groups, DeepSpeed steps {stepped}: sai-hf cannot tell which of DeepSpeed's flat partitions holds which "
    "group (were parameter groups added or removed after deepspeed.initialize?). Build the optimizer with "
    "its final groups before handing it to DeepSpeed."
)


class ZeroFragments(ShardingBackend):
    """The flat partitions DeepSpeed ZeRO-1/2 put in place of the model's parameters.

    ``model_groups``: the optimizer's parameter groups as constructed (the model's parameters, in
    DeepSpeed's order); DeepSpeed links exactly the trainable ones (``_hp_mapping``) when it wraps
    the optimizer."""

    STATE_KEYS = frozenset({"blocks", "gsnr_max"})  # gsnr_max: written by sai-hf 0.1.0 checkpoints

    def __init__(self, model_groups: Sequence[Sequence[Tensor]] = ()) -> None:
        self.model_groups = model_groups
        self._blocks: list[list[Tensor]] | None = None
        self._group_of_partition: dict[int, int] = {}
        self._wrapper: Any = None  # DeepSpeed's ZeRO-1/2 optimizer, once registered
        self._unexposed: str | None = None  # why the later groups' gradients could not be read, once tried

    def register_model(self, model: torch.nn.Module, wrappers: Sequence[Any] = ()) -> int:
        """Record DeepSpeed's ZeRO-1/2 optimizer among ``wrappers`` (it holds the fp32 partitions and
        the not yet flattened gradients of every group); no model parameter is recorded."""
        found = next((w for w in wrappers if hasattr(w, "single_partition_of_fp32_groups") and hasattr(w, "averaged_gradients")), None)
        if found is not None:
            self._wrapper = found
        return 0

    def _linked_blocks(self) -> list[list[Tensor]] | None:
        """The linked model parameters of each of DeepSpeed's groups, once DeepSpeed has linked them:
        group ``k`` is the ``k``-th non-empty group as constructed (DeepSpeed's engine drops the empty
        ones before wrapping the optimizer)."""
        if self._blocks is None and any(hasattr(p, "_hp_mapping") for g in self.model_groups for p in g):
            self._blocks = [[p for p in group if hasattr(p, "_hp_mapping")] for group in self.model_groups if len(group)]
        return self._blocks

    def claims(self, param: Tensor) -> bool:
        """A tensor that is not one of the model's parameters, once DeepSpeed linked them to partitions."""
        return self._linked_blocks() is not None and not any(p is param for g in self.model_groups for p in g)

    # ------------------------------------------------------------------ where the fragments are
    def group_index(self, partition: Tensor) -> int:
        """Index ``k`` of the parameter group whose partition is ``partition`` (a partition that
        holds only padding here is the one group that no fragment locates)."""
        key = id(partition)
        if key not in self._group_of_partition:
            found = self._located_group(partition)
            if found is None:
                located = set(self._group_of_partition.values())
                unlocated = [k for k in range(len(self._blocks or [])) if k not in located]
                if len(unlocated) != 1:
                    raise RuntimeError("SGD-SaI: cannot tell which DeepSpeed parameter group a partition belongs to")
                found = unlocated[0]
            self._group_of_partition[key] = found
        return self._group_of_partition[key]

    def _located_group(self, partition: Tensor) -> int | None:
        """The group one of whose blocks has a fragment in ``partition`` (same storage), if any."""
        ptr = partition.untyped_storage().data_ptr()
        for k, blocks in enumerate(self._blocks or []):
            if any(p._hp_mapping is not None and p._hp_mapping.hp_fragment.untyped_storage().data_ptr() == ptr for p in blocks):
                return k
        return None

    # ------------------------------------------------------------------ ShardingBackend
    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        model_blocks = self._linked_blocks() or []
        stepped = len(optimizer.all_param_groups())
        if model_blocks and len(model_blocks) != stepped:
            raise UnsupportedShardingError(_GROUP_COUNT_MESSAGE.format(constructed=len(model_blocks), stepped=stepped))
        out: list[Block] = []
        for partition in params:
            k = self.group_index(partition)
            state = optimizer.state[partition]
            state.setdefault("step", 0)
            later = None
            if stepping:
                first_scaling = len(model_blocks) > 1 and not _any_scale(optimizer)
                later = self._later_gradients(k) if first_scaling else None
                if group["normalize"] == "max" and first_scaling and later is None:
                    if self._wrapper is None:
                        raise UnsupportedShardingError(_NORMALIZE_MAX_MESSAGE.format(groups=len(model_blocks)))
                    raise UnsupportedShardingError(
                        _NORMALIZE_MAX_UNEXPOSED_MESSAGE.format(groups=len(model_blocks), reason=self._unexposed)
                    )
                state["step"] += 1
                flat = state.get("momentum_buffer")
                if group["momentum"] != 0 and flat is None:
                    state["momentum_buffer"] = torch.zeros_like(partition, dtype=group["momentum_dtype"] or partition.dtype)
                elif flat is not None and flat.shape != partition.shape:
                    raise UnsupportedShardingError(
                        _LAYOUT_MISMATCH_MESSAGE.format(saved=tuple(flat.shape), now=tuple(partition.shape))
                    )
            out.extend(self._fragments(optimizer, k, group, partition, partition.grad, state["step"]))
            if later is not None:
                # The first scaling step: the groups DeepSpeed steps after this one are measured now
                # too (their gradients are reduced already), so that every block's g-SNR is known
                # before any is updated. They are updated in their own call.
                factor, sources = later
                every_group = optimizer.all_param_groups()
                for j, partition_j, grads in sources:
                    step = optimizer.state[partition_j].get("step", 0) + 1
                    out.extend(self._fragments(optimizer, j, every_group[j], partition_j, grads, step, factor, scale_only=True))
        return out

    def _fragments(
        self,
        optimizer: Any,
        k: int,
        group: Mapping[str, Any],
        partition: Tensor,
        grad: Tensor | list[Tensor | None] | None,
        step: int,
        factor: float | None = None,
        scale_only: bool = False,
    ) -> list[Block]:
        """The blocks of group ``k``, whose fp32 partition here is ``partition``. ``grad``: the
        partition's gradient (``None``: none here), or the blocks' gradient fragments, one per block
        (:meth:`_later_gradients`). ``scale_only``: measured now, updated when DeepSpeed steps the
        group, its statistics those of the gradient times ``factor`` (``None``: 1)."""
        entries = optimizer.state[partition].setdefault("blocks", {})
        flat = None if scale_only else optimizer.state[partition].get("momentum_buffer")
        out: list[Block] = []
        for index, p in enumerate((self._linked_blocks() or [])[k]):
            entry = entries.setdefault(index, {})
            mapping = p._hp_mapping
            if mapping is None:  # no fragment of this block on this rank
                local, g, slot = partition.narrow(0, 0, 0), None, None
            else:
                start, numel = int(mapping.hp_fragment_address.start), int(mapping.hp_fragment_address.numel)
                local = partition.narrow(0, start, numel)
                if isinstance(grad, list):
                    g = grad[index]
                else:
                    g = None if grad is None else grad.narrow(0, start, numel)
                slot = None if flat is None else flat.narrow(0, start, numel)
            out.append(self._block(p, int(p.numel()), local, g, slot, entry, group, grad is not None, step, factor, scale_only))
        return out

    def _block(
        self, p: Tensor, numel: int, local: Tensor, grad: Tensor | None, slot: Tensor | None, entry: dict[str, Any],
        group: Mapping[str, Any], may_lack_gradient: bool, step: int, factor: float | None, scale_only: bool,
    ) -> Block:
        """One block of a DeepSpeed partition: ``numel`` entries in all, ``local`` / ``grad`` / ``slot`` its
        entries here (every rank holds disjoint ones); the buffer is the slot once the block was updated."""
        return Block(
            param=p,
            local=local,
            grad=grad,
            buffer=slot if entry.get("step", 0) > 0 else None,
            state=entry,
            group=group,
            placement=Placement(sharded=True, contributes=True, numel=numel),
            backend=self,
            may_lack_gradient=may_lack_gradient,
            buffer_slot=slot,
            step_index=step,
            scale_only=scale_only,
            grad_factor=factor,
        )

    def _later_gradients(self, k: int) -> tuple[float | None, list[tuple[int, Tensor, list[Tensor | None]]]] | None:
        """``(factor, [(j, partition of group j, its blocks' gradient fragments)])`` for the groups DeepSpeed
        steps after ``k`` in this step, before its ``unscale_and_clip_grads`` multiplies them by ``factor``
        (:func:`unscale_factor`); ``None`` where DeepSpeed's optimizer is not registered or this DeepSpeed
        does not expose them (Muon, another DeepSpeed version: the missing attribute is kept in
        ``_unexposed`` for the refusal). Nothing else is caught: an error while reading what DeepSpeed
        exposes propagates instead of turning into a refusal or a per-group measurement.

        A fragment is ``p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)``, flattened: the block's
        reduced gradient entries of this rank's partition in DeepSpeed's accumulation dtype (DeepSpeed casts
        them to the fp32 partition's gradient exactly); where DeepSpeed keeps the whole gradient (bf16), the
        fragment's range of it."""
        zero = self._wrapper
        blocks = self._linked_blocks()
        if zero is None or blocks is None:
            return None
        self._unexposed = _unexposed(zero, [p for group in blocks[k + 1 :] for p in group])
        if self._unexposed is not None:
            return None
        factor = unscale_factor(zero)
        partitions = zero.single_partition_of_fp32_groups
        if len(partitions) != len(blocks):
            raise UnsupportedShardingError(_GROUP_COUNT_MESSAGE.format(constructed=len(blocks), stepped=len(partitions)))
        out = []
        for j in range(k + 1, len(blocks)):
            fragments: list[Tensor | None] = []
            for p in blocks[j]:
                mapping = p._hp_mapping
                if mapping is None:
                    fragments.append(None)
                    continue
                g = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
                numel = int(mapping.hp_fragment_address.numel)
                if g.numel() != numel:
                    g = g.narrow(0, int(mapping.lp_fragment_address.start), numel)
                fragments.append(g)
            out.append((j, partitions[j], fragments))
        return factor, out

    def keep_buffer(self, block: Block, local: Tensor) -> None:
        """The first update's ``m_1 = g_1`` goes into the block's range of the flat buffer."""
        block.buffer_slot.copy_(local)  # type: ignore[union-attr]

    def scaling_started(self, optimizer: Any, blocks: Sequence[Block]) -> bool:
        """Whether a block of any partition was scaled in an earlier step than this one (the groups
        of one step are stepped in separate calls)."""
        now = max((b.step_index or 0 for b in blocks), default=0)
        return any(
            entry.get("scaled_at", now) < now
            for state in optimizer.state.values()
            for entry in state.get("blocks", {}).values()
            if "scale" in entry
        )

    @classmethod
    def refuse_setup(cls, args: Any = None) -> None:
        """ZeRO-3, offload and a DeepSpeed ``optimizer`` section (:mod:`.deepspeed_config`)."""
        refuse_unsupported_deepspeed(args)


class Zero3Parameters(ShardingBackend):
    """A ZeRO-3 parameter (``ds_id`` / ``ds_tensor``: partitioned before the optimizer exists):
    claimed only to be refused, in one process too."""

    def claims(self, param: Tensor) -> bool:
        return hasattr(param, "ds_id") or hasattr(param, "ds_tensor")

    def blocks(self, optimizer: Any, group: Mapping[str, Any], params: Sequence[Tensor], stepping: bool) -> list[Block]:
        raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)


def _any_scale(optimizer: Any) -> bool:
    """Whether some block of some partition has its scale (the same answer on every rank)."""
    return any("scale" in entry for state in optimizer.state.values() for entry in state.get("blocks", {}).values())


def _unexposed(zero: Any, later: Sequence[Tensor]) -> str | None:
    """What DeepSpeed's ZeRO-1/2 optimizer ``zero`` lacks for reading the ``later`` groups' blocks'
    gradients before it steps them (``None``: nothing): Muon, whose update is not a gradient, or an
    attribute another DeepSpeed version does not have."""
    if getattr(zero, "use_muon", False):
        return "Muon"
    for name in ("single_partition_of_fp32_groups", "loss_scale", "clip_grad", "_global_grad_norm"):
        if not hasattr(zero, name):
            return f"no {type(zero).__name__}.{name}"
    if zero.clip_grad > 0.0 and zero._global_grad_norm is None:
        return "gradient clipping without a global gradient norm"
    for p in later:
        mapping = p._hp_mapping
        if mapping is None:
            continue
        if not hasattr(p, "_index_in_param_group"):
            return "no _index_in_param_group on the parameters"
        for name in ("get_lp_grad_fragment", "hp_fragment_address", "lp_fragment_address"):
            if not hasattr(mapping, name):
                return f"no {type(mapping).__name__}.{name}"
    return None


def unscale_factor(zero: Any) -> float | None:
    """The factor DeepSpeed's ``unscale_and_clip_grads`` multiplies this step's gradients by, ``None`` for 1,
    from its own operands (ZeRO-1/2 and ZeRO-3 alike)::

        combined = loss_scale * max(1, (total_norm / loss_scale + 1e-6) / clip_grad)   (clip_grad > 0)
        combined = loss_scale                                                          (otherwise)
        factor   = 1 / combined

    ``total_norm / loss_scale`` is DeepSpeed's ``_global_grad_norm`` of this step. A 0-d tensor where
    clipping applies: one host sync, at the first scaling step only. Raises ``TypeError`` where clipping
    applies but DeepSpeed computed no norm."""
    combined: Any = zero.loss_scale
    if zero.clip_grad > 0.0:
        clip = torch.clamp(torch.as_tensor((zero._global_grad_norm + 1e-6) / zero.clip_grad), min=1.0)
        combined = clip * zero.loss_scale
    factor = float(1.0 / combined)
    return None if factor == 1.0 else factor
