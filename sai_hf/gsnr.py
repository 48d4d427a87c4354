"""Gradient signal-to-noise ratio (g-SNR) of parameter blocks: the one place this math lives.

For a block (one parameter tensor) whose gradient ``g`` has ``n`` entries with mean ``mu`` (complex: ``|.|`` the
modulus, as torch)::

    norm(g) = sqrt(sum_j |g_j|^2);   M2(g) = sum_j |g_j - mu|^2;   std(g) = sqrt(M2 / (n - 1));   gsnr = norm / (std + eps)

**Statistics.** Everything comes from ``STATISTICS_WIDTH`` additive float64 statistics per piece of a block, so that a
block split into disjoint pieces (FSDP shards, CPU rows, ZeRO fragments) gives the whole block's numbers by summing the
pieces' rows. For a piece ``k`` with ``n_k`` entries, sum ``S_k`` and centred sum of squares
``C_k = sum_j |g_j - S_k/n_k|^2``, and for the sums ``n, S, C, P`` of the rows (Chan et al.'s parallel variance)::

    row_k = [n_k,  Re S_k,  Im S_k,  C_k,  |S_k|^2 / n_k]
    M2    = C + (P - |S|^2 / n)         (the bracket: sum_k n_k |mu_k - mu|^2, between pieces)
    sum |g|^2 = C + P

The variance is never ``sum g^2 - (sum g)^2 / n``: that difference cancels catastrophically (a constant gradient got a
g-SNR of ~5e8). ``C_k`` is accumulated from centred values; the bracket is exactly zero for one piece (the same float64
operations) and tiny across pieces.

:class:`BlockStatus`: ``SCALED`` (finite, non-zero gradient with a spread: the formula above); ``DEGENERATE`` (finite,
non-zero, but one element or a std below ``DEGENERATE_RELATIVE_STD`` of its RMS: ``norm / eps`` would explode the
weights, the caller substitutes a fallback); ``PENDING`` (absent, empty, all zero or non-finite: no information yet).

Only :func:`gradient_statistics` touches the gradients (no host sync on accelerators); :func:`gsnr_from_statistics` is
pure arithmetic on the ``(B, STATISTICS_WIDTH)`` statistics. A gradient ``c g`` (a factor applied later, not
materialised) has the row ``[n, c Re S, c Im S, c^2 C, c^2 P]`` (:func:`scaled_statistics`).

**Scales.** For the blocks measured in one scaling step (rows summed over each block's pieces)::

    gsnr_i, status_i = gsnr_from_statistics(rows_i, eps_i, eps_free_i)           (measure: the one host sync)
    gsnr_max         = max { gsnr_i : status_i = SCALED }                        (scales, first scaling step)
                       (scale_rule="sqrt_numel": max { sqrt(numel_i) : status_i != PENDING })
    basis_i          = gsnr_i                                                     scale_rule="gsnr"
                     = gsnr_max (1.0 before it is known)     if status_i = DEGENERATE
                     = sqrt(numel_i)                                              scale_rule="sqrt_numel"
    scale_i          = basis_i                                                    normalize="none"
                     = basis_i / gsnr_max (1.0 before it is known)               normalize="max"

``gsnr_max`` is fixed by the first scaling step that has one and reused by every later step. ``PENDING`` blocks get
no scale (:func:`scales`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import native

__all__ = [
    "BlockStatus", "DEGENERATE_RELATIVE_STD", "STATISTICS_WIDTH", "NORMALIZATIONS", "SCALE_RULES", "AssignedScale",
    "gradient_statistics", "present_statistics", "scaled_statistics", "gsnr_from_statistics", "measure", "scales",
    "local_part", "zero_statistics",
]  # fmt: skip

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("none", "max")
#: Accepted values of ``scale_rule``: what a block's scale is built from.
SCALE_RULES = ("gsnr", "sqrt_numel")

#: A gradient whose unbiased std is below this fraction of its RMS is treated as having zero
#: variance (its g-SNR would be > ~1e6 * sqrt(n), a learning-rate multiplier no block should get).
DEGENERATE_RELATIVE_STD = 1e-6

#: Columns of a statistics row: ``[n, Re S, Im S, C, |S|^2 / n]`` (see the module docstring).
STATISTICS_WIDTH = 5


class BlockStatus(enum.IntEnum):
    """What the first usable gradient of a block says about its scale."""

    PENDING = 0
    SCALED = 1
    DEGENERATE = 2


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The entries of ``t`` stored on this rank: ``t.to_local()`` for a DTensor (so that :func:`gradient_statistics`
    takes DTensor gradients directly), ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """dtype of the statistics on ``device``: float64 (MPS has none: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def zero_statistics(blocks: int, device: torch.device) -> torch.Tensor:
    """Statistics of ``blocks`` pieces with no entries (a block with no gradient on this rank)."""
    return torch.zeros((blocks, STATISTICS_WIDTH), dtype=accumulation_dtype(device), device=device)


def _mean_mass(sum_re: torch.Tensor, sum_im: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``|S|^2 / n`` (0 where ``n == 0``): the same float64 operations for a piece and for a block,
    so the between-pieces bracket of an unsharded block is exactly zero."""
    return (sum_re.square() + sum_im.square()) / n.clamp_min(1)


def _row(n: torch.Tensor, total: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
    """The statistics row of one piece from its entry count, (real or complex) sum and ``C``."""
    sum_re, sum_im = (total.real, total.imag) if total.is_complex() else (total, torch.zeros_like(total))
    return torch.stack((n, sum_re, sum_im, centred, _mean_mass(sum_re, sum_im, n)))


def gradient_statistics(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Statistics rows (see the module docstring) of each gradient, as a ``(B, STATISTICS_WIDTH)`` tensor on the first
    gradient's device. DTensor gradients contribute their local shard (sum the rows across ranks for the whole tensor).

    Rows are accumulated from centred values in float64 (float32 on MPS): contiguous float32 CPU gradients in one
    native call (:func:`_native_statistics`), every other gradient by :func:`_shifted_statistics`, one at a time.

    Why two paths for a cost paid once per run (measured 2026-12-07, 2 loaded cores, GPT-2 124M's 146 float32
    gradients, one run): the native call took 0.09 s, the float64 shifted sums 2.2 s (25x; torch's fused SGD step
    took 0.06 s in the same run), and the native call's sums are the ones every published CPU result was computed
    with (the two differ in the last bits: g-SNR 2.6e-16 apart). On a GPU the shifted sums are a few
    bandwidth-bound passes (about 20 bytes per entry, once per run): no kernel of its own is worth its code.
    """
    if not grads:
        return torch.zeros((0, STATISTICS_WIDTH), dtype=torch.float64)
    local = [local_part(g).detach() for g in grads]
    device = local[0].device
    dtype = accumulation_dtype(device)
    batched = _native_statistics(local) if dtype == torch.float64 else {}
    return torch.stack([(batched[i] if i in batched else _shifted_statistics(g, dtype)).to(device) for i, g in enumerate(local)])


def present_statistics(grads: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """:func:`gradient_statistics` of ``grads``, a zero row (no entries) where a gradient is ``None`` (a block with no
    entries here): ``(B, STATISTICS_WIDTH)``; ``device`` where every one is ``None``."""
    present = [i for i, g in enumerate(grads) if g is not None]
    if len(present) == len(grads):
        return gradient_statistics(grads)  # type: ignore[arg-type]
    rows = zero_statistics(len(grads), device)
    if present:
        found = gradient_statistics([grads[i] for i in present])  # type: ignore[misc]
        rows = rows.to(found.device, found.dtype)
        rows[torch.tensor(present, device=found.device)] = found
    return rows


def scaled_statistics(rows: torch.Tensor, factor: float | None) -> torch.Tensor:
    """The rows of the gradients ``factor * g`` from those of ``g`` (``None``: 1), without making ``factor * g``::

        [n, S, S', C, P]  ->  [n, c S, c S', c^2 C, c^2 P]"""
    if factor is None:
        return rows
    c = torch.full((rows.shape[0],), float(factor), dtype=rows.dtype, device=rows.device)
    one = torch.ones_like(c)
    return rows * torch.stack((one, c, c, c * c, c * c), dim=1)


@torch.compiler.disable  # raw pointers into a ctypes call: always eager
def _native_statistics(grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Statistics rows, by index, of the contiguous float32 CPU gradients (one native call; the others absent)."""
    on_native = [i for i, g in enumerate(grads) if g.dtype == torch.float32 and g.is_contiguous() and g.numel() and native.readable(g)]
    if not (on_native and native.available()):
        return {}
    counts, sums = _native_sums([grads[i] for i in on_native])
    return dict(zip(on_native, _rows_from_sums(counts, sums)))


def _native_sums(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, sums)`` of contiguous float32 CPU gradients from one native call (``block_statistics_f32``, pieces of
    :data:`_CPU_ROW` entries): ``sums[:, 0] = S``, ``sums[:, 1] = C``."""
    sums = torch.empty((len(grads), 2), dtype=torch.float64)
    pointers = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    if native.library().call("block_statistics_f32", pointers.data_ptr(), numels.data_ptr(), len(grads), _CPU_ROW, sums.data_ptr()):
        raise MemoryError("sai_hf: the g-SNR statistics kernel could not allocate its piece buffer")
    return numels.to(torch.float64), sums


def _rows_from_sums(n: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``(B, STATISTICS_WIDTH)`` statistics rows of real blocks from their entry counts ``n`` and
    ``sums[:, 0] = S``, ``sums[:, 1] = C``."""
    total, centred = sums.unbind(1)
    zero = torch.zeros_like(n)
    return torch.stack((n, total, zero, centred, _mean_mass(total, zero, n)), dim=1)


#: Entries per piece of the native CPU reduction (``block_statistics_f32``).
_CPU_ROW = 1024
#: Elements per chunk of the float64 reduction (bounds its temporary to 64 MiB).
_SHIFTED_CHUNK = 1 << 23


def _shifted_statistics(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The statistics row of ``g`` accumulated in ``dtype`` (float64) from shifted data, chunk by chunk::

        K = mean(g);   D1 = sum(g - K);   D2 = sum |g - K|^2;   S = n K + D1;   C = D2 - |D1|^2 / n

    (exact for any ``K``; ``K`` near the mean makes ``D1`` tiny, so ``C`` is zero for a constant gradient)."""
    flat = g.reshape(-1)
    numel = flat.numel()
    n = torch.tensor(float(numel), dtype=dtype, device=g.device)
    wide = torch.complex128 if g.is_complex() else dtype
    d1 = torch.zeros((), dtype=wide, device=g.device)
    d2 = torch.zeros((), dtype=dtype, device=g.device)
    if numel == 0:
        return _row(n, d1, d2)
    shift = flat.sum(dtype=wide) / numel
    for chunk in flat.split(_SHIFTED_CHUNK):
        centred = chunk.to(wide) - shift
        d1 = d1 + centred.sum(dtype=wide)
        real = torch.view_as_real(centred) if centred.is_complex() else centred
        d2 = d2 + torch.linalg.vector_norm(real, dtype=dtype).square()
    total = shift * n + d1
    return _row(n, total, (d2 - d1.abs().square() / n).clamp_min(0))


def gsnr_from_statistics(
    stats: torch.Tensor, eps: float | torch.Tensor, eps_free: torch.Tensor | bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """g-SNR and :class:`BlockStatus` of each statistics row of ``stats``.

    Args:
        stats: ``(B, STATISTICS_WIDTH)`` statistics from :func:`gradient_statistics`, summed over each block's pieces.
        eps: the ``eps`` added to the std (a float, or a ``(B,)`` tensor of per-block values).
        eps_free: ``True`` (or a ``(B,)`` bool tensor) where the g-SNR is ``norm / std``, eps dropped (deferred
            blocks, :class:`sai_hf.SGDSaI`).

    Returns:
        ``(gsnr, status)``: float64 ``(B,)`` g-SNR (0 where not ``SCALED``) and int64 ``(B,)`` status.
    """
    n, sum_re, sum_im, centred, mean_mass = stats.unbind(-1)
    between = (mean_mass - _mean_mass(sum_re, sum_im, n)).clamp_min(0)
    m2 = centred + between
    sumsq = centred + mean_mass
    finite = torch.isfinite(stats).all(-1)
    nonzero = sumsq > 0
    std = (m2 / (n - 1).clamp_min(1)).sqrt()
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


def measure(
    stats: torch.Tensor, eps: Sequence[float], eps_free: Sequence[bool],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[float], list[BlockStatus]]:  # fmt: skip
    """:func:`gsnr_from_statistics` of the rows ``stats``, summed over the ranks by ``reduce`` first (the exact
    cross-rank sum of :mod:`sai_hf.sharding`; ``None``: whole blocks already), as host values (the one host sync of a
    scaling step). ``eps_free[i]`` drops block ``i``'s eps: ``gsnr = norm / std``."""
    if reduce is not None:
        stats = reduce(stats)
    eps_t = torch.tensor(list(eps), dtype=stats.dtype, device=stats.device)
    eps_free_t = torch.tensor(list(eps_free), dtype=torch.bool, device=stats.device)
    gsnr, status = gsnr_from_statistics(stats, eps_t, eps_free=eps_free_t)
    values, codes = torch.stack((gsnr, status.to(gsnr.dtype))).tolist()
    return values, [BlockStatus(int(c)) for c in codes]


@dataclass(frozen=True)
class AssignedScale:
    """A block's g-SNR (``basis_i`` under ``scale_rule="gsnr"``, the measured g-SNR under ``"sqrt_numel"``, 0 if
    degenerate there), its scale and its status."""

    gsnr: float
    scale: float
    status: BlockStatus


def scales(
    values: Sequence[float], statuses: Sequence[BlockStatus], numels: Sequence[int], gsnr_max: float | None,
    normalize: str, scale_rule: str, first_step: bool,
) -> tuple[float | None, list[AssignedScale | None]]:  # fmt: skip
    """``(gsnr_max, scales)``: the ``normalize="max"`` divisor and the scale of each measured block (``None`` where it
    stays ``PENDING``; equations in the module docstring). ``first_step``: this is the first scaling step, whose
    divisor is the largest of ``gsnr_max`` (of the step's earlier calls, a wrapper stepping one group a call) and this call's blocks'."""
    if first_step:
        if scale_rule == "sqrt_numel":
            known = [math.sqrt(n) for n, s in zip(numels, statuses) if s != BlockStatus.PENDING]
        else:
            known = [v for v, s in zip(values, statuses) if s == BlockStatus.SCALED]
        known += [gsnr_max] if gsnr_max is not None else []
        gsnr_max = max(known) if known else None
    out: list[AssignedScale | None] = []
    for value, status, numel in zip(values, statuses, numels):
        if status == BlockStatus.PENDING:
            out.append(None)
            continue
        if scale_rule != "sqrt_numel" and status == BlockStatus.DEGENERATE:
            value = gsnr_max if gsnr_max is not None else 1.0
        basis = math.sqrt(numel) if scale_rule == "sqrt_numel" else value
        scale = basis if normalize != "max" else (basis / gsnr_max if gsnr_max is not None else 1.0)
        out.append(AssignedScale(float(value), float(scale), status))
    return gsnr_max, out
