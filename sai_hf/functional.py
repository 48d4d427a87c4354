"""Functional SGD-SaI update, dispatched like ``torch.optim.sgd.sgd``.

For every block ``i`` with a fixed scale ``s_i`` (from its g-SNR, see :mod:`sai_hf.gsnr`)::

    g   <- -g                         if maximize
    m   <- g                          on the block's first update (m_1 = g_1)
    m   <- mu * m + (1 - mu) * g      afterwards (computed as lerp(m, g, 1 - mu))
    p   <- p * (1 - lr * wd)          decoupled weight decay: uses lr, not lr * s_i
    p   <- p - lr * s_i * m

With ``momentum == 0`` no buffer is kept and ``m = g``.

Two implementations give the same result (tested): ``_single_tensor_sgd_sai`` (a for-loop over
tensors, the reference) and ``_multi_tensor_sgd_sai`` (``torch._foreach_*`` kernels, grouped by
device and dtype). Scales are host floats, fixed after the first step, so neither path syncs the
device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["sgd_sai"]


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
) -> None:
    """Apply one SGD-SaI step in place (see the module docstring for the equations).

    ``momentum_buffer_list[i]`` is ``None`` for a block's first update; the new buffer is written
    back into the list (as ``torch.optim.sgd.sgd`` does) so the caller can store it.
    """
    if not (len(params) == len(grads) == len(momentum_buffer_list) == len(scales)):
        raise ValueError("params, grads, momentum_buffer_list and scales must have the same length")
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    impl = _multi_tensor_sgd_sai if foreach else _single_tensor_sgd_sai
    impl(
        params,
        grads,
        momentum_buffer_list,
        scales,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
    )


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
) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.clone(grad).detach()
                momentum_buffer_list[i] = buf
            else:
                buf.lerp_(grad, 1 - momentum)
            direction = buf
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
            existing = [j for j, buf in enumerate(device_bufs) if buf is not None]
            if existing:
                torch._foreach_lerp_(
                    [device_bufs[j] for j in existing], [device_grads[j] for j in existing], 1 - momentum
                )
            for j, buf in enumerate(device_bufs):
                if buf is None:
                    buf = torch.clone(device_grads[j]).detach()
                    device_bufs[j] = buf
                    momentum_buffer_list[indices[j]] = buf
            directions = device_bufs
        else:
            directions = device_grads
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        step_sizes = [-lr * scales[i] for i in indices]
        torch._foreach_add_(device_params, torch._foreach_mul(directions, step_sizes))
