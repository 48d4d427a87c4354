"""scripts/width_transfer.py: grids are extended until their best is bracketed, the best is refined
correctly, and the summary says which rule keeps its best lr within 2x across widths.

The sweeps run a stand-in for ``compare_optimizers.py`` (a script writing a ``compare.json`` whose
final losses are a known function of the learning rate), so the extension loop and the summary are
tested end to end in seconds; the real comparison is tested in ``test_compare.py``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from _scripts import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "width_transfer.py"

#: A stand-in for compare_optimizers.py: reads --grid and --n_embd, writes compare.json with
#: final eval loss (log(lr) - log(best))^2 + 5, best = 0.3 / width for every rule but the max one,
#: whose best is 0.07 whatever the width (it "transfers"), and AdamW whose loss is NaN above 0.01.
FAKE_COMPARE = r"""
import json, math, sys
from pathlib import Path
args = sys.argv[1:]
grids = [a for i, a in enumerate(args) if i and args[i - 1] == "--grid"]
width = int(args[args.index("--n_embd") + 1])
out = Path(args[args.index("--out_dir") + 1])
rows = []
for grid in grids:
    optim, lrs = grid.split("=")
    best = 0.07 if optim == "sgd_sai_max" else 0.3 / width
    for lr in map(float, lrs.split(",")):
        loss = (math.log(lr) - math.log(best)) ** 2 + 5
        if optim == "adamw_torch_fused" and lr > 0.01:
            loss = float("nan")
        rows.append({"optim": optim, "learning_rate": lr, "final_eval_loss": loss})
out.mkdir(parents=True, exist_ok=True)
provenance = {"date": "2026-12-02", "commit": "abcdef0", "machine": "test", "torch": "x", "gpu": None}
(out / "compare.json").write_text(json.dumps({"rows": rows, "provenance": provenance}))
with open(out / "calls.txt", "a") as fh:
    fh.write(" ".join(grids) + "\n")
"""


def _module():
    return load_module(SCRIPT)


def test_ladder_steps_are_the_1_2_5_series():
    wt = _module()
    assert [wt.ladder_neighbour(x, up=True) for x in (1e-3, 2e-3, 5e-3, 10.0)] == [2e-3, 5e-3, 1e-2, 20.0]
    assert [wt.ladder_neighbour(x, up=False) for x in (1e-3, 2e-3, 5e-3, 1.0)] == [5e-4, 1e-3, 2e-3, 0.5]


def test_vertex_recovers_the_minimum_of_a_parabola_in_log_lr():
    wt = _module()
    best = 3.7e-3
    losses = {lr: 2.0 * (math.log(lr) - math.log(best)) ** 2 + 5 for lr in (1e-3, 2e-3, 5e-3, 1e-2)}
    assert wt.vertex(losses) == pytest.approx(best, rel=1e-9)
    # at an edge, or beside a diverged run, the grid's best is kept
    assert wt.vertex({1e-3: 5.0, 2e-3: 5.5}) == 1e-3
    assert wt.vertex({1e-3: 5.5, 2e-3: 5.0, 5e-3: math.inf}) == 2e-3
    # the vertex never leaves the best's neighbours
    assert 1e-3 <= wt.vertex({1e-3: 5.01, 2e-3: 5.0, 5e-3: 9.0}) <= 5e-3


def test_sweeps_extend_grids_until_the_best_is_bracketed_and_the_summary_judges_transfer(tmp_path, monkeypatch):
    wt = _module()
    fake = tmp_path / "fake_compare.py"
    fake.write_text(FAKE_COMPARE)
    real = wt.compare_command

    def command(width, grids, out_dir, args):
        return [sys.executable, str(fake), *real(width, grids, out_dir, args)[2:]]

    monkeypatch.setattr(wt, "compare_command", command)
    out = tmp_path / "out"
    summary = wt.main(["--widths", "16,64", "--jobs", "2", "--out_dir", str(out), "--max_extensions", "6"])
    rules = summary["rules"]
    for width in (16, 64):
        for rule in ("sgd_sai", "sgd_sai_sqrt_numel"):
            entry = rules[rule]["widths"][str(width)]
            assert entry["bracketed"], (rule, width, entry)
            assert entry["refined_best"] == pytest.approx(0.3 / width, rel=1e-6)
    assert rules["sgd_sai"]["spread"] == pytest.approx(4.0, rel=1e-6) and not rules["sgd_sai"]["transfers"]
    assert rules["sgd_sai"]["exponent"] == pytest.approx(-1.0, abs=1e-6)  # best = 0.3 / width
    assert rules["sgd_sai_max"]["transfers"] and rules["sgd_sai_max"]["spread"] == pytest.approx(1.0, rel=1e-6)
    # width 16, sgd_sai: best 0.019 is above the start grid (1e-3 .. 5e-3): 1e-2, 2e-2, then 5e-2 were added
    calls = (out / "w16" / "calls.txt").read_text().splitlines()
    assert "sgd_sai=0.001,0.002,0.005,0.01,0.02,0.05" in calls[-1]  # 3 extensions
    # a NaN loss counts as the worst: AdamW's best stays bracketed below the NaN runs
    assert rules["adamw_torch_fused"]["widths"]["16"]["bracketed"]
    written = json.loads((out / "width_transfer.json").read_text())
    assert written["provenance"]["16"]["commit"] == "abcdef0" and written["recipe_args"] == ["--block_size", "64"]
    assert (out / "width_transfer.png").stat().st_size > 0
    # --no-run summarises the same runs without running anything
    again = wt.main(["--widths", "16,64", "--out_dir", str(out), "--no-run"])
    assert again["rules"] == summary["rules"]
    assert len((out / "w16" / "calls.txt").read_text().splitlines()) == len(calls)


def test_one_width_and_an_exhausted_extension_budget(tmp_path, monkeypatch):
    """One width has no fit (exponent None) and still summarises; with no extensions left the grid is
    reported as it ran, its best on the edge, and nothing unrun is added."""
    wt = _module()
    fake = tmp_path / "fake_compare.py"
    fake.write_text(FAKE_COMPARE)
    real = wt.compare_command
    monkeypatch.setattr(wt, "compare_command", lambda *a: [sys.executable, str(fake), *real(*a)[2:]])
    out = tmp_path / "out"
    summary = wt.main(["--widths", "16", "--rules", "sgd_sai", "--out_dir", str(out), "--max_extensions", "0"])
    entry = summary["rules"]["sgd_sai"]
    assert entry["exponent"] is None and entry["spread"] == 1.0
    assert not entry["widths"]["16"]["bracketed"] and entry["widths"]["16"]["grid_best"] == 5e-3
    assert (out / "w16" / "calls.txt").read_text().splitlines() == ["sgd_sai=0.001,0.002,0.005"]


def test_bad_arguments_are_refused_naming_them(tmp_path, capsys):
    wt = _module()
    for argv, named in (
        (["--rules", "sgd_sai,lion"], "lion"),
        (["--widths", "64,wide"], "'64,wide'"),
        (["--widths", "0"], "--widths"),
        (["--no-run", "--widths", "64", "--out_dir", str(tmp_path)], str(tmp_path / "w64" / "compare.json")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            wt.main(argv)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err, argv
    (tmp_path / "w64").mkdir()
    (tmp_path / "w64" / "compare.json").write_text(json.dumps({"rows": [], "provenance": {}}))
    with pytest.raises(SystemExit):
        wt.main(["--no-run", "--widths", "64", "--out_dir", str(tmp_path)])
    assert "no runs of sgd_sai" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--widths", "64,66"], "--widths: 66 is not divisible by n_head=4"),  # the config's n_head
        (["--widths", "64", "--n_head", "3"], "--widths: 64 is not divisible by n_head=3"),  # a pass-through --n_head
        (["--widths", "64", "--n_head=four"], "n_head 'four'"),
        (["--max_steps", "0"], "--max_steps 0"),  # HF would train by epochs
        (["--max_steps", "-5"], "--max_steps -5"),
        (["--max_extensions", "-1"], "--max_extensions -1"),
        (["--config", "no-such.yaml"], "--config no-such.yaml: no such file"),
        # a pass-through flag compare_optimizers.py (or the recipe) refuses: checked as it will, before any sweep
        (["--widths", "64", "--learnig_rate", "1"], "width 64: unknown config key in the command line: 'learnig_rate'"),
        (["--widths", "64", "--seed", "3"], "width 64: --seed is set by the sweep for every run"),
    ],
)
def test_arguments_a_run_would_fail_on_are_refused_before_any_sweep(tmp_path, capsys, monkeypatch, argv, named):
    """A width the heads do not divide, a step count that is not positive (HF then trains by epochs), a
    negative extension budget and a refused pass-through flag are one error line naming them (exit 2)
    before any sweep or directory; they used to start the sweep (and fail in it, or run something else)."""
    wt = _module()
    monkeypatch.setattr(wt, "sweep_width", lambda *a: pytest.fail("a sweep started"))
    with pytest.raises(SystemExit) as exit_info:
        wt.main([*argv, "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
