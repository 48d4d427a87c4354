"""scripts/compare_optimizers.py --quick: every run lands in the table, JSON and plots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_optimizers.py"


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_optimizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_overrides_are_validated():
    compare = _compare_module()
    grids = compare.parse_grid(["sgd_sai=1e-4,1e-3"], ["sgd_sai", "sgd"])
    assert grids == {"sgd_sai": [1e-4, 1e-3], "sgd": compare.DEFAULT_GRIDS["sgd"]}
    with pytest.raises(ValueError, match="adamw"):
        compare.parse_grid(["adamw=1e-3"], ["sgd_sai"])
    with pytest.raises(ValueError, match="sgd_sai=fast"):
        compare.parse_grid(["sgd_sai=fast"], ["sgd_sai"])


@pytest.mark.slow
def test_quick_comparison_produces_table_json_and_plots(tmp_path, capsys):
    compare = _compare_module()
    # adam_mini rejects the config's optim_args (momentum=0.9, meant for sgd_sai): they must not reach it
    argv = ["--quick", "--optimizers", "sgd_sai,adamw_torch_fused,adam_mini", "--grid", "adam_mini=1e-3"]
    report = compare.main([*argv, "--out_dir", str(tmp_path)])
    rows = report["rows"]
    assert {(r["optim"], r["learning_rate"]) for r in rows} == {
        ("sgd_sai", 3e-4), ("sgd_sai", 1e-2), ("adamw_torch_fused", 3e-4), ("adamw_torch_fused", 3e-3),
        ("adam_mini", 1e-3),
    }
    for row in rows:
        assert math.isfinite(row["final_eval_loss"]) and row["tokens_per_second"] > 0
    by_optim = {r["optim"]: r for r in rows}
    assert by_optim["sgd_sai"]["state_over_params"] == pytest.approx(1.0)
    assert by_optim["adamw_torch_fused"]["state_over_params"] >= 2.0  # exp_avg + exp_avg_sq (+ step)
    # g-SNR drift is tracked for sgd_sai only (every 12 // 4 = 3 steps of the quick run)
    assert report["gsnr_track_every"] == 3
    assert all(r["drift_step"] == 12 and -1.0 <= r["drift_spearman"] <= 1.0 for r in rows if r["optim"] == "sgd_sai")
    assert all("drift_spearman" not in r for r in rows if r["optim"] != "sgd_sai")
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["runs"]) == 5 and all(run["log_history"] for run in saved["runs"])
    assert "| sgd_sai" in (tmp_path / "compare.md").read_text()
    for png in ("loss_curves.png", "lr_sensitivity.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert "(best)" in capsys.readouterr().out
    again = compare.main([*argv, "--grid", "sgd_sai=3e-4", "--out_dir", str(tmp_path), "--resume"])
    assert len(again["runs"]) == 4 and capsys.readouterr().out.count("reusing") == 4  # nothing re-ran
    assert again["runs"][0]["log_history"] == saved["runs"][0]["log_history"]


def test_config_optim_args_stay_with_sgd_sai():
    compare = _compare_module()
    assert compare.optim_overrides("sgd_sai") == []
    assert compare.optim_overrides("sgd") == ["--optim_args", "momentum=0.9"]
    assert compare.optim_overrides("adam_mini") == ["--optim_args", ""]
