"""An independent float64 reference of SGD-SaI, the oracle of ``tests/unit/test_properties.py`` and
``tests/unit/test_update_against_reference.py``.

Written from ``/work/shared/SPEC.md`` (Algorithm 1) and the public rules in the docstrings of
``sai_hf.SGDSaI`` / ``sai_hf.functional``; it imports nothing from ``sai_hf``. Every quantity is
kept in float64 (complex128 for complex blocks), whatever the dtype of the optimizer under test.

Equations (one block = one parameter tensor)::

    gsnr   = ||g|| / (std(g) + eps)        ||g||^2 = sum |g_j|^2,  std^2 = sum |g_j - mean|^2 / (n - 1)
    scale  = gsnr                          normalize="none"
    scale  = gsnr / gsnr_max               normalize="max"
    (scale_rule="sqrt_numel": sqrt(numel) in place of gsnr, and gsnr_max = max sqrt(numel) of the
    first scaling step; gsnr is still measured and stored, 0 for a degenerate block)
    g      = -g                            maximize
    m_1    = g_1;  m_t = mu m_{t-1} + (1 - mu) g_t        (mu = 0: m = g, no buffer)
    p      = p (1 - lr wd) - lr scale m

Documented rules encoded here:

* a block whose gradient is absent, empty (no entries), all zero or has a NaN/inf entry is
  *deferred*: no scale, and it is not touched (no decay, no momentum);
* the *first scaling step* is the first step at which any block gets a scale; ``gsnr_max`` is the
  largest well-defined g-SNR of the first scaling step that has one (``None`` until then);
* blocks scaled at a later step drop eps (``gsnr = ||g|| / std``);
* a *degenerate* block (one entry, or ``std <= 1e-6 * rms``) gets ``gsnr_max`` as its g-SNR, or 1.0
  when ``gsnr_max`` is ``None``; under normalize="max" the divisor is ``gsnr_max`` (1.0 if ``None``);
* a block whose gradient is absent at a step after it was scaled is skipped at that step (torch's
  rule for ``grad is None``); a zero gradient after scaling is an ordinary update.

Besides the values, the reference accumulates for every block the *magnitudes* of the terms that
entered its parameter and its momentum (sums of absolute values, decayed like the values). A
floating-point implementation of the same equations is within ``c * unit_roundoff * magnitude`` of
the exact result, so tests compare with ``rtol * magnitude`` rather than ``rtol * |value|`` (which
fails under cancellation). ``reanchor`` resets a block to given (rounded) values, for comparing
reduced-precision implementations step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: A gradient whose unbiased std is at most this fraction of its RMS has "no usable variance".
DEGENERATE_RELATIVE_STD = 1e-6

PENDING = "pending"
SCALED = "scaled"
DEGENERATE = "degenerate"


def wide(t: Tensor) -> Tensor:
    """A contiguous float64 (complex128 for complex) copy of ``t``."""
    dtype = torch.complex128 if t.is_complex() else torch.float64
    return t.detach().to(dtype=dtype, copy=True).contiguous()


def classify(grad: Tensor, eps: float) -> tuple[str, float | None]:
    """``(status, gsnr)`` of a first usable gradient; ``gsnr`` is ``None`` unless ``SCALED``."""
    g = wide(grad).reshape(-1)
    n = g.numel()
    if n == 0 or not bool(torch.isfinite(g).all()) or not bool(g.ne(0).any()):
        return PENDING, None
    square = g.abs().square()
    norm = math.sqrt(square.sum().item())
    if n == 1:
        return DEGENERATE, None
    centred = (g - g.mean()).abs().square()
    std = math.sqrt(centred.sum().item() / (n - 1))
    rms = norm / math.sqrt(n)
    if std <= DEGENERATE_RELATIVE_STD * rms:
        return DEGENERATE, None
    return SCALED, norm / (std + eps)


@dataclass
class Block:
    """The reference state of one parameter tensor."""

    param: Tensor
    group: dict
    status: str | None = None  # SCALED / DEGENERATE once scaled
    gsnr: float | None = None
    scale: float | None = None
    eps_free: bool = False
    buf: Tensor | None = None
    count: int = 0  # number of updates applied
    mag_p: Tensor = field(default=None)  # type: ignore[assignment]
    mag_m: Tensor = field(default=None)  # type: ignore[assignment]
    mag_step: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.param.shape, dtype=torch.float64)
        self.mag_p = zeros.clone() if self.mag_p is None else self.mag_p
        self.mag_m = zeros.clone() if self.mag_m is None else self.mag_m
        self.mag_step = zeros.clone() if self.mag_step is None else self.mag_step

    @property
    def touched(self) -> bool:
        return self.count > 0


GROUP_DEFAULTS = dict(lr=1e-3, momentum=0.9, weight_decay=0.0, eps=1e-8, maximize=False)


class ReferenceSGDSaI:
    """SGD-SaI in float64. ``groups``: dicts with ``params`` (initial values) and hyperparameters
    (``lr``, ``momentum``, ``weight_decay``, ``eps``, ``maximize``; missing ones take ``defaults``,
    then SGDSaI's documented defaults). Blocks are numbered in group order."""

    def __init__(self, groups: list[dict], normalize: str = "none", scale_rule: str = "gsnr", **defaults) -> None:
        if normalize not in ("none", "max") or scale_rule not in ("gsnr", "sqrt_numel"):
            raise ValueError((normalize, scale_rule))
        self.normalize = normalize
        self.scale_rule = scale_rule
        self.blocks: list[Block] = []
        for spec in groups:
            hyper = {k: spec.get(k, defaults.get(k, v)) for k, v in GROUP_DEFAULTS.items()}
            for p in spec["params"]:
                self.blocks.append(Block(param=wide(p), group=hyper))
        self.gsnr_max: float | None = None
        self.scaling_started = False
        self.degenerate_blocks: list[int] = []  # indices of blocks that were scaled as DEGENERATE

    # -------------------------------------------------------------- scales
    def _scale_pending(self, grads: list[Tensor | None]) -> None:
        first = not self.scaling_started
        new = []
        for i, (b, g) in enumerate(zip(self.blocks, grads)):
            if g is None or b.scale is not None:
                continue
            status, gsnr = classify(g, b.group["eps"] if first else 0.0)
            if status != PENDING:
                new.append((i, status, gsnr))
        if not new:
            return
        self.scaling_started = True
        sqrt_numel = self.scale_rule == "sqrt_numel"
        if self.gsnr_max is None:  # set at the first scaling step that has a well-defined g-SNR
            if sqrt_numel:
                well_defined = [math.sqrt(self.blocks[i].param.numel()) for i, _, _ in new]
            else:
                well_defined = [v for _, s, v in new if s == SCALED]
            self.gsnr_max = max(well_defined) if well_defined else None
        divisor = self.gsnr_max if self.gsnr_max is not None else 1.0
        for i, status, gsnr in new:
            b = self.blocks[i]
            if sqrt_numel:
                gsnr = gsnr if status == SCALED else 0.0
                basis = math.sqrt(b.param.numel())
            else:
                if status == DEGENERATE:
                    gsnr = divisor
                    self.degenerate_blocks.append(i)
                basis = gsnr
            b.status, b.gsnr, b.eps_free = status, gsnr, not first
            b.scale = basis / divisor if self.normalize == "max" else basis

    # -------------------------------------------------------------- update
    def step(self, grads: list[Tensor | None]) -> None:
        """One optimizer step with these gradients (``None``: absent), in block order."""
        if len(grads) != len(self.blocks):
            raise ValueError("one gradient (or None) per block")
        self._scale_pending(grads)
        for b, g in zip(self.blocks, grads):
            if g is None or b.scale is None:
                continue
            self._update(b, wide(g))

    @staticmethod
    def _update(b: Block, g: Tensor) -> None:
        h = b.group
        lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
        if h["maximize"]:
            g = -g
        decay = 1.0 - lr * wd
        size = lr * b.scale
        if mu != 0:
            if b.buf is None:
                m = g.clone()
                mag_m = g.abs()
            else:
                prev = b.buf
                m = mu * prev + (1.0 - mu) * g
                mag_m = mu * b.mag_m + (mu * prev).abs() + ((1.0 - mu) * g).abs() + m.abs()
            b.buf = m
        else:
            m = g
            mag_m = torch.zeros(g.shape, dtype=torch.float64)
        decayed = decay * b.param
        new = decayed - size * m
        b.mag_p = decay * b.mag_p + decayed.abs() + size * m.abs() + size * mag_m + new.abs()
        b.mag_step = decay * b.mag_step + size * m.abs()
        b.mag_m = mag_m
        b.param = new
        b.count += 1

    def reanchor(self, index: int, param: Tensor, buf: Tensor | None) -> None:
        """Continue block ``index`` from these (rounded) values instead of its own."""
        b = self.blocks[index]
        b.param = wide(param)
        b.mag_p.zero_()
        b.mag_step.zero_()
        if buf is not None and b.buf is not None:
            b.buf = wide(buf)
            b.mag_m.zero_()
