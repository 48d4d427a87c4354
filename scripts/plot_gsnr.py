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

from sai_hf.plots import plot_gsnr_bars, plot_gsnr_history


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a Trainer output_dir containing gsnr.json")
    parser.add_argument("--key", default="gsnr", choices=["gsnr", "scale", "gsnr_over_sqrt_numel"], help="what to plot per block")
    args = parser.parse_args(argv)
    report_path = args.run_dir / "gsnr.json"
    if not report_path.is_file():
        parser.error(f"no gsnr.json in {args.run_dir} (was the run trained with --optim sgd_sai?)")
    written = [plot_gsnr_bars(json.loads(report_path.read_text()), args.run_dir / f"{args.key}.png", key=args.key)]
    history_path = args.run_dir / "gsnr_history.json"
    if history_path.is_file():
        written.append(plot_gsnr_history(json.loads(history_path.read_text()), args.run_dir / "gsnr_history.png"))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
