"""Bytes of tensors and of an optimizer's state: the one measurement the benchmark and the
comparison share (``scripts/bench_optimizers.py``, ``scripts/compare_optimizers.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["optimizer_state_bytes", "state_tensors", "tensor_bytes"]


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Total bytes of ``tensors``, counting each storage once (views and repeats are not re-counted)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def state_tensors(value: Any) -> Iterable[Tensor]:
    """Every tensor inside an optimizer-state value (recursing into dicts, lists and tuples)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from state_tensors(item)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` (momentum/moment buffers and per-tensor scalars),
    through accelerate's ``AcceleratedOptimizer`` (its ``.optimizer``) when given one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return tensor_bytes(state_tensors(dict(inner.state)))
