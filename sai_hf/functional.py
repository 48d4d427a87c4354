"""Functional SGD-SaI update, dispatched like ``torch.optim.sgd.sgd``.

For every block ``i`` with a fixed scale ``s_i`` (from its g-SNR, see :mod:`sai_hf.gsnr`)::

    g   <- -g                         if maximize
    m   <- g                          on the block's first update (m_1 = g_1)
    m   <- mu * m + (1 - mu) * g      afterwards
    p   <- p * (1 - lr * wd)          decoupled weight decay: uses lr, not lr * s_i
    p   <- p - lr * s_i * m

With ``momentum == 0`` no buffer is kept and ``m = g``.

Three implementations give the same result (tested against each other):

* ``_single_tensor_sgd_sai``: a for-loop over tensors, the reference;
* ``_multi_tensor_sgd_sai``: ``torch._foreach_*`` kernels grouped by device and dtype;
* ``_fused_sgd_sai``: torch's fused SGD kernel (``torch._fused_sgd_``) called once per block with
  ``lr * s_i`` as its learning rate and ``dampening = momentum``, which is exactly SGD-SaI's
  momentum rule; one pass reads ``p, g, m`` and writes ``p, m`` (the memory-bandwidth floor of any
  momentum SGD). Decoupled weight decay is one extra ``p *= 1 - lr * wd`` pass for decaying groups.

Scales are host floats, fixed after the first step, so no path syncs the device.

**Low-precision momentum.** A momentum buffer may be stored in a narrower dtype than its parameter
(``momentum_dtype=torch.bfloat16`` halves optimizer memory). The update is computed in the
parameter's precision and written back with *stochastic rounding* (``stochastic_round_to_bf16``):
unbiased, so the tiny ``(1 - mu) g`` increments that round-to-nearest would lose on a bf16 buffer
survive in expectation. The dither is a deterministic function of ``(step, block index)``, so runs
and resumed runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_fused_kernels_supported_devices

__all__ = ["sgd_sai", "stochastic_round_to_bf16", "fused_supported"]

_BF16_LOW_BITS = 1 << 16
_BF16_KEEP_MASK = -(1 << 16)  # 0xFFFF0000 as int32


def stochastic_round_to_bf16(x: Tensor, seed: int) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically (unbiased), with a dither derived from ``seed``.

    ``E[result] = x``: the 16 low mantissa bits are replaced by a uniform random carry before
    truncation. Deterministic for a given ``(x, seed)``.
    """
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    generator = torch.Generator(device=x.device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    noise = torch.randint(0, _BF16_LOW_BITS, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = torch.bitwise_and(bits + noise, _BF16_KEEP_MASK)
    return rounded.view(torch.float32).to(torch.bfloat16)


#: dtypes the fused kernel updates correctly on CPU. torch 2.13's CPU ``_fused_sgd_`` leaves the
#: vectorised part of bfloat16/float16 tensors unchanged (every element after the first multiple of
#: 16 is silently skipped; measured), so reduced-precision CPU parameters take the multi-tensor path.
_CPU_FUSED_DTYPES = (torch.float32, torch.float64)


def fused_supported(params: Sequence[Tensor], momentum_buffer_list: Sequence[Tensor | None]) -> bool:
    """Whether ``torch._fused_sgd_`` can run these blocks: floating parameters on a device with fused
    kernels (float32/float64 only on CPU), momentum buffers (if any) of the parameter's dtype."""
    devices = _get_fused_kernels_supported_devices()
    for p, buf in zip(params, momentum_buffer_list):
        if p.device.type not in devices or not p.is_floating_point():
            return False
        if p.device.type == "cpu" and p.dtype not in _CPU_FUSED_DTYPES:
            return False
        if buf is not None and buf.dtype != p.dtype:
            return False
    return True


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
    """Apply one SGD-SaI step in place (see the module docstring for the equations).

    ``momentum_buffer_list[i]`` is ``None`` for a block's first update; the new buffer (of
    ``momentum_dtype``, default the parameter's dtype) is written back into the list, as
    ``torch.optim.sgd.sgd`` does, so the caller can store it. ``steps[i]`` (the block's update
    count, used only to seed stochastic rounding) defaults to 0.

    ``fused=None, foreach=None`` picks the fused path where :func:`fused_supported` allows and the
    buffers are kept in the parameter's dtype, else the multi-tensor path.
    """
    if not (len(params) == len(grads) == len(momentum_buffer_list) == len(scales)):
        raise ValueError("params, grads, momentum_buffer_list and scales must have the same length")
    if fused and foreach:
        raise ValueError("fused and foreach cannot both be True")
    low_precision = momentum_dtype is not None and any(momentum_dtype != p.dtype for p in params)
    compiling = torch.compiler.is_compiling()
    if fused is None and foreach is None:
        # Under torch.compile the multi-tensor ops are traced and fused by the compiler instead
        # (``_fused_sgd_`` has no fake-tensor kernel).
        fused = not (low_precision or compiling) and fused_supported(params, momentum_buffer_list)
        foreach = not fused
    if fused:
        if compiling:
            raise RuntimeError("fused=True cannot be traced by torch.compile: leave fused=None (or foreach=True)")
        if low_precision:
            raise ValueError(f"fused=True needs momentum buffers in the parameter dtype, got momentum_dtype={momentum_dtype}")
        if not fused_supported(params, momentum_buffer_list):
            raise RuntimeError(
                "fused=True needs floating-point parameters on a device with fused kernels "
                "(on CPU float32/float64 only: torch's CPU fused SGD skips bfloat16/float16 elements)"
            )
        impl = _fused_sgd_sai
    elif foreach:
        impl = _multi_tensor_sgd_sai
    else:
        impl = _single_tensor_sgd_sai
    impl(
        params,
        grads,
        momentum_buffer_list,
        scales,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
        momentum_dtype=momentum_dtype,
        steps=steps if steps is not None else [0] * len(params),
    )


def _new_buffer(grad: Tensor, momentum_dtype: torch.dtype | None, seed: int) -> Tensor:
    """``m_1 = g_1`` in the buffer's dtype."""
    if momentum_dtype is None or momentum_dtype == grad.dtype:
        return torch.clone(grad).detach()
    if momentum_dtype == torch.bfloat16:
        return stochastic_round_to_bf16(grad, seed)
    return grad.detach().to(momentum_dtype)


def _mixed_precision_momentum(buf: Tensor, grad: Tensor, momentum: float, seed: int) -> Tensor:
    """``m = mu m + (1 - mu) g`` computed in the wider of the buffer's and gradient's dtypes and
    stored back into ``buf`` (stochastically rounded when ``buf`` is bfloat16); returns ``m`` in
    the wider dtype, which is what the parameter update uses."""
    wide = torch.promote_types(buf.dtype, grad.dtype)
    value = buf.to(wide).lerp_(grad.to(wide), 1 - momentum)
    if buf.dtype == torch.bfloat16 and wide == torch.float32:
        buf.copy_(stochastic_round_to_bf16(value, seed))
    else:
        buf.copy_(value)
    return value


def _seed(step: int, index: int) -> int:
    return (step + 1) * 1_000_003 + index


def _single_tensor_sgd_sai(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer_list: list[Tensor | None],
    scales: Sequence[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    momentum_dtype: torch.dtype | None,
    steps: Sequence[int],
) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = _new_buffer(grad, momentum_dtype, _seed(steps[i], i))
                momentum_buffer_list[i] = buf
                direction = grad if buf.dtype != grad.dtype else buf
            elif buf.dtype != grad.dtype:
                direction = _mixed_precision_momentum(buf, grad, momentum, _seed(steps[i], i))
            else:
                direction = buf.lerp_(grad, 1 - momentum)
        else:
            direction = grad
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr * scales[i])


def _multi_tensor_sgd_sai(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer_list: list[Tensor | None],
    scales: Sequence[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    momentum_dtype: torch.dtype | None,
    steps: Sequence[int],
) -> None:
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [list(params), list(grads), list(momentum_buffer_list)], with_indices=True
    )
    for (device_params, device_grads, device_bufs), indices in grouped.values():
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if momentum != 0:
            directions: list[Tensor] = []
            same = [j for j, buf in enumerate(device_bufs) if buf is not None and buf.dtype == device_grads[j].dtype]
            if same:
                torch._foreach_lerp_([device_bufs[j] for j in same], [device_grads[j] for j in same], 1 - momentum)
            for j, buf in enumerate(device_bufs):
                i = indices[j]
                if buf is None:
                    buf = _new_buffer(device_grads[j], momentum_dtype, _seed(steps[i], i))
                    momentum_buffer_list[i] = buf
                    directions.append(device_grads[j] if buf.dtype != device_grads[j].dtype else buf)
                elif buf.dtype != device_grads[j].dtype:
                    directions.append(_mixed_precision_momentum(buf, device_grads[j], momentum, _seed(steps[i], i)))
                else:
                    directions.append(buf)
        else:
            directions = list(device_grads)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        step_sizes = [-lr * scales[i] for i in indices]
        torch._foreach_add_(device_params, torch._foreach_mul(directions, step_sizes))


def _fused_sgd_sai(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer_list: list[Tensor | None],
    scales: Sequence[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    momentum_dtype: torch.dtype | None,
    steps: Sequence[int],
) -> None:
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)
    for i, (param, grad) in enumerate(zip(params, grads)):
        buffers: list[Tensor] = []
        first = False
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.empty_like(param, memory_format=torch.preserve_format)
                momentum_buffer_list[i] = buf
                first = True
            buffers = [buf]
        torch._fused_sgd_(
            [param],
            [grad],
            buffers,
            weight_decay=0.0,
            momentum=momentum,
            lr=lr * scales[i],
            dampening=momentum,
            nesterov=False,
            maximize=maximize,
            is_first_step=first,
        )
