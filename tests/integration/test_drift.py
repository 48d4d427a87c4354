"""Drift statistics: rank correlation and ratios, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from sai_hf.drift import drift_summary, rank, spearman
from _scripts import load_module


def test_rank_averages_ties():
    assert rank([10.0, 30.0, 20.0, 30.0]) == [1.0, 3.5, 2.0, 3.5]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)


def test_drift_summary_ratios():
    out = drift_summary([1.0, 2.0, 4.0], [2.0, 2.0, 1.0])
    assert out["max_ratio"] == pytest.approx(4.0)
    assert out["median_ratio"] == pytest.approx(2.0)
    assert -1.0 <= out["spearman"] <= 1.0
    assert math.isnan(drift_summary([0.0], [1.0])["max_ratio"])


def test_drift_tracking_in_trainer_and_plots(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    pytest.importorskip("matplotlib")
    from _models import TokenDataset, tiny_gpt2, training_args
    from transformers import Trainer

    monkeypatch.setenv("SAI_HF_GSNR_TRACK_EVERY", "2")
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=6), train_dataset=TokenDataset())
    trainer.train()
    drift_logs = [log for log in trainer.state.log_history if "gsnr_drift/spearman" in log]
    assert [log["step"] for log in drift_logs] == [2, 4, 6]
    for log in drift_logs:
        assert -1.0 <= log["gsnr_drift/spearman"] <= 1.0 and log["gsnr_drift/max_ratio"] >= 1.0
    history = json.loads((tmp_path / "gsnr_history.json").read_text())
    report = json.loads((tmp_path / "gsnr.json").read_text())
    assert history["steps"] == [1, 2, 4, 6]
    assert set(history["blocks"]) == set(report)
    for name, series in history["blocks"].items():
        assert len(series) == 4 and series[0] == report[name]["gsnr"]  # scales stayed the g-SNR of step 1

    script = Path(__file__).resolve().parents[2] / "scripts" / "plot_gsnr.py"
    module = load_module(script)
    written = module.main([str(tmp_path)])
    assert [p.name for p in written] == ["gsnr.png", "gsnr_history.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    # how far each block's g-SNR is from sqrt(numel) (the report carries the ratio)
    assert all(e["gsnr_over_sqrt_numel"] == pytest.approx(e["gsnr"] / e["numel"] ** 0.5) for e in report.values())
    (ratio,) = module.main([str(tmp_path), "--key", "gsnr_over_sqrt_numel"])[:1]
    assert ratio.name == "gsnr_over_sqrt_numel.png" and ratio.stat().st_size > 10_000


def test_negative_track_every_is_rejected():
    from sai_hf import GSNRCallback

    with pytest.raises(ValueError, match="track_every"):
        GSNRCallback(track_every=-1)


def test_layer_types_group_gpt2_and_lora_names():
    from sai_hf.plots import layer_type

    assert layer_type("transformer.h.0.attn.c_attn.weight") == "attention"
    assert layer_type("transformer.h.0.attn.c_attn.bias") == "bias"
    assert layer_type("transformer.h.1.ln_2.weight") == "norm"
    assert layer_type("transformer.wte.weight") == "embedding"
    assert layer_type("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora_A"
    assert layer_type("model.layers.0.mlp.down_proj.weight") == "mlp"


# --------------------------------------------------------------------------- plot_gsnr.py on broken files; ties
def _plot_gsnr():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "plot_gsnr.py"
    module = load_module(script)
    return module


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("gsnr.json", '{"h.0.attn.weight": {"gsnr": 3.0, "sc', "cannot read .*gsnr.json"),
        ("gsnr.json", "[1, 2]", "gsnr.json is not a g-SNR report"),
        ("gsnr.json", '{"h.0.attn.weight": {"scale": 1.0}}', "block 'h.0.attn.weight' has no 'gsnr'"),
        ("gsnr_history.json", '{"steps": [1, 2], "blo', "cannot read .*gsnr_history.json"),
        # a value that is not a number is named with its block and key, not a traceback from the plot
        ("gsnr.json", '{"h.0.attn.weight": {"gsnr": "abc"}}', r"gsnr.json is not a g-SNR report: block 'h.0.attn.weight' has 'gsnr' = 'abc', not a number"),
        ("gsnr.json", '{"h.0.attn.weight": {"gsnr": null}}', r"block 'h.0.attn.weight' has 'gsnr' = None, not a number"),
        ("gsnr.json", '{"h.0.attn.weight": {"gsnr": [3.0]}}', r"block 'h.0.attn.weight' has 'gsnr' = \[3.0\], not a number"),
        ("gsnr_history.json", '{"steps": [1, 2], "blocks": {"h.0.attn.weight": [3.0, "x"]}}', r"gsnr_history.json is not a g-SNR history: block 'h.0.attn.weight'"),
        ("gsnr_history.json", '{"steps": [1, 2], "blocks": {"h.0.attn.weight": []}}', r"block 'h.0.attn.weight' has \[\], not 2 numbers"),
        ("gsnr_history.json", '{"steps": ["a"], "blocks": {}}', r"'steps' = \['a'\] is not a non-empty list of numbers"),
    ],
)
def test_plot_gsnr_names_a_broken_file(tmp_path, capsys, name, text, match):
    (tmp_path / "gsnr.json").write_text('{"h.0.attn.weight": {"gsnr": 3.0, "scale": 3.0}}')
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        _plot_gsnr().main([str(tmp_path)])
    assert exit_info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_spearman_of_all_tied_values_is_undefined_not_perfect():
    import math

    from sai_hf.drift import drift_summary, spearman

    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert math.isnan(spearman([5.0, 5.0], [1.0, 2.0]))
    assert math.isnan(drift_summary([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])["spearman"])
    assert spearman([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
