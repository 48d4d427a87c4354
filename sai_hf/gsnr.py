"""Gradient signal-to-noise ratio (g-SNR) of parameter blocks: the one place this math lives.

For a block (one parameter tensor) whose gradient ``g`` has ``n`` entries::

    norm(g)  = sqrt(sum_j g_j^2)
    std(g)   = sqrt( (sum_j g_j^2 - (sum_j g_j)^2 / n) / (n - 1) )        (unbiased, as torch.std)
    gsnr(g)  = norm(g) / (std(g) + eps)

Everything is computed from the three additive *statistics* ``(n, sum g, sum g^2)`` accumulated in
float64. Additive statistics can be summed across the shards of a tensor (FSDP, tensor parallel)
and give exactly the numbers of the whole tensor, which a two-pass ``torch.std`` on a shard cannot.

Each block is classified by :class:`BlockStatus`:

* ``SCALED``: finite, non-zero gradient with a well-defined spread; ``gsnr`` is the formula above.
* ``DEGENERATE``: finite, non-zero gradient but no usable spread: a one-element block (unbiased
  variance undefined) or a gradient whose std is below ``DEGENERATE_RELATIVE_STD`` of its RMS (e.g.
  all entries equal). The official formula gives ``norm / eps`` there (~1e8: the weights explode),
  so the caller substitutes a finite fallback.
* ``PENDING``: the gradient is all zero or has a NaN/inf entry: it carries no information yet.

Only :func:`gradient_statistics` touches the gradients (one batched pass, no host sync);
:func:`gsnr_from_statistics` is pure arithmetic on the ``(B, 3)`` statistics tensor.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

__all__ = [
    "BlockStatus",
    "DEGENERATE_RELATIVE_STD",
    "gradient_statistics",
    "gsnr_from_statistics",
]

#: A gradient whose unbiased std is below this fraction of its RMS is treated as having zero
#: variance (its g-SNR would be > ~1e6 * sqrt(n), a learning-rate multiplier no block should get).
DEGENERATE_RELATIVE_STD = 1e-6


class BlockStatus(enum.IntEnum):
    """What the first usable gradient of a block says about its scale."""

    PENDING = 0
    SCALED = 1
    DEGENERATE = 2


def _local(t: torch.Tensor) -> torch.Tensor:
    """The locally stored part of ``t`` (a DTensor's shard; ``t`` itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everything else accumulates in float64.
    return torch.float32 if device.type == "mps" else torch.float64


def gradient_statistics(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Additive statistics ``[n, sum(g), sum(g^2)]`` of each gradient, as a ``(B, 3)`` tensor.

    DTensor gradients contribute their local shard (sum the rows across ranks to get the whole
    tensor's statistics). The result lives on the device of the first gradient; no host sync.
    """
    if not grads:
        return torch.zeros((0, 3), dtype=torch.float64)
    local = [_local(g).detach() for g in grads]
    device = local[0].device
    dtype = _accumulation_dtype(device)
    rows = []
    for g in local:
        if g.is_complex():
            g = torch.view_as_real(g)
        n = torch.tensor(float(g.numel()), dtype=dtype, device=g.device)
        total = g.sum(dtype=dtype)
        sumsq = torch.linalg.vector_norm(g, dtype=dtype).square()
        rows.append(torch.stack((n, total, sumsq)).to(device))
    return torch.stack(rows)


def gsnr_from_statistics(
    stats: torch.Tensor, eps: float | torch.Tensor, eps_free: torch.Tensor | bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """g-SNR and :class:`BlockStatus` of each row ``[n, sum, sumsq]`` of ``stats``.

    Args:
        stats: ``(B, 3)`` statistics from :func:`gradient_statistics` (summed over shards).
        eps: the ``eps`` added to the std (a float, or a ``(B,)`` tensor of per-block values).
        eps_free: ``True`` (or a ``(B,)`` bool tensor) where the block's g-SNR is the scale-free
            limit ``norm / std`` (eps dropped). Used for blocks whose first non-zero gradient is
            tiny by construction (see :class:`sai_hf.SGDSaI`, "deferred blocks").

    Returns:
        ``(gsnr, status)``: float64 ``(B,)`` g-SNR (0 where not ``SCALED``) and int64 ``(B,)`` status.
    """
    n, total, sumsq = stats.unbind(-1)
    finite = torch.isfinite(total) & torch.isfinite(sumsq)
    nonzero = sumsq > 0
    # Unbiased variance from the additive statistics; clamp the rounding residue at 0.
    variance = ((sumsq - total.square() / n.clamp_min(1)) / (n - 1).clamp_min(1)).clamp_min(0)
    std = variance.sqrt()
    rms = (sumsq / n.clamp_min(1)).sqrt()
    spread = (n > 1) & (std > DEGENERATE_RELATIVE_STD * rms)
    eps_t = torch.as_tensor(eps, dtype=stats.dtype, device=stats.device)
    eps_t = torch.where(torch.as_tensor(eps_free, device=stats.device), torch.zeros_like(eps_t), eps_t)
    usable = finite & nonzero
    scaled = usable & spread
    gsnr = torch.where(scaled, sumsq.sqrt() / torch.where(scaled, std + eps_t, 1.0), 0.0)
    status = torch.full_like(n, BlockStatus.PENDING, dtype=torch.int64)
    status = torch.where(scaled, BlockStatus.SCALED, status)
    status = torch.where(usable & ~spread, BlockStatus.DEGENERATE, status)
    return gsnr, status
