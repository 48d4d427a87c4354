"""The learning-rate range test's arithmetic, pure Python: the exponential ramp (:func:`ramp_lr`), fastai's smoothed
loss (:class:`Smoother`), the stop rule (:func:`diverged`) and the suggestion (:func:`suggest`,
:func:`rose_from_the_start`). :mod:`sai_hf.range_test` runs the test."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["METHODS", "DEFAULT_METHOD", "NoDecreaseError", "smoothed_noise", "Smoother", "Suggestion", "diverged",
           "ramp_lr", "suggest", "rose_from_the_start"]  # fmt: skip

#: ``--method`` choices (see :func:`suggest`).
METHODS = ("steepest_capped", "steepest", "min_div_10", "valley")
DEFAULT_METHOD = "steepest_capped"

#: Without the raw losses: the smoothed loss must fall at least this fraction below its start.
MIN_RELATIVE_DECREASE = 0.01
#: With the raw losses: the fall must exceed this many standard deviations of the smoothed loss's noise.
NOISE_FACTOR = 3.0


class NoDecreaseError(ValueError):
    """The loss never decreased over the range: there is no learning rate to suggest."""


def ramp_lr(i: int, start: float, end: float, steps: int) -> float:
    """Step ``i`` (0-based) of the ramp ``start * (end / start) ** (i / (steps - 1))`` (rising past ``steps - 1``)."""
    if steps <= 1:
        return start
    return start * (end / start) ** (i / (steps - 1))


class Smoother:
    """fastai's ``SmoothenValue``: ``avg = beta * avg + (1 - beta) * loss``, returned as ``avg / (1 - beta ** n)``."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"the smoothing factor must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.n = 0
        self.avg = 0.0

    def add(self, loss: float) -> float:
        """Add one loss; return the smoothed value (``nan`` once a loss is not finite)."""
        self.n += 1
        self.avg = self.beta * self.avg + (1.0 - self.beta) * loss
        return self.avg / (1.0 - self.beta**self.n)


def diverged(loss: float, smoothed: float, best: float, factor: float) -> str | None:
    """Why the range test should stop here, or ``None``: a loss that is not finite, or a smoothed
    loss above ``factor`` times the best smoothed loss so far (fastai's rule, factor 4)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(smoothed):
        return f"the smoothed loss is {smoothed}"
    if math.isfinite(best) and best > 0 and smoothed > factor * best:
        return f"the smoothed loss {smoothed:.4g} exceeds {factor:g}x its best {best:.4g}"
    return None


@dataclass
class Suggestion:
    """A suggested learning rate, the rule that chose it, and every rule's value (for comparison)."""

    lr: float
    method: str
    index: int
    candidates: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _finite_prefix(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = list(itertools.takewhile(lambda pair: pair[1] is not None and math.isfinite(pair[1]), zip(lrs, smoothed)))
    return [float(lr) for lr, _ in pairs], [float(s) for _, s in pairs]


def _steepest(logs: list[float], ys: list[float], lo: int, hi: int) -> int:
    """Index in ``[lo, hi]`` where the smoothed loss falls fastest against log(lr) (central differences)."""
    best, where = math.inf, lo
    for i in range(max(lo, 1), min(hi, len(ys) - 2) + 1):
        slope = (ys[i + 1] - ys[i - 1]) / (logs[i + 1] - logs[i - 1])
        if slope < best:
            best, where = slope, i
    return where


def _valley(ys: list[float]) -> int:
    """fastai's ``valley`` (2.7): the longest decreasing subsequence of the curve, and the point half
    way along it (``start + sections + sections / 2`` with ``sections`` a third of its span)."""
    n = len(ys)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if ys[i] < ys[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return min(max(max_start + int(sections) + int(sections / 2), 0), n - 1)


def smoothed_noise(losses: Sequence[float | None], beta: float, upto: int) -> float:
    """Standard deviation of the smoothed loss's noise: the batch-to-batch noise of the raw loss
    (successive differences over the first ``upto + 1`` points, over sqrt 2) times the EMA's
    stationary factor ``sqrt((1 - beta) / (1 + beta))``."""
    raw = [float(x) for x in losses[: upto + 1] if x is not None and math.isfinite(x)]
    if len(raw) < 3:
        return 0.0
    diffs = [b - a for a, b in zip(raw, raw[1:])]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)) / math.sqrt(2.0)
    return sd * math.sqrt((1.0 - beta) / (1.0 + beta))


def suggest(
    lrs: Sequence[float],
    smoothed: Sequence[float],
    method: str = DEFAULT_METHOD,
    skip_start: int = 5,
    losses: Sequence[float | None] | None = None,
    beta: float | None = None,
) -> Suggestion:
    """The suggested learning rate of a range test (``lrs[i]`` the rate of step ``i``, ``smoothed[i]``
    its smoothed loss; the points after the first non-finite one are ignored).

    Rules (``method``):

    * ``"steepest_capped"`` (default): ``"steepest"``, at most half the rate of the lowest smoothed loss. The
      steepest fall alone sits at the edge where the loss keeps falling until it blows up (SGD-SaI), half the
      lowest point alone is too high with a long flat bottom (AdamW).
    * ``"steepest"``: where the smoothed loss falls fastest against log(lr), between the first
      ``skip_start`` points and the minimum (fastai's ``steep``, Lightning's suggestion).
    * ``"min_div_10"``: a tenth of the learning rate at the minimum of the smoothed loss (fastai's
      ``minimum``/10).
    * ``"valley"``: fastai's default: half way along the longest decreasing stretch.

    Every rule's value is in :attr:`Suggestion.candidates`. ``NoDecreaseError`` if the loss did not clearly fall:
    with ``losses`` and ``beta``, its fall from its highest point before its lowest must exceed :data:`NOISE_FACTOR`
    times its noise (:func:`smoothed_noise`); without, the lowest point must lie :data:`MIN_RELATIVE_DECREASE` below
    point ``skip_start - 1``. The first ``skip_start`` points only settle the average: never "the lowest".
    """
    if method not in METHODS:
        raise ValueError(f"unknown suggestion method {method!r}; choose one of {', '.join(METHODS)}")
    xs, ys = _finite_prefix(lrs, smoothed)
    if len(xs) < 3:
        raise NoDecreaseError(
            f"only {len(xs)} finite loss value(s) were recorded: the loss diverged at once "
            f"(lower --start-lr, now {lrs[0]:.3g})" if lrs else "no loss was recorded"
        )
    # the first `skip_start` points only settle the average (one noisy batch must not be "the lowest loss")
    start = skip_start if len(ys) > skip_start + 2 else 0
    low = min(range(start, len(ys)), key=lambda i: ys[i])
    first = ys[max(start - 1, 0)]
    if losses is not None and beta is not None:
        top = max(ys[max(start - 1, 0) : low + 1])
        noise = smoothed_noise(losses, beta, low)
        fell = top - ys[low] > max(NOISE_FACTOR * noise, 1e-3 * abs(ys[low]))
        first, needed = top, f"{NOISE_FACTOR:g}x its noise ({noise:.3g})"
    else:
        fell = ys[low] < first - MIN_RELATIVE_DECREASE * abs(first)
        needed = f"{MIN_RELATIVE_DECREASE:.0%}"
    if not fell:
        hint = (
            "the loss moved less than its batch-to-batch noise before it diverged: spend more steps below the "
            "divergence (a higher --start-lr, more --steps)" if len(xs) < len(lrs) or ys[-1] > first
            else "raise --end-lr or --steps"
        )  # fmt: skip
        raise NoDecreaseError(
            f"the smoothed loss never fell more than {needed} between lr {xs[0]:.3g} and "
            f"{xs[-1]:.3g} (from {first:.4g}, lowest {ys[low]:.4g}): {hint}; or check that the script trains at "
            "all (labels, frozen parameters)"
        )
    logs = [math.log(x) for x in xs]
    steep = _steepest(logs, ys, min(skip_start, max(low - 1, 0)), max(low - 1, 1))
    valley = _valley(ys)
    min_lr = xs[low]
    capped = min(xs[steep], min_lr / 2.0)
    candidates = {
        "steepest_capped": capped, "steepest": xs[steep], "min_div_10": min_lr / 10.0, "valley": xs[valley],
        "loss_min": min_lr,
    }  # fmt: skip
    index = {"steepest_capped": steep if xs[steep] <= min_lr / 2.0 else low, "min_div_10": low, "steepest": steep,
             "valley": valley}[method]  # fmt: skip
    warnings = []
    if low >= len(ys) - 3 and len(xs) == len(lrs):
        warnings.append(
            f"the loss was still falling at the end of the range (lr {xs[-1]:.3g}): the range may end too early; "
            "raise --end-lr"
        )
    if low <= start + 1:
        warnings.append(
            f"the loss was lowest near the start of the range (lr {min_lr:.3g}): lower --start-lr"
        )
    return Suggestion(lr=candidates[method], method=method, index=index, candidates=candidates, warnings=warnings)


def rose_from_the_start(lrs: Sequence[float], smoothed: Sequence[float | None], stop_reason: str) -> str | None:
    """The error for a test whose loss rose from the first rate on, or ``None``: the advice is a lower ``--start-lr``
    (:func:`suggest` asks for a higher one, after a flat stretch). "Rose": the smoothed loss went up at every step of
    the first half, then diverged or ended 10% above its first value (a flat, noisy loss goes up and down)."""
    _, ys = _finite_prefix(lrs, smoothed)  # type: ignore[arg-type]
    half = len(ys) // 2 + 1
    if len(ys) < 3 or any(b <= a for a, b in zip(ys[:half], ys[1:half])):
        return None
    diverged_now = stop_reason.startswith("diverged")
    if not diverged_now and ys[-1] <= 1.1 * ys[0]:
        return None
    start = lrs[0]
    end = stop_reason if diverged_now else f"rose to {ys[-1]:.4g} by lr {lrs[len(ys) - 1]:.3g}"
    return (
        f"the loss rose from the first rate on (smoothed {ys[0]:.4g} at lr {start:.3g}, its lowest) and {end}: the ramp "
        f"starts where this model already diverges: a lower --start-lr (now {start:.3g}; e.g. {start / 100:.3g})"
    )
