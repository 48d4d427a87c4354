"""g-SNR drift: is a block's g-SNR at step 1 still representative later in training?

Given the step-1 g-SNR (``reference``) and a later measurement (``current``) of the same blocks, :func:`drift_summary`
reports ``spearman`` (rank correlation: 1 = same ordering; NaN when either side is all ties), ``max_ratio`` (the worst
block's ``max(current/reference, reference/current)``) and ``median_ratio``. How to read them: scripts/README.md, "g-SNR drift".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["rank", "spearman", "drift_summary"]


def rank(values: Sequence[float]) -> list[float]:
    """Ranks (1-based) with ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of ``a`` and ``b`` (Pearson correlation of their ranks); NaN when
    every value of ``a`` or of ``b`` is tied (no ordering: the correlation is undefined, not 1)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return 1.0
    ra, rb = rank(a), rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else float("nan")


def drift_summary(reference: Sequence[float], current: Sequence[float]) -> dict[str, float]:
    """``spearman``, ``max_ratio`` and ``median_ratio`` of ``current`` against ``reference``
    (blocks with a non-positive value on either side are left out of the ratios)."""
    ratios = sorted(max(c / r, r / c) for r, c in zip(reference, current) if r > 0 and c > 0)
    mid = len(ratios) // 2
    median = (ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2) if ratios else float("nan")
    return {
        "spearman": spearman(reference, current),
        "max_ratio": ratios[-1] if ratios else float("nan"),
        "median_ratio": median,
    }
