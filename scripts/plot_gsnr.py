#!/usr/bin/env python
"""Render a run's g-SNR: ``python scripts/plot_gsnr.py OUTPUT_DIR``.

Writes ``gsnr.png`` (per-block bar chart of ``gsnr.json``, log scale, grouped by layer type; ``--key
gsnr_over_sqrt_numel`` shows how far each block's g-SNR is from sqrt(numel), ``--key scale`` the
scales) and,
when the run tracked drift (``GSNRCallback(track_every=N)`` / recipe flag ``--gsnr_track_every N``),
``gsnr_history.png`` (g-SNR per block over training) next to the JSON files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sai_hf.plots import plot_gsnr_bars, plot_gsnr_history


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a Trainer output_dir containing gsnr.json")
    parser.add_argument("--key", default="gsnr", choices=["gsnr", "scale", "gsnr_over_sqrt_numel"], help="what to plot per block")
    args = parser.parse_args(argv)
    report_path = args.run_dir / "gsnr.json"
    if not report_path.is_file():
        parser.error(f"no gsnr.json in {args.run_dir} (was the run trained with --optim sgd_sai?)")
    report = _read(parser, report_path)
    problem = report_problem(report, args.key)
    if problem:
        parser.error(f"{report_path} is not a g-SNR report: {problem}")
    written = [plot_gsnr_bars(report, args.run_dir / f"{args.key}.png", key=args.key)]
    history_path = args.run_dir / "gsnr_history.json"
    if history_path.is_file():
        history = _read(parser, history_path)
        problem = history_problem(history)
        if problem:
            parser.error(f"{history_path} is not a g-SNR history: {problem}")
        written.append(plot_gsnr_history(history, args.run_dir / "gsnr_history.png"))
    for path in written:
        print(f"wrote {path}")
    return written


def report_problem(report: Any, key: str) -> str | None:
    """What makes ``report`` (a decoded ``gsnr.json``) unplottable by ``key``, or ``None``: it must be a
    non-empty mapping of block name -> mapping whose ``key`` is a number."""
    if not isinstance(report, dict) or not report:
        return "expected a non-empty mapping of block name -> values"
    for name, entry in report.items():
        if not isinstance(entry, dict) or key not in entry:
            return f"block {name!r} has no {key!r}"
        if not _is_number(entry[key]):
            return f"block {name!r} has {key!r} = {entry[key]!r}, not a number"
    return None


def history_problem(history: Any) -> str | None:
    """What makes ``history`` (a decoded ``gsnr_history.json``) unplottable, or ``None``: ``steps`` a list
    of numbers, ``blocks`` a mapping of block name -> one number per step."""
    if not isinstance(history, dict) or not isinstance(history.get("steps"), list) or not isinstance(history.get("blocks"), dict):
        return "expected a mapping with 'steps' (a list) and 'blocks' (a mapping)"
    steps = history["steps"]
    if not steps or not all(_is_number(step) for step in steps):
        return f"'steps' = {steps!r:.80} is not a non-empty list of numbers"
    for name, series in history["blocks"].items():
        if not isinstance(series, list) or len(series) != len(steps) or not all(_is_number(v) for v in series):
            return f"block {name!r} has {series!r:.80}, not {len(steps)} numbers (one per step)"
    return None


def _is_number(value: Any) -> bool:
    """A JSON number (``NaN`` and ``Infinity`` included: an undefined g-SNR); not a bool, string or null."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read(parser: argparse.ArgumentParser, path: Path) -> Any:
    """The JSON in ``path``; a parser error naming the file if it cannot be read or decoded (e.g. a
    run stopped while writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        parser.error(f"cannot read {path}: {err} (truncated? the run may have stopped while writing it)")


if __name__ == "__main__":
    main(sys.argv[1:])
