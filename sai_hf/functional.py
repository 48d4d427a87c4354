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
survive in expectation. The dither is a counter-based hash of ``(value, element index, step, block
index)``, so runs and resumed runs are reproducible and no generator state is kept. The update of a
bfloat16-momentum block runs slab by slab (``_SLAB`` elements) so its float32 temporaries stay in
cache: measured on CPU, ~4x the time of the fp32 fused step on the same tensor (a per-element
Mersenne-Twister draw made it ~30x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_fused_kernels_supported_devices

__all__ = ["sgd_sai", "stochastic_round_to_bf16", "fused_supported"]

#: Odd 32-bit multiplier of the rounding hash (2^32 / golden ratio, as a signed int32).
_HASH_MULTIPLIER = -1640531535
#: Elements per slab of the bfloat16-momentum update: the slab's float32 momentum and int32 hash
#: (1 MiB each) stay in cache across the ~10 elementwise passes of the update.
_SLAB = 1 << 18
_MASK64 = (1 << 64) - 1


def _slab_size(numel: int) -> int:
    return max(1, min(numel, _SLAB))


def _wrap_int32(value: int) -> int:
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _seed_offset(seed: int) -> int:
    """A pseudo-random 32-bit offset derived from ``seed`` (the splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0xFFFF_FFFF


def _index_hash(length: int, device: torch.device) -> Tensor:
    """``K * j`` for ``j = 0..length-1`` as wrapping int32."""
    return torch.arange(length, dtype=torch.int32, device=device).mul_(_HASH_MULTIPLIER)


def _round_bits_into(out: Tensor, bits: Tensor, index_hash: Tensor, first_index: int, seed: int, scratch: Tensor) -> None:
    """Write into int16 ``out`` the bfloat16 bits of float32 ``bits`` (viewed as int32; flat
    elements ``first_index, first_index + 1, ...`` of their tensor) stochastically rounded."""
    offset = _wrap_int32(_HASH_MULTIPLIER * (first_index + _seed_offset(seed)))
    torch.add(index_hash, bits, alpha=_HASH_MULTIPLIER, out=scratch).add_(offset)  # h = K (bits + i + c)
    scratch.bitwise_right_shift_(16).bitwise_and_(0xFFFF)  # u = top 16 bits of h
    scratch.add_(bits).bitwise_right_shift_(16)  # (bits + u) >> 16
    out.copy_(scratch)  # int32 -> int16: the bfloat16 bit pattern


# Run eagerly under torch.compile: inductor's index arithmetic overflows on the wrapping int32 hash.
@torch.compiler.disable
def stochastic_round_to_bf16(x: Tensor, seed: int) -> Tensor:
    """Round ``x`` (computed in float32) to bfloat16 stochastically: unbiased, deterministic per ``seed``.

    With ``b`` the float32 bits of element ``i`` (an int32) and ``K`` an odd constant::

        u_i    = top 16 bits of  K * (b + i + c(seed))      (mod 2^32)
        result = top 16 bits of  b + u_i                    (a bfloat16 bit pattern)

    ``c(seed)`` is a pseudo-random 32-bit offset. For any fixed ``b`` and ``i``, ``b + i + c`` is
    uniform when ``c`` is, multiplication by an odd ``K`` is a bijection mod 2^32, so ``u_i`` is
    uniform on ``[0, 2^16)``: ``x`` rounds up (away from zero) with probability equal to its
    truncated low 16 bits / 2^16, i.e. ``E[result] = x``. Equal entries get different
    ``u_i`` (the index enters the hash). This is a counter-based generator: no generator state,
    ~6 integer passes instead of a Mersenne-Twister draw per element.
    """
    bits = x.detach().to(torch.float32).contiguous().view(-1).view(torch.int32)
    out = torch.empty(bits.shape, dtype=torch.int16, device=bits.device)
    numel = bits.numel()
    size = _slab_size(numel)
    index_hash, scratch = _index_hash(size, bits.device), torch.empty(size, dtype=torch.int32, device=bits.device)
    for start in range(0, numel, size):
        n = min(numel, start + size) - start
        _round_bits_into(out[start : start + n], bits[start : start + n], index_hash[:n], start, seed, scratch[:n])
    return out.view(torch.bfloat16).view(x.shape)


@torch.compiler.disable  # as stochastic_round_to_bf16
def _bf16_momentum_update(param: Tensor, grad: Tensor, buf: Tensor, momentum: float, step_size: float, seed: int) -> None:
    """``m = mu buf + (1 - mu) g`` in float32, ``buf <- stochastic_round_to_bf16(m)``,
    ``param += step_size * m``; slab by slab, so that the temporaries stay in cache. The result is
    the one of the whole-tensor formulas (the hash takes each element's flat index)."""
    if not (param.is_contiguous() and grad.is_contiguous() and buf.is_contiguous()):
        value = buf.float().lerp_(grad.float(), 1 - momentum)
        buf.copy_(stochastic_round_to_bf16(value, seed))
        param.add_(value, alpha=step_size)
        return
    p, g, b = param.view(-1), grad.view(-1), buf.view(-1)
    out = b.view(torch.int16)
    numel = p.numel()
    size = _slab_size(numel)
    value = torch.empty(size, dtype=torch.float32, device=p.device)
    scratch = torch.empty(size, dtype=torch.int32, device=p.device)
    index_hash = _index_hash(size, p.device)
    for start in range(0, numel, size):
        end = min(numel, start + size)
        n = end - start
        m = value[:n].copy_(b[start:end])
        m.lerp_(g[start:end].float(), 1 - momentum)
        _round_bits_into(out[start:end], m.view(torch.int32), index_hash[:n], start, seed, scratch[:n])
        p[start:end].add_(m, alpha=step_size)


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


def _mixed_precision_update(
    param: Tensor, grad: Tensor, buf: Tensor, momentum: float, step_size: float, seed: int
) -> None:
    """Momentum step of a block whose buffer dtype differs from its gradient's: ``m = mu m + (1 - mu) g``
    computed in the wider dtype and stored back into ``buf`` (stochastically rounded when ``buf`` is
    bfloat16), then ``param += step_size * m`` with the wide ``m``."""
    wide = torch.promote_types(buf.dtype, grad.dtype)
    if buf.dtype == torch.bfloat16 and wide == torch.float32:
        _bf16_momentum_update(param, grad, buf, momentum, step_size, seed)
        return
    value = buf.to(wide).lerp_(grad.to(wide), 1 - momentum)
    buf.copy_(value)
    param.add_(value, alpha=step_size)


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
        step_size = -lr * scales[i]
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = _new_buffer(grad, momentum_dtype, _seed(steps[i], i))
                momentum_buffer_list[i] = buf
                direction = grad if buf.dtype != grad.dtype else buf
            elif buf.dtype != grad.dtype:
                _mixed_precision_update(param, grad, buf, momentum, step_size, _seed(steps[i], i))
                continue
            else:
                direction = buf.lerp_(grad, 1 - momentum)
        else:
            direction = grad
        param.add_(direction, alpha=step_size)


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
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        updated, directions = [], []  # blocks updated by foreach, and their directions
        for j, grad in enumerate(device_grads):
            i = indices[j]
            buf = device_bufs[j] if momentum != 0 else grad
            if buf is None:
                buf = _new_buffer(grad, momentum_dtype, _seed(steps[i], i))
                momentum_buffer_list[i] = buf
                updated.append(j)
                directions.append(grad if buf.dtype != grad.dtype else buf)
            elif buf.dtype != grad.dtype:
                _mixed_precision_update(device_params[j], grad, buf, momentum, -lr * scales[i], _seed(steps[i], i))
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
