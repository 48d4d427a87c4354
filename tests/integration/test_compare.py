"""scripts/compare_optimizers.py --quick: every run lands in the table, JSON and plots."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
from _scripts import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_optimizers.py"


def _compare_module():
    return load_module(SCRIPT)


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
    assert all(r["seed"] == 42 for r in report["per_run"])  # the config's seed
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
    assert compare.optim_overrides("sgd_sai", "momentum=0.9") == ["--optim", "sgd_sai"]
    assert compare.optim_overrides("sgd") == ["--optim", "sgd", "--optim_args", "momentum=0.9"]
    assert compare.optim_overrides("adam_mini", "momentum=0.9") == ["--optim", "adam_mini", "--optim_args", ""]
    # the sqrt(numel) ablation is sgd_sai with the config's optim_args plus scale_rule
    assert compare.optim_overrides("sgd_sai_sqrt_numel", "momentum=0.9") == [
        "--optim", "sgd_sai", "--optim_args", "momentum=0.9,scale_rule=sqrt_numel",
    ]  # fmt: skip
    assert compare.optim_overrides("sgd_sai_sqrt_numel", None)[-1] == "scale_rule=sqrt_numel"


def test_recipe_seeds_and_aggregation():
    compare = _compare_module()
    assert compare.recipe_of({"lora_r": 8}, None) == "lora" and compare.recipe_of({}, None) == "gpt2"
    assert compare.recipe_of({"lora_r": 8}, "gpt2") == "gpt2"
    assert compare.parse_seeds(None, 42) == [42] and compare.parse_seeds("1,2,3", 42) == [1, 2, 3]
    for bad in ("1,1", "a", ""):
        with pytest.raises(ValueError, match="--seeds"):
            compare.parse_seeds(bad, 42)
    base = {"best_eval_loss": 0.0, "tokens_per_second": 1.0, "state_bytes": 8, "state_over_params": 1.0, "peak_rss_mb": 1}
    per_run = [
        {**base, "optim": "a", "learning_rate": 0.1, "seed": 1, "final_eval_loss": 2.0},
        {**base, "optim": "a", "learning_rate": 0.1, "seed": 2, "final_eval_loss": 2.2},
        {**base, "optim": "a", "learning_rate": 0.3, "seed": 1, "final_eval_loss": float("nan")},
        {**base, "optim": "b", "learning_rate": 0.1, "seed": 1, "final_eval_loss": 3.0},
        {**base, "optim": "b", "learning_rate": 0.1, "seed": 2, "final_eval_loss": 3.0},
    ]
    rows = {(r["optim"], r["learning_rate"]): r for r in compare.aggregate(per_run)}
    assert rows["a", 0.1]["final_eval_loss"] == pytest.approx(2.1) and rows["a", 0.1]["seeds"] == [1, 2]
    assert rows["a", 0.1]["final_eval_loss_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert math.isnan(rows["a", 0.3]["final_eval_loss"])  # a diverged seed is not averaged away
    best = compare.best_per_optimizer(list(rows.values()))
    assert best["a"]["learning_rate"] == 0.1
    (line,) = compare.separations(list(rows.values()))
    assert line.startswith("a (lr 0.1) vs b (lr 0.1): +0.900, larger than")


@pytest.mark.slow
def test_lora_comparison_with_seeds_and_the_sqrt_numel_ablation(tmp_path):
    """The LoRA recipe through compare: two seeds per point, per-seed rows, mean ± std, and
    sgd_sai_sqrt_numel really running with scale_rule=sqrt_numel."""
    compare = _compare_module()
    argv = ["--quick", "--config", str(SCRIPT.parents[1] / "configs" / "llama-lora-local.yaml"),
            "--optimizers", "sgd_sai,sgd_sai_sqrt_numel", "--grid", "sgd_sai=0.1", "--grid", "sgd_sai_sqrt_numel=0.1",
            "--seeds", "3,4", "--out_dir", str(tmp_path)]  # fmt: skip
    report = compare.main(argv)
    assert report["recipe"] == "lora" and report["seeds"] == [3, 4]
    assert sorted((r["optim"], r["seed"]) for r in report["per_run"]) == [
        ("sgd_sai", 3), ("sgd_sai", 4), ("sgd_sai_sqrt_numel", 3), ("sgd_sai_sqrt_numel", 4),
    ]  # fmt: skip
    finals = {(r["optim"], r["seed"]): r["final_eval_loss"] for r in report["per_run"]}
    assert finals["sgd_sai", 3] != finals["sgd_sai", 4]  # the seed reaches the run
    for row in report["rows"]:
        assert row["seeds"] == [3, 4] and row["final_eval_loss_std"] > 0
    reports = {
        optim: json.loads((tmp_path / "runs" / f"{optim}-lr0.1-seed3" / "gsnr.json").read_text())
        for optim in ("sgd_sai", "sgd_sai_sqrt_numel")
    }
    assert any(name.endswith("lora_A.default.weight") for name in reports["sgd_sai_sqrt_numel"])  # deferred, then scaled
    for name, entry in reports["sgd_sai_sqrt_numel"].items():
        assert entry["scale"] == pytest.approx(math.sqrt(entry["numel"]), rel=1e-12), name
    assert any(e["scale"] != pytest.approx(math.sqrt(e["numel"]), rel=1e-3) for e in reports["sgd_sai"].values())
    assert "± " in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- refused or resumed sweeps
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optimizers", "sgd_sai,sgd_sai"], "sgd_sai is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=3e-3,3e-3"], "3e-3,3e-3.*0.003 is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=3e-3,0.003"], "0.003 is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=0.0030000001,0.003"], "0.003 is given twice"),  # one run dir
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=1e-3", "--grid", "sgd_sai=3e-3"], "sgd_sai is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai="], "no learning rate"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=nan"], "nan"),
        (["--optimizers", ","], "no optimizer"),
        (["--optimizers", "../../x"], "'../../x' is not an optimizer name"),
    ],
)
def test_compare_refuses_repeated_points(tmp_path, argv, match, monkeypatch):
    compare = _compare_module()
    monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=match):
        compare.main([*argv, "--out_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "flag, instead",
    [
        (["--learning_rate", "1"], "--grid"),
        (["--learning_rate=1"], "--grid"),
        (["--optim", "adamw_torch"], "--optimizers"),
        (["--optim_args", "momentum=0.5"], "optim_args"),
        (["--seed", "7"], "--seeds"),  # not read as an abbreviation of --seeds
        (["--output_dir", "x"], "--out_dir"),
    ],
)
def test_compare_refuses_pass_through_flags_the_sweep_sets(tmp_path, flag, instead, monkeypatch):
    compare = _compare_module()
    monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=f"{flag[0].split('=')[0]} is set by the sweep.*{instead}"):
        compare.main(["--optimizers", "sgd_sai", *flag, "--out_dir", str(tmp_path)])


#: Bad arguments, each with what its one error line must name.
BAD_ARGUMENTS = [
    (["--optimizers", "sgd_sai", "--grid", "sgd_sai=abc"], "--grid 'sgd_sai=abc'"),
    (["--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
    (["--seeds", "-1"], "seed -1 is outside"),  # transformers' set_seed would fail in the run
    (["--config", "{tmp}/missing.yaml"], "missing.yaml': no such file"),
    (["--config", "{tmp}/blank.yaml"], "blank.yaml sets no field"),
    (["--learning_rate", "1"], "--learning_rate is set by the sweep"),
    (["--optimizers", "sgd_sai,sgd_sai"], "sgd_sai is given twice"),
    (["--learnig_rate", "1"], "'learnig_rate' (did you mean 'learning_rate'?)"),  # misspelt recipe field
    (["--block_size", "big"], "--block_size/--block-size: invalid int value: 'big'"),
    (["--optimizers", "bogus"], "unknown optimizer 'bogus'"),
    (["--optimizers", "adamw_torch_fusd"], "(did you mean 'adamw_torch_fused'?)"),
    (["--max_steps", "0"], "--max_steps 0"),  # the Trainer would train by epochs
    (["--gsnr_track_every", "-1"], "--gsnr_track_every -1"),
    (["--out_dir", "{tmp}/file/out"], "is not a directory"),
    # --quick cannot shrink pretrained weights: it would have run SmolLM2's 135M parameters (and LoRA r=4 on the full config)
    (["--config", str(SCRIPT.parents[1] / "configs" / "smollm2-135m-full.yaml"), "--quick"], "loads pretrained weights (gguf_file: SmolLM2-135M"),
    # an optimizer whose own arguments its recipe refuses: the config's normalize and the variant's
    (["--config", "{tmp}/normalize.yaml", "--optimizers", "sgd_sai,sgd_sai_max"], "the sgd_sai_max runs' recipe arguments"),
]


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_compare_command_line_refuses_bad_arguments_in_one_line_before_any_run(tmp_path, monkeypatch, capsys, argv, named):
    """Every bad argument is one ``compare_optimizers.py: error: ...`` line naming it, exit 2, before any run or
    directory: they used to be tracebacks, and ``--optimizers bogus`` or a misspelt recipe flag started a run
    (leaving ``runs/bogus-.../`` behind) before failing."""
    compare = _compare_module()
    monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail("a run started"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "blank.yaml").write_text("# nothing set\n")
    (tmp_path / "normalize.yaml").write_text("optim: sgd_sai\noptim_args: normalize=none\nmax_steps: 4\n")
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        compare.cli([*(a.format(tmp=tmp_path) for a in argv), *([] if "--out_dir" in argv else ["--out_dir", str(out_dir)])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("compare_optimizers.py: error: ")]
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out_dir.exists()


def test_compare_script_refuses_an_unknown_optimizer_before_any_run(tmp_path):
    """The script itself (``__main__``): ``--optimizers bogus`` is one error line and exit 2, and no
    ``runs/bogus-.../`` directory is left (it used to start a recipe run first)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--optimizers", "bogus", "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.startswith("compare_optimizers.py: error: --optimizers 'bogus': unknown optimizer 'bogus'")
    assert len(completed.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["gpt2", "lora"])
def test_compare_checks_arguments_with_the_recipes_own_dataclasses(recipe, monkeypatch):
    """The dataclasses compare parses a run's arguments with (to refuse a misspelt flag before any run) are the
    ones the recipe script itself parses."""
    compare = _compare_module()
    script = load_module(SCRIPT.parent / f"{compare.RECIPES[recipe][0]}.py", f"compare_recipe_{recipe}")
    seen = []

    class Parsed(Exception):
        """Raised in place of parsing: the recipe stops before loading any data."""

    def capture(argv, dataclass_types, prog="recipe"):
        seen.append(tuple(dataclass_types))
        raise Parsed

    monkeypatch.setattr(script, "parse_recipe_args", capture)
    with pytest.raises(Parsed):
        script.prepare(["config.yaml"])
    assert seen == [tuple(compare.recipe_argument_types(recipe))]


def test_compare_resume_is_keyed_on_the_config_contents(tmp_path, monkeypatch, capsys):
    """A finished run is reused only while the config file (and code, environment) are unchanged."""
    import json
    import subprocess
    from pathlib import Path

    compare = _compare_module()
    config = tmp_path / "config.yaml"
    config.write_text("max_steps: 3\nblock_size: 16\n")
    calls = []

    def fake_child(command, stdout=None, stderr=None, env=None):
        spec = json.loads(command[-1])
        calls.append(spec["argv"])
        Path(spec["result"]).write_text(json.dumps({"argv": spec["argv"], "optim": spec["optim"]}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_child)
    sweep = compare.Sweep(str(config), "gpt2", tmp_path / "out", [], 16, resume=True)
    compare.run_one(sweep, "sgd", 0.1, 1)
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 1  # reused: nothing changed
    config.write_text("max_steps: 300\nblock_size: 16\n")  # same path, same argv: other contents
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 2 and "config_sha256" in capsys.readouterr().out
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", "0")
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 3 and "environment" in capsys.readouterr().out
    # a truncated result file is rerun, not a crash
    (tmp_path / "out" / "runs" / "sgd-lr0.1-seed1" / "result.json").write_text('{"argv": [')
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 4


def test_compare_reads_block_size_given_as_flag_equals_value():
    compare = _compare_module()
    assert compare._last_override(["--block_size=64", "--max_steps", "5"], "--block_size", 128) == "64"
    assert compare._last_override(["--max_steps", "5"], "--block_size", 128) == 128


def test_resume_fingerprint_follows_the_gguf_file_the_run_loads(tmp_path):
    """A GGUF file rewritten in place (same name, other weights) is a different run for ``--resume``, whether
    it is found in a directory or through ``gguf_package``'s installed files (runs on an old file were reused)."""
    from _gguf import write_tiny_llama_gguf

    compare = _compare_module()
    path = write_tiny_llama_gguf(tmp_path / "t.gguf", seed=0)
    fields = {"gguf_file": "t.gguf", "gguf_package": None, "model_name_or_path": str(tmp_path)}
    before = compare.gguf_identity(fields)
    assert before[0] == str(path.resolve())
    write_tiny_llama_gguf(path, seed=5)
    assert compare.gguf_identity(fields) != before
    assert compare.gguf_identity({**fields, "gguf_file": None}) is None
