"""The whole SGD-SaI update as one Triton kernel launch per group of same-dtype tensors (CUDA).

For every tensor ``i`` and every element, computed in float32 whatever the storage dtypes (float32, float16, bfloat16)::

    g <- -g                              if maximize
    m <- g                               if first[i]   (the block's first update: m_1 = g_1)
    m <- mu * m + (1 - mu) * g           otherwise     (momentum != 0; m is read from the buffer)
    p <- p * decay + step_sizes[i] * m                 (decay = 1 - lr * wd; step_sizes[i] = -lr * s_i)

With ``momentum == 0`` there is no buffer and ``m = g``. ``m`` is stored in the buffer's dtype, stochastically rounded
(bit for bit ``sai_hf.rounding.stochastic_round_to_bf16(m, seeds[i])``) when the buffer is bfloat16 and the parameter
is not, else to nearest-even; ``p`` is updated from the unrounded ``m``. Every float32 operation is rounded separately
(``enable_fp_fusion=False``), so results equal the same torch float32 operations, on the GPU and in the interpreter.

Tensors are grouped by device, dtypes and 16-byte alignment; each group is one launch under its device's guard (Triton
launches on the current device), described by an int64 table copied from pinned memory without a sync. Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors through Triton's interpreter (tests; CUDA tensors refused).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from .rounding import seed_offset

__all__ = ["SUPPORTED_DTYPES", "aligned", "device_guard", "dtype_code", "first_programs", "interpreting", "kernel_module",
           "triton_available", "triton_sgd_sai_"]  # fmt: skip

#: Storage dtypes of parameters, gradients and momentum buffers that the kernel accepts.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Elements per block (one masked or unmasked load per array) and blocks per program.
BLOCK = 1024
CHUNK_BLOCKS = 8
NUM_WARPS = 4

_KERNEL_MODULE = "sai_hf._triton_kernels"
_INTERPRETED_MODULE = "sai_hf._triton_kernels_interpreted"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _available(device_type: str, interpret: bool) -> bool:
    """Decided once per process for each device type and mode (``_available.cache_clear()`` resets it)."""
    if device_type != ("cpu" if interpret else "cuda") or not (interpret or torch.cuda.is_available()):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device | str) -> bool:
    """Whether :func:`triton_sgd_sai_` can update tensors on ``device``: ``triton`` is importable and
    ``device`` is CUDA, or ``TRITON_INTERPRET=1`` is set and ``device`` is the CPU."""
    return _available(torch.device(device).type, interpreting())


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The context of a launch on ``device``: ``torch.cuda.device(device)`` for CUDA (Triton launches
    on the current device; the kernels only see raw addresses), nothing otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernel_module() -> ModuleType:
    """The kernel module for the current mode: compiled (the real ``sai_hf._triton_kernels``), or
    under ``TRITON_INTERPRET=1`` a private copy decorated in interpreter mode."""
    if not interpreting():
        return importlib.import_module(_KERNEL_MODULE)
    module = sys.modules.get(_INTERPRETED_MODULE)
    if module is None:
        spec = importlib.util.find_spec(_KERNEL_MODULE)
        assert spec is not None and spec.origin is not None
        spec = importlib.util.spec_from_file_location(_INTERPRETED_MODULE, spec.origin)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # triton.jit reads TRITON_INTERPRET now
        sys.modules[_INTERPRETED_MODULE] = module
    return module


def first_programs(numels: Sequence[int], per_program: int) -> tuple[list[int], int]:
    """The first program id of each tensor when every program takes ``per_program`` consecutive
    elements of one tensor (the tables' first-program row), and the number of programs."""
    first, programs = [], 0
    for numel in numels:
        first.append(programs)
        programs += -(-numel // per_program)
    return first, programs


def dtype_code(dtype: torch.dtype, what: str) -> int:
    """The kernels' element kind of ``dtype``: 0 float32, 1 float16, 2 bfloat16."""
    if dtype in SUPPORTED_DTYPES:
        return SUPPORTED_DTYPES.index(dtype)
    raise TypeError(f"triton_sgd_sai_: {what} dtype {dtype} is not supported (float32, float16, bfloat16)")


def aligned(*tensors: Tensor | None) -> bool:
    """Whether every tensor's address is a multiple of 16 bytes (the kernels' vectorised accesses)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def triton_sgd_sai_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor | None] | None,
    step_sizes: Sequence[float],
    *,
    decay: float | Sequence[float],
    momentum: float,
    first: Sequence[bool],
    maximize: bool,
    seeds: Sequence[int] | None,
    block: int = BLOCK,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> None:
    """Apply one SGD-SaI step in place to ``params`` and ``buffers`` (equations in the module docstring; no host sync).

    Args:
        params, grads: contiguous float32/float16/bfloat16 tensors (CUDA, any devices; CPU under ``TRITON_INTERPRET=1``),
            ``grads[i]`` on ``params[i]``'s device with its number of elements.
        buffers: momentum buffers preallocated by the caller (contiguous, same numel, a supported dtype; ``torch.empty``
            is fine where ``first[i]``). Ignored (may be ``None``) when ``momentum == 0``.
        step_sizes: ``-lr * s_i`` per tensor.
        decay: the factor ``1 - lr * weight_decay`` (one float, or one per tensor; 1.0 for no decay).
        momentum: ``mu`` (0 keeps no buffer).
        first: per tensor, whether this is the block's first update (``m = g``; the buffer is written, not read).
        maximize: negate the gradients.
        seeds: per tensor, the rounding seed (``sai_hf.rounding.rounding_seed(step, i)``); used only for bfloat16
            buffers of non-bfloat16 parameters.
        block, chunk_blocks: elements per block and blocks per program (tuning/testing only).
    """
    n = len(params)
    has_momentum = momentum != 0
    if len(grads) != n or len(step_sizes) != n or len(first) != n:
        raise ValueError("params, grads, step_sizes and first must have the same length")
    if has_momentum and (buffers is None or len(buffers) != n):
        raise ValueError("momentum != 0 needs one buffer per parameter")
    if seeds is not None and len(seeds) != n:
        raise ValueError("seeds must have one entry per parameter")
    decays = [float(decay)] * n if isinstance(decay, (int, float)) else [float(d) for d in decay]
    if len(decays) != n:
        raise ValueError("decay must be a float or have one entry per parameter")
    if block <= 0 or block & (block - 1) or chunk_blocks <= 0:
        raise ValueError("block must be a power of two and chunk_blocks positive")

    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        p, g = params[i], grads[i]
        m = buffers[i] if has_momentum else None  # type: ignore[index]
        if has_momentum and m is None:
            raise ValueError(f"buffers[{i}] is None with momentum={momentum}")
        for t, what in ((p, "param"), (g, "grad"), (m, "buffer")):
            if t is None:
                continue
            if t.device != p.device:
                raise ValueError(f"triton_sgd_sai_: {what} {i} is on {t.device}, its param on {p.device}")
            if not t.is_contiguous():
                raise ValueError(f"triton_sgd_sai_: {what} {i} is not contiguous")
            if t.numel() != p.numel():
                raise ValueError(f"triton_sgd_sai_: {what} {i} has {t.numel()} elements, the param {p.numel()}")
        if p.numel() == 0:
            continue
        stochastic = m is not None and m.dtype == torch.bfloat16 and p.dtype != torch.bfloat16
        if stochastic and seeds is None:
            raise ValueError("seeds are needed for bfloat16 buffers of non-bfloat16 parameters")
        kinds = (dtype_code(p.dtype, "param"), dtype_code(g.dtype, "grad"), dtype_code(m.dtype, "buffer") if m is not None else 0)
        groups.setdefault((p.device, *kinds, stochastic, aligned(p, g, m)), []).append(i)
    if not groups:
        return
    for device in {key[0] for key in groups}:
        if not triton_available(device):
            raise RuntimeError(
                f"triton_sgd_sai_: no Triton kernel for {device} tensors (needs triton and CUDA, "
                "or TRITON_INTERPRET=1 and CPU tensors)"
            )

    kernels = kernel_module()
    chunk = block * chunk_blocks
    mu = float(momentum)
    for (device, p_kind, g_kind, m_kind, stochastic, is_aligned), indices in groups.items():
        count = len(indices)
        first_program, programs = first_programs([params[i].numel() for i in indices], chunk)
        ints = [
            [params[i].data_ptr() for i in indices],
            [grads[i].data_ptr() for i in indices],
            [buffers[i].data_ptr() if has_momentum else 0 for i in indices],  # type: ignore[index,union-attr]
            [params[i].numel() for i in indices],
            first_program,
            [int(bool(first[i])) for i in indices],
            [seed_offset(int(seeds[i])) if stochastic else 0 for i in indices],  # type: ignore[index]
        ]
        floats = [[float(step_sizes[i]) for i in indices], [decays[i] for i in indices]]
        pinned = device.type == "cuda"
        host = torch.empty((kernels.N_FIELDS, count), dtype=torch.int64, pin_memory=pinned)
        host[: kernels.N_INT_FIELDS] = torch.tensor(ints, dtype=torch.int64)
        host[kernels.N_INT_FIELDS :].view(torch.float64).copy_(torch.tensor(floats, dtype=torch.float64))
        with device_guard(device):
            table = host.to(device, non_blocking=True) if pinned else host.to(device)
            kernels.sgd_sai_kernel[(programs,)](
                table, count, (count - 1).bit_length(), mu, 1.0 - mu,  # (count - 1).bit_length(): binary-search steps
                P_KIND=p_kind, G_KIND=g_kind, M_KIND=m_kind, HAS_MOMENTUM=has_momentum, STOCHASTIC=stochastic,
                MAXIMIZE=bool(maximize), ALIGNED=is_aligned, BLOCK=block, CHUNK_BLOCKS=chunk_blocks, num_warps=NUM_WARPS,
                enable_fp_fusion=False,  # no FMA contraction: GPU == interpreter == separately rounded torch ops
            )  # fmt: skip
