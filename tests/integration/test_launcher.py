"""``python -m sai_hf.run`` (the launcher that lets an unmodified Trainer script take ``--optim sgd_sai``):
scripts and modules run as Python runs them, exit codes, errors in one line, ``sys.path`` kept while
the script's threads run. Under ``torchrun``: ``distributed/test_distributed.py``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sai_hf
from sai_hf.run import main as run_main

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


LAUNCHER_SCRIPT = '''
import json, sys
from dataclasses import dataclass
from transformers import HfArgumentParser, TrainingArguments

@dataclass
class ScriptArgs:
    report: str
    exit_code: int = 0
    fail_with: str = ""

def main():
    script, args = HfArgumentParser((ScriptArgs, TrainingArguments)).parse_args_into_dataclasses()
    with open(script.report, "w") as fh:
        json.dump({"argv": sys.argv, "name": __name__, "file": __file__, "path0": sys.path[0],
                   "optim": str(args.optim.value), "sai_hf_imported_by_script": "sai_hf" in globals()}, fh)
    if script.fail_with:
        raise RuntimeError(script.fail_with)
    sys.exit(script.exit_code)

if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_launcher_runs_unmodified_script_with_exit_codes(tmp_path):
    script_dir = tmp_path / "scripts"
    script_dir.mkdir()
    script = script_dir / "train.py"
    script.write_text(LAUNCHER_SCRIPT)
    common = ["--output_dir", str(tmp_path / "out"), "--optim", "sgd_sai", "--use_cpu", "true"]
    launcher = [sys.executable, "-m", "sai_hf.run", script]
    runs = {  # two processes at once (2 cores); nothing in the script registers sgd_sai
        "exit3": [*launcher, "--report", tmp_path / "exit3.json", "--exit_code", "3", *common],
        "raise": [*launcher, "--report", tmp_path / "raise.json", "--fail_with", "boom", *common],
    }
    procs = {
        name: subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for name, cmd in runs.items()
    }
    results = {name: (proc.wait(timeout=LAUNCH_TIMEOUT_S), proc.stdout.read()) for name, proc in procs.items()}
    assert results["exit3"][0] == 3, results["exit3"][1]
    report = json.loads((tmp_path / "exit3.json").read_text())
    assert report == {
        "argv": [str(script), "--report", str(tmp_path / "exit3.json"), "--exit_code", "3", *common],
        "name": "__main__",
        "file": str(script),
        "path0": str(script_dir),
        "optim": "sgd_sai",
        "sai_hf_imported_by_script": False,
    }
    assert results["raise"][0] == 1 and "RuntimeError: boom" in results["raise"][1]
    assert (tmp_path / "raise.json").exists()


def test_launcher_main_in_process(tmp_path, capsys):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, json\n"
        "from transformers.training_args import OptimizerNames\n"
        "out = {'argv': sys.argv, 'name': __name__, 'file': __file__, 'path0': sys.path[0],\n"
        "       'registered': 'sgd_sai' in [m.value for m in OptimizerNames]}\n"
        "json.dump(out, open(sys.argv[1], 'w'))\n"
        "if len(sys.argv) > 2: sys.exit(sys.argv[2])\n"
    )
    argv, path = list(sys.argv), list(sys.path)
    assert run_main([str(script), str(tmp_path / "a.json")]) == 0
    seen = json.loads((tmp_path / "a.json").read_text())
    assert seen == {"argv": [str(script), str(tmp_path / "a.json")], "name": "__main__", "file": str(script),
                    "path0": str(tmp_path), "registered": True}  # fmt: skip
    assert sys.argv == argv and sys.path == path  # restored
    with pytest.raises(SystemExit) as exit_info:
        run_main([str(script), str(tmp_path / "b.json"), "message to stderr"])
    assert exit_info.value.code == "message to stderr"  # SystemExit propagates unchanged
    assert sys.argv == argv and sys.path == path
    assert run_main([str(tmp_path / "missing.py")]) == 2
    assert run_main([]) == 2
    assert "python -m sai_hf.run: error: no script given" in capsys.readouterr().err
    assert run_main(["--help"]) == 0


def test_launcher_runs_a_module(tmp_path, monkeypatch):
    package = tmp_path / "pkg_sai_run_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(
        "import sys, json\njson.dump({'argv': sys.argv, 'name': __name__}, open(sys.argv[1], 'w'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_main(["-m", "pkg_sai_run_probe.train", str(tmp_path / "m.json")]) == 0
    seen = json.loads((tmp_path / "m.json").read_text())
    assert seen == {"argv": [str(package / "train.py"), str(tmp_path / "m.json")], "name": "__main__"}
    assert sai_hf.REGISTRY["sgd_sai"].name == "sgd_sai"


# --------------------------------------------------------------------------- errors in one line, --help, threads (found attacking the launcher)
def _run_main(argv):
    from sai_hf.run import main

    return main(argv)


def test_run_a_directory_with_main_as_python_does(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("VALUE = 7\n")
    report = tmp_path / "seen.json"
    (app / "__main__.py").write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import helper  # importable: the directory is sys.path[0]
            json.dump({{"name": __name__, "argv": sys.argv[1:], "path0": sys.path[0], "value": helper.VALUE,
                        "optim": "sgd_sai" in [m.value for m in __import__("transformers").training_args.OptimizerNames]}},
                      open({str(report)!r}, "w"))
            sys.exit(5)
            """
        )
    )
    with pytest.raises(SystemExit) as exit_info:
        _run_main([str(app), "--flag", "x"])
    assert exit_info.value.code == 5
    seen = json.loads(report.read_text())
    assert seen == {"name": "__main__", "argv": ["--flag", "x"], "path0": str(app), "value": 7, "optim": True}


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], r"error: no script given"),
        (["-m"], r"error: -m needs a module name"),
        (["-m", "surely_missing_module_xyz"], r"error: no module named 'surely_missing_module_xyz'"),
        (["-m", "surely_missing_pkg_xyz.train"], r"error: error while finding module specification for 'surely_missing_pkg_xyz.train'"),
        (["-m", "json"], r"error: no module named 'json.__main__'; 'json' is a package"),
        (["-m", ".relative"], r"error: relative module names are not supported"),
        (["--optim", "sgd_sai"], r"error: unknown option '--optim'"),
        (["missing_script.py"], r"error: can't open file 'missing_script.py': no such file"),
    ],
)
def test_run_launcher_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert _run_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m sai_hf.run: error: ")
    assert re.search(match, err), err


def test_run_directory_without_main_is_one_line(tmp_path, capsys):
    assert _run_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "can't find '__main__' module in" in err


def test_run_missing_module_from_the_shell_has_no_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "sai_hf.run", "-m", "surely_missing_module_xyz"], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "python -m sai_hf.run: error: no module named 'surely_missing_module_xyz'"


def test_run_help_says_what_the_launcher_does(capsys):
    assert _run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("usage:") == 1
    assert "--optim sgd_sai" in out and "Trainer" in out and "-m MODULE" in out

def test_launcher_keeps_the_scripts_path_until_its_threads_end(tmp_path):
    import threading

    from sai_hf import run

    script_dir = tmp_path / "scriptdir"
    script_dir.mkdir()
    (script_dir / "helper_module_r3.py").write_text("VALUE = 7\n")
    out = tmp_path / "seen.txt"
    script = script_dir / "train.py"
    script.write_text(
        "import sys, threading, time\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    import helper_module_r3\n"  # found through sys.path[0], the script's directory
        f"    open({str(out)!r}, 'w').write(sys.path[0] + '|' + sys.argv[1] + '|' + str(helper_module_r3.VALUE))\n"
        "threading.Thread(target=late).start()\n"
    )
    before = set(threading.enumerate())
    try:
        assert run.main([str(script), "--flag"]) == 0
    finally:
        for t in set(threading.enumerate()) - before:
            t.join()
    assert out.read_text() == f"{script_dir}|--flag|7"
