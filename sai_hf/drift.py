"""g-SNR drift: is a block's g-SNR at step 1 still representative later in training? (scripts/README.md, "g-SNR
drift"). :func:`drift_summary` compares two measurements, :class:`DriftHistory` is the file they go to
(``gsnr_history.json``), :func:`checked_track_every` and :func:`track_every_from_env` say how often they are taken.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "rank", "spearman", "drift_summary", "TRACK_EVERY_ENV", "checked_track_every", "track_every_from_env", "DriftHistory",
    "write_json",
]  # fmt: skip


def rank(values: Sequence[float]) -> list[float]:
    """Ranks (1-based) with ties sharing their average rank."""
    ranks, start = [0.0] * len(values), 0
    for _, tied in itertools.groupby(sorted(range(len(values)), key=lambda i: values[i]), key=lambda i: values[i]):
        tied = list(tied)
        for i in tied:
            ranks[i] = start + (len(tied) + 1) / 2
        start += len(tied)
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
    """``spearman`` (rank correlation), ``max_ratio`` and ``median_ratio`` (of ``max(c / r, r / c)`` per block with
    positive values) of ``current`` against ``reference``."""
    ratios = [max(c / r, r / c) for r, c in zip(reference, current) if r > 0 and c > 0]
    return {
        "spearman": spearman(reference, current),
        "max_ratio": max(ratios, default=math.nan),
        "median_ratio": statistics.median(ratios) if ratios else math.nan,
    }


#: Environment variable giving ``track_every`` to callbacks created without one (the automatic one).
TRACK_EVERY_ENV = "SAI_HF_GSNR_TRACK_EVERY"


def checked_track_every(value: Any, name: str = "track_every") -> int:
    """``value`` if it is a valid drift-tracking interval (a whole number >= 0; 0 is off), else ``ValueError`` naming ``name``."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(f"Invalid {name}={value!r}: must be a whole number of optimizer steps >= 0 (0 disables drift tracking)")
    if index < 0:
        raise ValueError(f"Invalid {name}={index}: must be >= 0 (0 disables drift tracking)")
    return index


def track_every_from_env() -> int:
    """``$SAI_HF_GSNR_TRACK_EVERY`` as a drift-tracking interval (unset or blank: 0, off); ``ValueError`` naming the
    variable and its value unless it is a whole number >= 0."""
    text = os.environ.get(TRACK_EVERY_ENV, "")
    try:
        value = int(text) if text.strip() else 0
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"Invalid environment variable {TRACK_EVERY_ENV}={text!r}: expected a whole number of optimizer steps >= 0 "
            "(0 or unset: no g-SNR drift tracking)"
        )
    return value


class DriftHistory:
    """The g-SNR of every scaled block at its scaling (step 1) and at each tracking step, as its file holds it::

        {"steps": [1, N, 2N, ...], "blocks": {"<name>": [gsnr at scaling, at N, at 2N, ...]}}

    ``NaN`` marks a block without a usable gradient at a step (or not yet scaled then)."""

    def __init__(self, steps: list[int], blocks: dict[str, list[float]]) -> None:
        self.steps = steps
        self.blocks = blocks

    @classmethod
    def started(cls, scaled_gsnr: Mapping[str, float]) -> DriftHistory:
        """A history holding only the g-SNR every scaled block was scaled with (as step 1)."""
        return cls([1], {name: [gsnr] for name, gsnr in scaled_gsnr.items()})

    @classmethod
    def load(cls, path: str, upto_step: int) -> DriftHistory:
        """The history file at ``path``, cut to its steps ``<= upto_step``; ``ValueError`` saying what is wrong."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as err:
            raise ValueError(f"cannot read it: {err.strerror or err}") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"not JSON: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not isinstance(data.get("blocks"), dict):
            raise ValueError('expected {"steps": [...], "blocks": {...}}')
        steps = data["steps"]
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps) or steps != sorted(set(steps)):
            raise ValueError("'steps' is not an increasing list of step numbers")
        keep = sum(1 for s in steps if s <= upto_step)
        if keep == 0:
            raise ValueError(f"no entry at or before step {upto_step}")
        blocks: dict[str, list[float]] = {}
        for name, series in data["blocks"].items():
            if not isinstance(series, list) or len(series) > len(steps):
                raise ValueError(f"block {name!r} does not hold one value per step")
            values = [math.nan if v is None else v for v in series[:keep]]
            bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
            if bad is not None:
                raise ValueError(f"block {name!r} holds a non-number {bad!r}")
            blocks[str(name)] = [float(v) for v in values] + [math.nan] * (keep - len(values))
        return cls(steps[:keep], blocks)

    @classmethod
    def resumed(cls, path: str, copies: Sequence[str], step: int, scaled_gsnr: Mapping[str, float]) -> DriftHistory:
        """The history to append to after resuming at ``step``: the file at ``path``, else the first readable one of
        ``copies`` (the checkpoints'), else :meth:`started`, with a warning. An unreadable ``path`` is kept as
        ``<path>.corrupt``."""
        problem, corrupt = f"{path} does not exist", False
        if os.path.exists(path):
            try:
                return cls.load(path, step)
            except ValueError as err:
                corrupt, aside = True, f"{path}.corrupt"
                try:
                    os.replace(path, aside)
                    problem = f"{path} is unreadable ({err}; kept as {aside})"
                except OSError:
                    problem = f"{path} is unreadable ({err})"
        for copy in copies:
            if not os.path.isfile(copy):
                continue
            try:
                history = cls.load(copy, step)
            except ValueError:
                continue
            if corrupt:
                warnings.warn(f"GSNRCallback: {problem}; continuing the g-SNR history from {os.path.dirname(copy)}", stacklevel=2)
            return history
        warnings.warn(
            f"GSNRCallback: resuming at step {step} but {problem} and the checkpoint holds no copy: the g-SNR "
            f"drift history restarts from the g-SNR the scales came from; measurements before step {step} are "
            "not in it",
            stacklevel=2,
        )
        return cls.started(scaled_gsnr)

    def append(self, step: int, scaled_gsnr: Mapping[str, float], measured: Mapping[str, float]) -> None:
        """Add ``step``: ``measured`` g-SNR by block name, ``NaN`` for the other blocks; a block scaled since the last
        step starts with the g-SNR it was scaled with (``scaled_gsnr``), ``NaN`` at the steps between."""
        self.steps.append(step)
        width = len(self.steps)
        for name, gsnr in scaled_gsnr.items():
            self.blocks.setdefault(name, [gsnr])
        for name, series in self.blocks.items():
            series.extend([math.nan] * (width - 1 - len(series)))
            del series[width - 1 :]
            series.append(measured.get(name, math.nan))

    def save(self, path: str) -> None:
        write_json(path, {"steps": self.steps, "blocks": self.blocks})


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (NaN written as ``NaN``): the history, and the callback's report."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(f"{path}.tmp", path)
