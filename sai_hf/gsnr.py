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

Only :func:`gradient_statistics` touches the gradients (no host sync on accelerators);
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
    "STATISTICS_WIDTH",
]

#: Columns of a statistics row (rows are additive over disjoint pieces of a block).
STATISTICS_WIDTH = 3

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
    tensor's statistics). The result lives on the device of the first gradient.

    Accuracy is that of float64 accumulation on every device. How it is reached depends on the
    device, because float64 reductions of float32 data are ~10x slower than float32 ones on CPU:

    * CUDA / MPS / anything but CPU: one float64 (MPS: float32) reduction per statistic and
      tensor; no host sync.
    * CPU: a large tensor is reduced in float32 over rows of :data:`_CPU_CHUNK` entries, and the
      row results are summed in float64 (one float32 pass per statistic, ~10x faster). Rounding
      is then relative to each row's ``sum(g^2)``, which is only a problem where the mean
      dominates the spread (the variance is a small difference of large numbers), or where
      float32 squares overflow or underflow. Such blocks (:func:`_needs_exact_statistics`) are
      recomputed with the float64 reductions, so a constant gradient still has zero variance.
      The selection reads the statistics on the host, which costs nothing on CPU.
    """
    if not grads:
        return torch.zeros((0, STATISTICS_WIDTH), dtype=torch.float64)
    local = [_real(_local(g).detach()) for g in grads]
    device = local[0].device
    dtype = _accumulation_dtype(device)
    rows = [
        _chunked_row(g, dtype) if g.device.type == "cpu" and g.numel() >= _CPU_CHUNKED_MIN_NUMEL else _exact_row(g, dtype)
        for g in local
    ]
    stats = torch.stack([row.to(device) for row in rows])
    if device.type == "cpu":
        for i in _needs_exact_statistics(stats).nonzero().flatten().tolist():
            stats[i] = _exact_row(local[i], dtype)
    return stats


#: Entries per float32 row of the CPU reduction: short enough that a row's float32 sums are
#: accurate, long enough that the per-row float64 work is negligible.
_CPU_CHUNK = 1024
#: Tensors smaller than this are reduced in float64 directly (it is cheap at that size).
_CPU_CHUNKED_MIN_NUMEL = 16 * _CPU_CHUNK
#: The float32 row reduction is trusted where ``variance >= _CPU_MIN_RELATIVE_VARIANCE * mean(g^2)``
#: (|mean| below ~10 std); its relative error there is below ~1e-6 of the std.
_CPU_MIN_RELATIVE_VARIANCE = 1e-2
#: ... and where ``mean(g^2)`` is far from float32's underflow (squares of |g| < ~1e-19 are lost).
_CPU_MIN_MEAN_SQUARE = 1e-30


def _real(g: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(g) if g.is_complex() else g


def _exact_row(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, sum, sumsq]`` of ``g`` with ``dtype`` (float64) accumulation."""
    n = torch.tensor(float(g.numel()), dtype=dtype, device=g.device)
    total = g.sum(dtype=dtype)
    sumsq = torch.linalg.vector_norm(g, dtype=dtype).square()
    return torch.stack((n, total, sumsq))


def _chunked_row(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, sum, sumsq]`` of a large CPU tensor: float32 per row of ``_CPU_CHUNK``, ``dtype`` across rows."""
    flat = g.reshape(-1)
    row_dtype = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16, torch.float32) else flat.dtype
    whole = flat.numel() // _CPU_CHUNK * _CPU_CHUNK
    rows = flat[:whole].view(-1, _CPU_CHUNK)
    tail = flat[whole:]
    total = rows.sum(1, dtype=row_dtype).sum(dtype=dtype) + tail.sum(dtype=dtype)
    sumsq = torch.linalg.vector_norm(rows, dim=1, dtype=row_dtype).to(dtype).square().sum()
    sumsq = sumsq + torch.linalg.vector_norm(tail, dtype=dtype).square()
    n = torch.tensor(float(flat.numel()), dtype=dtype)
    return torch.stack((n, total, sumsq))


def _needs_exact_statistics(stats: torch.Tensor) -> torch.Tensor:
    """Rows whose float32-row statistics may be inaccurate (see :func:`gradient_statistics`)."""
    n, total, sumsq = stats.unbind(-1)
    mean_square = sumsq / n
    variance = mean_square - (total / n).square()
    trusted = (
        torch.isfinite(sumsq)
        & torch.isfinite(total)
        & (mean_square >= _CPU_MIN_MEAN_SQUARE)
        & (variance >= _CPU_MIN_RELATIVE_VARIANCE * mean_square)
    )
    return ~trusted & (n >= _CPU_CHUNKED_MIN_NUMEL)


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
