"""Functional SGD-SaI update, dispatched like ``torch.optim.sgd.sgd``.

For every block ``i`` with a fixed scale ``s_i`` (from its g-SNR, see :mod:`sai_hf.gsnr`)::

    g   <- -g                         if maximize
    m   <- g                          on the block's first update (m_1 = g_1)
    m   <- mu * m + (1 - mu) * g      afterwards
    p   <- p * (1 - lr * wd)          decoupled weight decay: uses lr, not lr * s_i
    p   <- p - lr * s_i * m

With ``momentum == 0`` no buffer is kept and ``m = g``.

Three implementations give the same result (tested against each other and against an independent
float64 reference, ``tests/reference.py``):

* ``_single_tensor_sgd_sai``: a for-loop over tensors, the reference;
* ``_multi_tensor_sgd_sai``: ``torch._foreach_*`` kernels grouped by device and dtype;
* ``_single_pass_sgd_sai`` (``fused``, the default): one pass over memory per block, reading
  ``p, g, m`` and writing ``p, m`` once (the memory-bandwidth floor of any momentum SGD), decay
  included. On CUDA one Triton kernel launch per dtype group (:mod:`sai_hf.triton_update`); large
  CPU blocks with weight decay or a bfloat16 buffer, one native loop each (:mod:`sai_hf.cpu_update`,
  C, the same float32 operations as the Triton kernel); other blocks torch's fused SGD kernel
  (``torch._fused_sgd_`` with ``lr * s_i`` as its learning rate and ``dampening = momentum``,
  exactly SGD-SaI's momentum rule), preceded by ``p *= 1 - lr wd`` slab by slab on CPU, so that ``p``
  is still in cache (also the fallback where the native loop cannot be built). Blocks it cannot run
  (non-contiguous layouts, CPU half-precision parameters) go through the multi-tensor path in the
  same call.

Scales are host floats, fixed after the first step, so no path syncs the device.

**Low-precision momentum.** A momentum buffer may be stored in a narrower dtype than its parameter
(``momentum_dtype=torch.bfloat16`` halves optimizer memory). The update is computed in the
parameter's precision and written back with *stochastic rounding* (``stochastic_round_to_bf16``):
unbiased, so the tiny ``(1 - mu) g`` increments that round-to-nearest would lose on a bf16 buffer
survive in expectation. The dither is a counter-based hash of ``(value, element index, step, block
index)``, so runs and resumed runs are reproducible and no generator state is kept. On CPU the
native loop (:mod:`sai_hf.cpu_update`) does it in the update's one pass (1.2x the fp32 fused step,
measured on GPT-2 shapes); the torch-ops update of a bfloat16-momentum block runs slab by slab
(``_SLAB`` elements) so its float32 temporaries stay in cache (~5.7x; a per-element
Mersenne-Twister draw made it ~30x).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_fused_kernels_supported_devices

__all__ = ["sgd_sai", "stochastic_round_to_bf16", "single_pass_supported"]

#: The two odd multipliers of the rounding hash (Chris Wellons' "lowbias32" integer hash), as signed int32.
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B - (1 << 32)
#: Elements per slab of the bfloat16-momentum update: the slab's float32 momentum and int32 hash
#: (1 MiB each) stay in cache across the ~20 elementwise passes of the update.
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


def _element_index(length: int, device: torch.device) -> Tensor:
    """``j = 0..length-1`` as int32 (the flat index of an element within its slab)."""
    return torch.arange(length, dtype=torch.int32, device=device)


def stochastic_bf16_bits(bits: Tensor, index: Tensor, key: int) -> Tensor:
    """The bfloat16 bit patterns (int16) of float32 values given as their bits (int32) ``bits``,
    stochastically rounded: ``index`` holds each value's flat index in its tensor (int32, wrapping),
    ``key`` is ``c(seed)`` wrapped to int32 (see :func:`stochastic_round_to_bf16` for the equations).
    The one torch-ops copy of the hash (the eager paths); the Triton kernel and the native CPU loop
    (``sai_hf/csrc/sgd_sai_cpu.c``) spell the same operations on uint32, tested bit for bit against it."""
    h = torch.add(bits, index).bitwise_xor_(key)  # in place where it can: two temporaries in eager mode
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16).bitwise_and_(0xFFFF)).mul_(_MIX_1)  # x ^= x >>> 16; x *= M1
    h.bitwise_xor_(torch.bitwise_right_shift(h, 15).bitwise_and_(0x1FFFF)).mul_(_MIX_2)  # x ^= x >>> 15; x *= M2
    h.bitwise_right_shift_(16).bitwise_and_(0xFFFF).add_(bits)  # b + (x >>> 16) (mod 2^32)
    return h.bitwise_right_shift_(16).to(torch.int16)  # its top 16 bits


def _round_bits_into(out: Tensor, bits: Tensor, index: Tensor, first_index: int, seed: int) -> None:
    """Write into int16 ``out`` the bfloat16 bits of float32 ``bits`` (viewed as int32; flat
    elements ``first_index, first_index + 1, ...`` of their tensor) stochastically rounded."""
    out.copy_(stochastic_bf16_bits(bits, index + _wrap_int32(first_index), _wrap_int32(_seed_offset(seed))))


# Run eagerly under torch.compile: inductor's index arithmetic overflows on the wrapping int32 hash.
@torch.compiler.disable
def stochastic_round_to_bf16(x: Tensor, seed: int) -> Tensor:
    """Round ``x`` (computed in float32) to bfloat16 stochastically: unbiased, deterministic per ``seed``.

    With ``b`` the float32 bits of element ``i`` (an int32), all arithmetic mod 2^32 and ``>>>`` the
    logical shift::

        x      = (b + i) xor c(seed)
        x      = (x xor (x >>> 16)) * M1;   x = (x xor (x >>> 15)) * M2      (the "lowbias32" mix)
        u_i    = x >>> 16                                                  (top 16 bits)
        result = top 16 bits of  b + u_i                                   (a bfloat16 bit pattern)

    ``c(seed)`` is a pseudo-random 32-bit key. For any fixed ``b`` and ``i``, ``(b + i) xor c`` is
    uniform when ``c`` is, and each mixing step is a bijection mod 2^32 (odd ``M1``, ``M2``), so
    ``u_i`` is uniform on ``[0, 2^16)``: ``x`` rounds up (away from zero) with probability equal to
    its truncated low 16 bits / 2^16, i.e. ``E[result] = x``. Equal entries get different ``u_i``
    (the index enters the hash). Two earlier hashes failed the property suite's independence checks,
    both on blocks whose entries are all equal: ``K (b + i + c)`` gave two steps' dithers the same
    difference for every element (a constant gradient's bf16 momentum drifted by 15 standard errors
    in 60 steps), and a single multiply ``K ((b + i) xor c)`` keeps the Weyl-sequence structure of
    ``K x`` over consecutive ``x``, so the elements that step 1 rounded down were not a random subset
    for step 2 (6.8 standard errors at step 2 on a 64x64 block). The full mix decorrelates them. This
    is a counter-based generator: no generator state, a few integer passes instead of a
    Mersenne-Twister draw per element.
    """
    bits = x.detach().to(torch.float32).contiguous().view(-1).view(torch.int32)
    out = torch.empty(bits.shape, dtype=torch.int16, device=bits.device)
    numel = bits.numel()
    size = _slab_size(numel)
    index = _element_index(size, bits.device)
    for start in range(0, numel, size):
        n = min(numel, start + size) - start
        _round_bits_into(out[start : start + n], bits[start : start + n], index[:n], start, seed)
    return out.view(torch.bfloat16).view(x.shape)


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

        m = g (first) or mu buf + (1 - mu) g     in float32 (:func:`_bf16_momentum`)
        buf <- stochastic_round_to_bf16(m);      param <- decay * param + step_size * m

    On CPU slab by slab, so that the float32 temporaries and ``param`` stay in cache (one pass over
    memory); elsewhere on the whole tensor. The result is the one of the whole-tensor formulas (the
    hash takes each element's flat index)."""
    contiguous = param.is_contiguous() and grad.is_contiguous() and buf.is_contiguous()
    if not contiguous:
        wide = grad.float()
        value = wide if first else _bf16_momentum(torch.empty_like(wide), buf, wide, momentum, torch.empty_like(wide))
        buf.copy_(stochastic_round_to_bf16(value, seed))
        if decay != 1.0:
            param.mul_(decay)
        param.add_(value, alpha=step_size)
        return
    p, g, b = param.view(-1), grad.view(-1), buf.view(-1)
    out = b.view(torch.int16)
    numel = p.numel()
    size = _slab_size(numel) if p.device.type == "cpu" else max(1, numel)
    value = torch.empty(size, dtype=torch.float32, device=p.device)
    scratch = torch.empty_like(value) if not first else None
    index = _element_index(size, p.device)
    for start in range(0, numel, size):
        end = min(numel, start + size)
        n = end - start
        if first:
            m = value[:n].copy_(g[start:end])
        else:
            m = _bf16_momentum(value[:n], b[start:end], g[start:end].float(), momentum, scratch[:n])  # type: ignore[index]
        _round_bits_into(out[start:end], m.view(torch.int32), index[:n], start, seed)
        ps = p[start:end]
        if decay != 1.0:
            ps.mul_(decay)
        ps.add_(m, alpha=step_size)


#: Elements per slab of the single-pass float32/float64 update on CPU: decay (``p *= 1 - lr wd``)
#: and torch's fused SGD kernel run slab after slab, so ``p`` is read from memory once (the slab's
#: ``p``, ``g``, ``m``, 12 MiB in float32, stay in the last-level cache). Measured on a 2-core EPYC
#: (38.6M entries): 2^20 as fast as the fused kernel without decay; below 2^17 the per-call
#: threading overhead dominates.
_DECAY_SLAB = 1 << 20


def _fused_sgd_block(
    param: Tensor, grad: Tensor, buf: Tensor | None, momentum: float, step_size: float, decay: float, maximize: bool, first: bool
) -> None:
    """``torch._fused_sgd_`` on one block with decoupled decay folded in: ``p *= decay`` and the
    fused SGD step (``lr = -step_size``, ``dampening = mu``: exactly SGD-SaI's momentum rule) run
    slab by slab on CPU, so that one pass reads ``p, g, m`` and writes ``p, m``."""
    numel = param.numel()
    size = _DECAY_SLAB if decay != 1.0 and param.device.type == "cpu" else max(1, numel)
    blocks = [(param, grad, buf)]
    if numel > size:
        flat = [param.view(-1), grad.view(-1), buf.view(-1) if buf is not None else None]
        blocks = [[t[start : start + size] if t is not None else None for t in flat] for start in range(0, numel, size)]
    for p, g, m in blocks:
        if decay != 1.0:
            p.mul_(decay)
        torch._fused_sgd_(
            [p], [g], [m] if m is not None else [],
            weight_decay=0.0, momentum=momentum, lr=-step_size, dampening=momentum,
            nesterov=False, maximize=maximize, is_first_step=first,
        )


#: dtypes the fused kernel updates correctly on CPU. torch 2.13's CPU ``_fused_sgd_`` leaves the
#: vectorised part of bfloat16/float16 tensors unchanged (every element after the first multiple of
#: 16 is silently skipped; measured), so reduced-precision CPU parameters take the multi-tensor path.
_CPU_FUSED_DTYPES = (torch.float32, torch.float64)


@functools.cache
def _fused_devices() -> frozenset[str]:
    """Device types with torch's fused optimizer kernels."""
    return frozenset(_get_fused_kernels_supported_devices())


def single_pass_supported(param: Tensor, grad: Tensor, buf: Tensor | None, momentum_dtype: torch.dtype | None) -> bool:
    """Whether one block can take the single-pass kernel: ``param``, ``grad`` and ``buf`` contiguous
    (the fused kernels read raw memory: a slice, strided or transposed view would be misread),
    floating-point, on a device with fused kernels (float32/float64 only on CPU), and the momentum
    buffer in the parameter's dtype or bfloat16 for a float32 parameter; on CUDA with Triton, any
    float32/float16/bfloat16 combination (:mod:`sai_hf.triton_update`)."""
    if param.device.type not in _fused_devices() or not param.is_floating_point() or param.is_complex():
        return False
    if not (param.is_contiguous() and grad.is_contiguous() and (buf is None or buf.is_contiguous())):
        return False
    buf_dtype = buf.dtype if buf is not None else (momentum_dtype or param.dtype)
    if _on_triton(param, grad, buf_dtype):
        return True
    if buf_dtype == torch.bfloat16 and param.dtype == torch.float32:
        return True
    if buf_dtype != param.dtype:
        return False
    return param.device.type != "cpu" or param.dtype in _CPU_FUSED_DTYPES


def _on_triton(param: Tensor, grad: Tensor, buf_dtype: torch.dtype) -> bool:
    """Whether a contiguous block runs in the Triton kernel: CUDA with Triton, supported dtypes."""
    if param.device.type != "cuda":
        return False
    from .triton_update import SUPPORTED_DTYPES, triton_available

    return triton_available(param.device) and {param.dtype, grad.dtype, buf_dtype} <= set(SUPPORTED_DTYPES)


def _on_native_cpu_loop(param: Tensor, grad: Tensor, buf_dtype: torch.dtype, decayed: bool) -> bool:
    """Whether a contiguous block runs in the native CPU loop (:mod:`sai_hf.cpu_update`): a CPU
    block with weight decay or a bfloat16 buffer (without either, torch's fused kernel already makes
    one pass, at the same host cost)."""
    if param.device.type != "cpu" or (not decayed and buf_dtype == param.dtype):
        return False
    from .cpu_update import takes

    return takes(param, grad, buf_dtype)


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

    Paths: ``fused`` runs each block that :func:`single_pass_supported` allows in one pass (decay,
    momentum and update together), and the other blocks (non-contiguous layouts, CPU half-precision
    parameters, ...) through the multi-tensor path, which gives the same result. ``fused=None,
    foreach=None`` (the default) is ``fused``, except under ``torch.compile``, where the multi-tensor
    ops are traced and fused by the compiler instead (the fused kernels have no fake-tensor kernel).
    ``foreach=True``: the multi-tensor path; both False: the for-loop reference.
    """
    if not (len(params) == len(grads) == len(momentum_buffer_list) == len(scales)):
        raise ValueError("params, grads, momentum_buffer_list and scales must have the same length")
    if fused and foreach:
        raise ValueError("fused and foreach cannot both be True")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape:  # the fused kernels would read past the gradient
            raise ValueError(f"SGD-SaI: block #{i} has a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        if p.is_complex() and momentum_dtype is not None and momentum != 0 and not momentum_dtype.is_complex:
            raise ValueError(f"SGD-SaI: momentum_dtype={momentum_dtype} cannot hold the momentum of complex block #{i}")
    compiling = torch.compiler.is_compiling()
    if fused is None and foreach is None:
        fused = not compiling
        foreach = compiling
    if fused and compiling:
        raise RuntimeError("fused=True cannot be traced by torch.compile: leave fused=None (or foreach=True)")
    steps = steps if steps is not None else [0] * len(params)
    seeds = [_seed(step, i) for i, step in enumerate(steps)]
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, momentum_dtype=momentum_dtype)
    if not fused:
        impl = _multi_tensor_sgd_sai if foreach else _single_tensor_sgd_sai
        impl(params, grads, momentum_buffer_list, scales, seeds=seeds, **hyper)
        return
    single = [
        single_pass_supported(p, g, b, momentum_dtype if momentum != 0 else None)
        for p, g, b in zip(params, grads, momentum_buffer_list)
    ]
    for path, chosen in ((_single_pass_sgd_sai, True), (_multi_tensor_sgd_sai, False)):
        index = [i for i, s in enumerate(single) if s is chosen]
        if not index:
            continue
        bufs = [momentum_buffer_list[i] for i in index]
        path(
            [params[i] for i in index], [grads[i] for i in index], bufs, [scales[i] for i in index],
            seeds=[seeds[i] for i in index], **hyper,
        )
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
    seeds: Sequence[int],
) -> None:
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
    seeds: Sequence[int],
) -> None:
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
    seeds: Sequence[int],
) -> None:
    """One pass per block (blocks that :func:`single_pass_supported` allows): decay, momentum and
    the scaled update read ``p, g, m`` and write ``p, m`` once. CUDA blocks run in the Triton kernel
    where it is available (one launch per dtype group, :mod:`sai_hf.triton_update`), large decayed or
    bfloat16-buffer CPU blocks in the native loop (:mod:`sai_hf.cpu_update`); the others block by
    block (:func:`_fused_sgd_block`, :func:`_bf16_momentum_update`)."""
    decay = 1 - lr * weight_decay
    first = [buf is None for buf in momentum_buffer_list]
    for i, param in enumerate(params):
        buf = momentum_buffer_list[i]
        if momentum != 0 and buf is None:
            buf = torch.empty_like(param, dtype=momentum_dtype or param.dtype, memory_format=torch.contiguous_format)
            momentum_buffer_list[i] = buf
        if momentum != 0 and buf.shape != param.shape:
            raise RuntimeError(f"SGDSaI: momentum buffer of shape {tuple(buf.shape)} for a parameter of shape {tuple(param.shape)}")
    step_sizes = [-lr * scale for scale in scales]
    buf_dtypes = [momentum_buffer_list[i].dtype if momentum != 0 else p.dtype for i, p in enumerate(params)]  # type: ignore[union-attr]
    kernels = (  # (module, function, whether block i runs in it): one call for all the blocks each takes
        ("triton_update", "triton_sgd_sai_", lambda i: _on_triton(params[i], grads[i], buf_dtypes[i])),
        ("cpu_update", "cpu_sgd_sai_", lambda i: _on_native_cpu_loop(params[i], grads[i], buf_dtypes[i], decay != 1.0)),
    )
    done: set[int] = set()
    for module, function, takes in kernels:
        index = [i for i in range(len(params)) if i not in done and takes(i)]
        if not index:
            continue
        getattr(importlib.import_module(f".{module}", __package__), function)(
            [params[i] for i in index], [grads[i] for i in index],
            [momentum_buffer_list[i] for i in index] if momentum != 0 else None, [step_sizes[i] for i in index],
            decay=decay, momentum=momentum, first=[first[i] for i in index], maximize=maximize,
            seeds=[seeds[i] for i in index],
        )  # fmt: skip
        done.update(index)
    for i, (param, grad) in enumerate(zip(params, grads)):
        if i in done:
            continue
        buf, step_size = momentum_buffer_list[i] if momentum != 0 else None, step_sizes[i]
        if buf is not None and buf.dtype != param.dtype:
            _bf16_momentum_update(param, -grad if maximize else grad, buf, momentum, step_size, decay, first[i], seeds[i])
        else:
            _fused_sgd_block(param, grad, buf, momentum, step_size, decay, maximize, first[i])
    # The kernels (Triton, the C loop, torch's fused SGD) write memory behind autograd's back: bump
    # the version counters, so that a backward through a graph that saved these tensors raises, as
    # after any in-place op.
    written = [*params, *(momentum_buffer_list if momentum != 0 else [])]
    torch.autograd.graph.increment_version([t for t in written if t is not None and not t.is_inference()])
