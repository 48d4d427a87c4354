"""The whole SGD-SaI update of a CPU block as one native loop (:mod:`sai_hf.native`, ``csrc/sgd_sai_cpu.c``).

The Triton kernel's equations and operations (:mod:`sai_hf.triton_update`), each rounded separately in the block's
precision (float32, or float64), so a float32 block gets the Triton kernel's result bit for bit; one loop reads
``p, g, m`` and writes ``p, m`` once. A bfloat16 buffer of a float32 block is updated in float32 and stochastically
rounded (:mod:`sai_hf.rounding`'s hash) in the same loop. Without the library ``sai_hf.functional`` keeps its slab path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import native
from .rounding import seed_offset

__all__ = ["cpu_sgd_sai_", "takes", "FUNCTIONS"]

#: dtypes of (parameter, gradient, buffer) that the loop takes, and the C function for each.
FUNCTIONS = {
    (torch.float32, torch.float32, torch.float32): "sgd_sai_f32",
    (torch.float64, torch.float64, torch.float64): "sgd_sai_f64",
    (torch.float32, torch.float32, torch.bfloat16): "sgd_sai_f32_bf16",
}


def takes(param: Tensor, grad: Tensor, buf_dtype: torch.dtype) -> bool:
    """Whether the loop updates this block: CPU tensors with memory of their own
    (:func:`sai_hf.native.readable`), a supported dtype combination (contiguity is the caller's
    check), and the native kernels usable here."""
    return (param.dtype, grad.dtype, buf_dtype) in FUNCTIONS and native.readable(param) and native.readable(grad) and native.available()


def cpu_sgd_sai_(
    params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor | None] | None, step_sizes: Sequence[float],
    *, decay: float, momentum: float, first: Sequence[bool], maximize: bool, seeds: Sequence[int],
) -> None:  # fmt: skip
    """Apply one SGD-SaI step in place to each block (the arguments of
    :func:`sai_hf.triton_update.triton_sgd_sai_`; tensors contiguous, CPU, dtypes in :data:`FUNCTIONS`)."""
    kernels = native.library()
    if not kernels.usable():
        raise RuntimeError(f"cpu_sgd_sai_: the native CPU kernels are not available here ({kernels.failure or 'single-threaded build'})")
    for i, (p, g) in enumerate(zip(params, grads)):
        m = buffers[i] if buffers is not None and momentum != 0 else None
        tensors = [p, g] if m is None else [p, g, m]
        if not all(t.is_contiguous() and native.readable(t) for t in tensors):
            raise ValueError("cpu_sgd_sai_: every tensor must be contiguous, on the CPU, with memory of its own")  # the loop reads raw memory
        if g.shape != p.shape or (m is not None and m.shape != p.shape):
            raise ValueError(f"cpu_sgd_sai_: shapes {tuple(p.shape)}, {tuple(g.shape)}, {None if m is None else tuple(m.shape)} differ")
        buf_dtype = m.dtype if m is not None else p.dtype
        function = FUNCTIONS.get((p.dtype, g.dtype, buf_dtype))
        if function is None:
            raise ValueError(f"cpu_sgd_sai_: no loop for dtypes {p.dtype}, {g.dtype}, {buf_dtype}")
        arguments = [p.data_ptr(), g.data_ptr(), m.data_ptr() if m is not None else None, p.numel(), int(first[i])]
        arguments += [int(maximize), momentum, 1.0 - momentum, decay, step_sizes[i]]
        if buf_dtype == torch.bfloat16:
            arguments.append(seed_offset(int(seeds[i])))  # the hash indexes the block's elements from 0
        kernels.call(function, *arguments)

