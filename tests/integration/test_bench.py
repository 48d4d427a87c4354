"""Smoke test of ``scripts/bench_optimizers.py --quick`` (in process; no timing assertions)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from _scripts import load_module

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_optimizers.py"


def load_bench() -> ModuleType:
    """Import the benchmark script as a module (``scripts/`` is not a package)."""
    return load_module(SCRIPT)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


@pytest.fixture(scope="module")
def quick_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """Run ``main(["--quick", ...])`` once; return the report, the output dir and what was printed."""
    out_dir = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()  # capsys is function-scoped; this fixture runs the script once per module
    with contextlib.redirect_stdout(stdout):
        report = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(out_dir)])
    return report, out_dir, stdout.getvalue()


def installed_keys(bench: ModuleType) -> set[str]:
    """Keys of every optimizer the script can run here (built-in ones plus installed baselines)."""
    specs, skipped = bench.optimizer_specs(bench.Hyperparameters())
    keys = {spec.key for spec in specs}
    for key, (module, _, _) in bench.OPTIONAL_BASELINES.items():
        assert (key in keys) == (importlib.util.find_spec(module) is not None)
        assert (key in skipped) == (key not in keys)
    return keys


def rows_by(report: dict, size: str, weight_decay: float = 0.1) -> dict[str, dict]:
    return {
        row["optimizer"]: row
        for row in report["results"]
        if row["size"] == size and row["weight_decay"] == weight_decay
    }


def test_json_has_every_installed_optimizer_with_positive_times(bench: ModuleType, quick_run: tuple) -> None:
    report, out_dir, _ = quick_run
    on_disk = json.loads((out_dir / "bench.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    expected = installed_keys(bench)
    for size in bench.QUICK_SIZES:
        assert rows_by(on_disk, size, 0.0).keys() == rows_by(on_disk, size).keys()  # default: decay on, then off
        rows = rows_by(on_disk, size)
        assert set(rows) == expected, on_disk["skipped"]
        for row in rows.values():
            assert len(row["step_ms"]) == bench.QUICK_REPEATS
            for value in (row["step_ms_median"], row["first_step_ms_median"], *row["step_ms"], *row["first_step_ms"]):
                assert math.isfinite(value) and value > 0
            assert row["host_syncs"] == "n/a"  # CPU


def test_state_bytes(bench: ModuleType, quick_run: tuple) -> None:
    report, _, _ = quick_run
    for size in bench.QUICK_SIZES:
        rows = rows_by(report, size)
        param_bytes = rows[bench.SGDSAI_DEFAULT]["param_bytes"]
        n_tensors = len(bench.parameter_shapes(bench.SIZES[size]))
        assert rows[bench.SGDSAI_DEFAULT]["state_bytes"] == param_bytes  # one fp32 momentum buffer, scales are floats
        adamw = rows[bench.ADAMW_FUSED]["state_bytes"]
        # exp_avg + exp_avg_sq, plus one 0-dim fp32 ``step`` tensor per parameter
        assert adamw - 2 * param_bytes == 4 * n_tensors
        assert rows[bench.ADAMW_FUSED]["state_over_param_bytes"] == pytest.approx(2.0, abs=1e-2)
        if "sgdsai-bf16m" in rows:
            assert rows["sgdsai-bf16m"]["state_bytes"] == param_bytes // 2


def test_ratios_refer_to_the_floor_and_adamw(bench: ModuleType, quick_run: tuple) -> None:
    report, _, _ = quick_run
    for size in bench.QUICK_SIZES:
        rows = rows_by(report, size)
        assert rows[bench.SGD_FLOOR]["ratio_to_sgd_fused"] == pytest.approx(1.0)
        assert rows[bench.ADAMW_FUSED]["ratio_to_adamw_fused"] == pytest.approx(1.0)


def test_markdown_table_and_plot(bench: ModuleType, quick_run: tuple) -> None:
    report, out_dir, printed = quick_run
    header = "| " + " | ".join(bench.TABLE_COLUMNS) + " |"
    assert header in printed
    lines = printed.splitlines()
    assert lines[lines.index(header) + 1].startswith("| --- |")
    assert sum(line.startswith("| tiny | 0.1 (HF groups) | sai_hf.SGDSaI |") for line in lines) == 1
    assert sum(line.startswith("| tiny | 0 | sai_hf.SGDSaI |") for line in lines) == 1
    assert len([line for line in lines if line.startswith(("| tiny |", "| mini |"))]) == len(report["results"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "bench.png").stat().st_size > 0


def test_optimizer_filter_and_unknown_key(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cpu", "--optimizers", "nope", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown or unavailable optimizer(s) ['nope']" in capsys.readouterr().err
    argv = ["--quick", "--device", "cpu", "--sizes", "tiny", "--repeats", "1", "--optimizers", "sgdsai", "--weight-decay", "0.1"]
    report = bench.main([*argv, "--out-dir", str(tmp_path)])
    assert [row["optimizer"] for row in report["results"]] == ["sgdsai"]
    assert report["results"][0]["ratio_to_sgd_fused"] is None  # the floor was not run


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--optimizers", "bogus"], "--optimizers: unknown or unavailable optimizer(s) ['bogus']"),
        (["--optimizers", ""], "--optimizers: no optimizer named in ''"),  # not "all of them"
        (["--optimizers", " , "], "--optimizers: no optimizer named"),
        (["--threads", "-1"], "argument --threads: expected a whole number >= 1, got '-1'"),
        (["--threads", "0"], "argument --threads: expected a whole number >= 1, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a finite number >= 0, got 'nan'"),
        (["--lr", "-1"], "argument --lr: expected a finite number >= 0, got '-1'"),
        (["--out-dir", "{file}"], "exists and is not a directory"),
        (["--out-dir", "{file}/sub"], "is not a directory"),
    ],
)
def test_bad_arguments_are_one_error_line_before_anything_runs(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list, named: str
) -> None:
    """Each is a parser error naming the flag and value (exit 2) before any optimizer is timed: they used to be a
    traceback (an unknown key, --threads -1, --out-dir a file, after the whole benchmark), exit 0 with every
    optimizer failed (--lr nan or -1) or, for --optimizers "", a run of every optimizer."""
    file = tmp_path / "file"
    file.write_text("x")
    monkeypatch.setattr(bench, "step_benchmark", lambda *a: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cpu", *[a.format(file=file) for a in argv]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_decay_goes_on_transformers_decay_groups(bench: ModuleType) -> None:
    workload = bench.build_workload(bench.SIZES["tiny"], torch.device("cpu"), torch.float32)
    decay, no_decay = workload.param_groups(0.1)
    names = {id(p): n for n, p in workload.named_params}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and ".ln_" not in n for n in (names[id(p)] for p in decay["params"]))
    assert all(n.endswith(".bias") or "ln_" in n for n in (names[id(p)] for p in no_decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(workload.named_params)
