"""Functional SGD-SaI update, dispatched like ``torch.optim.sgd.sgd``.

For every block ``i`` with a fixed scale ``s_i`` (a host float: no path syncs the device)::

    g   <- -g                         if maximize
    m   <- g                          on the block's first update (m_1 = g_1)
    m   <- mu * m + (1 - mu) * g      afterwards
    p   <- p * (1 - lr * wd)          decoupled weight decay: uses lr, not lr * s_i
    p   <- p - lr * s_i * m

With ``momentum == 0`` no buffer is kept and ``m = g``. Paths, tested against each other and against a float64
reference (``tests/support/reference.py``): ``_single_tensor_sgd_sai`` (a for-loop, the reference), ``_multi_tensor_sgd_sai``
(``torch._foreach_*`` per device and dtype) and ``_single_pass_sgd_sai`` (``fused``, the default: one pass over memory
per block, decay included; the blocks it cannot run go through the multi-tensor path in the same call).

A momentum buffer may be narrower than its parameter (``momentum_dtype=torch.bfloat16``): the update is computed in the
parameter's precision and written back with the stochastic rounding of :mod:`sai_hf.rounding`, seeded by the block's
update count and index (reproducible, resumable, no generator state).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach, _get_fused_kernels_supported_devices

from . import cpu_update, triton_update
from .rounding import element_index, round_bits_into, rounding_seed, slab_size, stochastic_round_to_bf16

__all__ = ["sgd_sai", "stochastic_round_to_bf16", "single_pass_supported"]


def _bf16_momentum(out: Tensor, buf: Tensor, grad: Tensor, momentum: float, scratch: Tensor) -> Tensor:
    """``out <- mu * float(buf) + (1 - mu) * grad`` in float32, each operation rounded separately
    (no lerp, no fused multiply-add): the Triton kernel's and the native CPU loop's operations, so
    every path stores the same bfloat16 buffer bit for bit. ``scratch``: float32, ``grad``'s shape."""
    return out.copy_(buf).mul_(momentum).add_(torch.mul(grad, 1 - momentum, out=scratch))


@torch.compiler.disable  # as stochastic_round_to_bf16
def _bf16_momentum_update(
    param: Tensor, grad: Tensor, buf: Tensor, momentum: float, step_size: float, decay: float, first: bool, seed: int
) -> None:
    """One block's update with a bfloat16 buffer for a float32 parameter::

        m = g (first) or mu buf + (1 - mu) g (float32);  buf <- stochastic_round_to_bf16(m);  p <- decay p + step_size m

    slab by slab on CPU (temporaries stay in cache), the same result as on the whole tensor (the hash takes flat indices)."""
    if not (param.is_contiguous() and grad.is_contiguous() and buf.is_contiguous()):
        wide = grad.float()
        value = wide if first else _bf16_momentum(torch.empty_like(wide), buf, wide, momentum, torch.empty_like(wide))
        buf.copy_(stochastic_round_to_bf16(value, seed))
        (param.mul_(decay) if decay != 1.0 else param).add_(value, alpha=step_size)
        return
    p, g, b = param.view(-1), grad.view(-1), buf.view(-1)
    out = b.view(torch.int16)
    numel = p.numel()
    size = slab_size(numel) if p.device.type == "cpu" else max(1, numel)
    value = torch.empty(size, dtype=torch.float32, device=p.device)
    scratch = torch.empty_like(value) if not first else value
    index = element_index(size, p.device)
    for start in range(0, numel, size):
        end = min(numel, start + size)
        n = end - start
        m = value[:n].copy_(g[start:end]) if first else _bf16_momentum(value[:n], b[start:end], g[start:end].float(), momentum, scratch[:n])
        round_bits_into(out[start:end], m.view(torch.int32), index[:n], start, seed)
        ps = p[start:end]
        (ps.mul_(decay) if decay != 1.0 else ps).add_(m, alpha=step_size)


#: Elements per slab of the CPU fused-SGD block with decay: ``p *= 1 - lr wd`` and torch's fused SGD
#: kernel run slab after slab, so ``p`` is read from memory once (the slab's ``p, g, m`` stay in the
#: last-level cache); much smaller slabs pay torch's per-call threading overhead.
_DECAY_SLAB = 1 << 20


def _fused_sgd_block(
    param: Tensor, grad: Tensor, buf: Tensor | None, momentum: float, step_size: float, decay: float, maximize: bool, first: bool
) -> None:
    """``p *= decay`` then ``torch._fused_sgd_`` (``lr = -step_size``, ``dampening = mu``: SGD-SaI's momentum rule) on
    one block, slab by slab on CPU so that one pass reads ``p, g, m`` and writes ``p, m``."""
    numel = param.numel()
    size = _DECAY_SLAB if decay != 1.0 and param.device.type == "cpu" else max(1, numel)
    flat = [param.view(-1), grad.view(-1), buf.view(-1) if buf is not None else None]
    for start in range(0, numel, size):
        p, g, m = (t[start : start + size] if t is not None else None for t in flat)
        if decay != 1.0:
            p.mul_(decay)
        torch._fused_sgd_(
            [p], [g], [m] if m is not None else [],
            weight_decay=0.0, momentum=momentum, lr=-step_size, dampening=momentum,
            nesterov=False, maximize=maximize, is_first_step=first,
        )  # fmt: skip


#: dtypes the fused kernel updates correctly on CPU: torch 2.13's CPU ``_fused_sgd_`` silently skips the vectorised
#: part of bfloat16/float16 tensors, so those take the multi-tensor path.
_CPU_FUSED_DTYPES = (torch.float32, torch.float64)


@functools.cache
def _fused_devices() -> frozenset[str]:
    """Device types with torch's fused optimizer kernels."""
    return frozenset(_get_fused_kernels_supported_devices())


def single_pass_supported(param: Tensor, grad: Tensor, buf: Tensor | None, momentum_dtype: torch.dtype | None) -> bool:
    """Whether one block can take the single-pass kernel: ``param``, ``grad`` and ``buf`` contiguous (the kernels read
    raw memory), floating-point, on a device with fused kernels (float32/float64 only on CPU), the buffer in the
    parameter's dtype or bfloat16 for a float32 parameter; with Triton on CUDA, any float32/float16/bfloat16 mix."""
    if param.device.type not in _fused_devices() or not param.is_floating_point() or param.is_complex():
        return False
    if not (param.is_contiguous() and grad.is_contiguous() and (buf is None or buf.is_contiguous())):
        return False
    buf_dtype = buf.dtype if buf is not None else (momentum_dtype or param.dtype)
    if _on_triton(param, grad, buf_dtype) or (buf_dtype == torch.bfloat16 and param.dtype == torch.float32):
        return True
    return buf_dtype == param.dtype and (param.device.type != "cpu" or param.dtype in _CPU_FUSED_DTYPES)


def _on_triton(param: Tensor, grad: Tensor, buf_dtype: torch.dtype) -> bool:
    """Whether a contiguous block runs in the Triton kernel: CUDA with Triton, supported dtypes."""
    return (
        param.device.type == "cuda"
        and {param.dtype, grad.dtype, buf_dtype} <= set(triton_update.SUPPORTED_DTYPES)
        and triton_update.triton_available(param.device)
    )


def _resolve_path(params: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """``"fused"``, ``"foreach"`` or ``"loop"`` for the caller's flags (``None``: choose, as torch).

    ``fused=None, foreach=None``: ``fused``, except under ``torch.compile``, where the multi-tensor
    ops are traced and fused by the compiler instead (the fused kernels have no fake-tensor kernel).
    ``fused=False, foreach=None``: ``foreach`` where torch's rule (``_default_to_fused_or_foreach``)
    would take it (every tensor on a device with foreach kernels, e.g. CUDA), else the loop.
    ``foreach=False`` (and ``fused`` not True): the for-loop reference."""
    if fused and foreach:
        raise ValueError("fused and foreach cannot both be True")
    compiling = torch.compiler.is_compiling()
    if fused is None and foreach is None:
        return "foreach" if compiling else "fused"
    if fused:
        if compiling:
            raise RuntimeError("fused=True cannot be traced by torch.compile: leave fused=None (or foreach=True)")
        return "fused"
    if foreach is None:
        foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)[1]
    return "foreach" if foreach else "loop"


def sgd_sai(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer_list: list[Tensor | None],
    scales: Sequence[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
    momentum_dtype: torch.dtype | None = None,
    steps: Sequence[int] | None = None,
) -> None:
    """Apply one SGD-SaI step in place (equations in the module docstring).

    ``momentum_buffer_list[i]`` is ``None`` for a block's first update; the new buffer (of ``momentum_dtype``, default
    the parameter's) is written back into the list, as ``torch.optim.sgd.sgd`` does. ``steps[i]`` (the block's update
    count, only seeding stochastic rounding) defaults to 0. ``fused`` runs each block :func:`single_pass_supported`
    allows in one pass and the others through the multi-tensor path; ``foreach=True``: the multi-tensor path;
    ``foreach=False``: the for-loop reference; ``None`` chooses as torch does (:func:`_resolve_path`).
    """
    if not (len(params) == len(grads) == len(momentum_buffer_list) == len(scales)):
        raise ValueError("params, grads, momentum_buffer_list and scales must have the same length")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape:  # the fused kernels would read past the gradient
            raise ValueError(f"SGD-SaI: block #{i} has a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        if p.is_complex() and momentum_dtype is not None and momentum != 0 and not momentum_dtype.is_complex:
            raise ValueError(f"SGD-SaI: momentum_dtype={momentum_dtype} cannot hold the momentum of complex block #{i}")
    path = _resolve_path(params, foreach, fused)
    steps = steps if steps is not None else [0] * len(params)
    seeds = [rounding_seed(step, i) for i, step in enumerate(steps)]
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, momentum_dtype=momentum_dtype)
    if path != "fused":
        impl = _multi_tensor_sgd_sai if path == "foreach" else _single_tensor_sgd_sai
        impl(params, grads, momentum_buffer_list, scales, seeds=seeds, **hyper)
        return
    single = [
        single_pass_supported(p, g, b, momentum_dtype if momentum != 0 else None)
        for p, g, b in zip(params, grads, momentum_buffer_list)
    ]
    for impl, chosen in ((_single_pass_sgd_sai, True), (_multi_tensor_sgd_sai, False)):
        index = [i for i, s in enumerate(single) if s is chosen]
        if not index:
            continue
        bufs = [momentum_buffer_list[i] for i in index]
        impl(
            [params[i] for i in index], [grads[i] for i in index], bufs, [scales[i] for i in index],
            seeds=[seeds[i] for i in index], **hyper,
        )  # fmt: skip
        for i, buf in zip(index, bufs):
            momentum_buffer_list[i] = buf


def _new_buffer(grad: Tensor, momentum_dtype: torch.dtype | None, seed: int) -> Tensor:
    """``m_1 = g_1`` in the buffer's dtype."""
    if momentum_dtype is None or momentum_dtype == grad.dtype:
        return torch.clone(grad).detach()
    if momentum_dtype == torch.bfloat16:
        return stochastic_round_to_bf16(grad, seed)
    return grad.detach().to(momentum_dtype)


def _mixed_precision_update(
    param: Tensor, grad: Tensor, buf: Tensor, momentum: float, step_size: float, seed: int
) -> None:
    """Momentum step of a block whose buffer dtype differs from its gradient's: ``m = mu m + (1 - mu) g``
    computed in the wider dtype and stored back into ``buf`` (stochastically rounded when ``buf`` is
    bfloat16), then ``param += step_size * m`` with the wide ``m`` (decay already applied)."""
    wide = torch.promote_types(buf.dtype, grad.dtype)
    if buf.dtype == torch.bfloat16 and wide == torch.float32:
        _bf16_momentum_update(param, grad, buf, momentum, step_size, 1.0, False, seed)
        return
    value = buf.to(wide).lerp_(grad.to(wide), 1 - momentum)
    buf.copy_(stochastic_round_to_bf16(value, seed) if buf.dtype == torch.bfloat16 else value)
    param.add_(value, alpha=step_size)


def _single_tensor_sgd_sai(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffer_list: list[Tensor | None], scales: Sequence[float],
    *, lr: float, momentum: float, weight_decay: float, maximize: bool, momentum_dtype: torch.dtype | None, seeds: Sequence[int],
) -> None:  # fmt: skip
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        step_size = -lr * scales[i]
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = _new_buffer(grad, momentum_dtype, seeds[i])
                momentum_buffer_list[i] = buf
                direction = grad if buf.dtype != grad.dtype else buf
            elif buf.dtype != grad.dtype:
                _mixed_precision_update(param, grad, buf, momentum, step_size, seeds[i])
                continue
            else:
                direction = buf.lerp_(grad, 1 - momentum)
        else:
            direction = grad
        param.add_(direction, alpha=step_size)


# The multi-tensor path: CUDA (a few launches per device and dtype group), torch.compile (fused by inductor), and the
# fused path's fallback. On CPU foreach ops are loops with extra temporaries, hence the for-loop when ``None`` chooses.
def _multi_tensor_sgd_sai(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffer_list: list[Tensor | None], scales: Sequence[float],
    *, lr: float, momentum: float, weight_decay: float, maximize: bool, momentum_dtype: torch.dtype | None, seeds: Sequence[int],
) -> None:  # fmt: skip
    if not params:
        return
    # Buffers are looked up by index: one of another dtype (momentum_dtype) would split the grouping.
    grouped = Optimizer._group_tensors_by_device_and_dtype([list(params), list(grads)], with_indices=True)
    for (device_params, device_grads), indices in grouped.values():
        device_bufs = [momentum_buffer_list[i] for i in indices]
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        updated, directions = [], []  # blocks updated by foreach, and their directions
        for j, grad in enumerate(device_grads):
            i = indices[j]
            buf = device_bufs[j] if momentum != 0 else grad
            if buf is None:
                buf = _new_buffer(grad, momentum_dtype, seeds[i])
                momentum_buffer_list[i] = buf
                updated.append(j)
                directions.append(grad if buf.dtype != grad.dtype else buf)
            elif buf.dtype != grad.dtype:
                _mixed_precision_update(device_params[j], grad, buf, momentum, -lr * scales[i], seeds[i])
            else:
                updated.append(j)
                directions.append(buf)
        if momentum != 0:
            lerping = [j for j in updated if device_bufs[j] is not None]
            if lerping:
                torch._foreach_lerp_([device_bufs[j] for j in lerping], [device_grads[j] for j in lerping], 1 - momentum)
        if updated:
            step_sizes = [-lr * scales[indices[j]] for j in updated]
            torch._foreach_add_([device_params[j] for j in updated], torch._foreach_mul(directions, step_sizes))


def _single_pass_sgd_sai(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffer_list: list[Tensor | None], scales: Sequence[float],
    *, lr: float, momentum: float, weight_decay: float, maximize: bool, momentum_dtype: torch.dtype | None, seeds: Sequence[int],
) -> None:  # fmt: skip
    """One pass per block (each :func:`single_pass_supported`) in the first that takes it: the Triton kernel (CUDA), the
    native C loop (CPU blocks with decay or a bfloat16 buffer), else :func:`_fused_sgd_block` or, for a bfloat16 buffer
    of a float32 block, :func:`_bf16_momentum_update`."""
    decay = 1 - lr * weight_decay
    first = [buf is None for buf in momentum_buffer_list]
    if momentum != 0:
        for i, param in enumerate(params):
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.empty_like(param, dtype=momentum_dtype or param.dtype, memory_format=torch.contiguous_format)
                momentum_buffer_list[i] = buf
            if buf.shape != param.shape:
                raise RuntimeError(f"SGDSaI: momentum buffer of shape {tuple(buf.shape)} for a parameter of shape {tuple(param.shape)}")
    bufs = momentum_buffer_list if momentum != 0 else [None] * len(params)
    step_sizes = [-lr * scale for scale in scales]
    on_triton, on_native, others = [], [], []
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        buf_dtype = b.dtype if b is not None else p.dtype
        # Why each path exists. Triton: torch has no CUDA kernel for SGD with decoupled decay or a
        # bfloat16 buffer (fused SGD + a decay pass reads p twice), and it updates a whole dtype group
        # in one launch. C loop: the memory floor on CPU with decay (scripts/bench_optimizers.py,
        # default config: 1.04-1.05x torch's fused SGD, against 1.41-1.45x for the slab path with
        # SAI_HF_CPU_KERNEL=0) and with a bfloat16 buffer (1.25x against 5.7x). torch's fused SGD:
        # CPU blocks without either, where it is one pass already and a ctypes call costs more on
        # small blocks (8 vs 15 us at 768 entries; within 5% of each other from 0.6M entries up);
        # and the slab path wherever neither kernel runs (no C compiler, devices without Triton).
        if _on_triton(p, g, buf_dtype):
            on_triton.append(i)
        elif p.device.type == "cpu" and (decay != 1.0 or buf_dtype != p.dtype) and cpu_update.takes(p, g, buf_dtype):
            on_native.append(i)
        else:
            others.append(i)
    for kernel, index in ((triton_update.triton_sgd_sai_, on_triton), (cpu_update.cpu_sgd_sai_, on_native)):
        if index:
            kernel(
                [params[i] for i in index], [grads[i] for i in index],
                [bufs[i] for i in index] if momentum != 0 else None, [step_sizes[i] for i in index],
                decay=decay, momentum=momentum, first=[first[i] for i in index], maximize=maximize,
                seeds=[seeds[i] for i in index],
            )  # fmt: skip
    for i in others:
        param, grad, buf = params[i], grads[i], bufs[i]
        if buf is not None and buf.dtype != param.dtype:
            _bf16_momentum_update(param, -grad if maximize else grad, buf, momentum, step_sizes[i], decay, first[i], seeds[i])
        else:
            _fused_sgd_block(param, grad, buf, momentum, step_sizes[i], decay, maximize, first[i])
    # The kernels write memory behind autograd's back: bump the version counters, so that a backward
    # through a graph that saved these tensors raises, as after any in-place op.
    torch.autograd.graph.increment_version([t for t in (*params, *bufs) if t is not None and not t.is_inference()])


