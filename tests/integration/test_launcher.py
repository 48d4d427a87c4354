"""``python -m sai_hf.run`` (the launcher that lets an unmodified Trainer script take ``--optim sgd_sai``):
scripts and modules run as Python runs them, exit codes, errors in one line, ``sys.path`` kept while
the script's threads run. Under ``torchrun``: ``distributed/test_distributed.py``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
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


# What `python SCRIPT` gives the script, written to sys.argv[1]: the launcher must give the same.
PROBE_SCRIPT = """
import json, os, sys, traceback
here = os.path.dirname(os.path.abspath(__file__))  # what scripts resolve their data files from
os.chdir(os.path.dirname(here))  # ... also after changing directory
try:
    raise ValueError
except ValueError:
    code_file = traceback.extract_tb(sys.exc_info()[2])[0].filename
out = {"file": __file__, "argv0": sys.argv[0], "data": open(os.path.join(here, "data.txt")).read(), "code_file": code_file,
       "package": __package__, "spec": __spec__, "loader": type(__loader__).__name__, "main": sys.modules["__main__"].__dict__ is globals(),
       "path": sys.path}
json.dump(out, open(sys.argv[1], "w"))
"""


def _probe_dir(tmp_path: Path) -> Path:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "probe.py").write_text(PROBE_SCRIPT)
    (scripts / "data.txt").write_text("found")
    return scripts


def test_launcher_gives_a_relative_script_its_absolute_file_as_python_does(tmp_path, monkeypatch):
    """``python scripts/probe.py`` makes ``__file__`` (and the code's file name in tracebacks) absolute since Python
    3.9 and keeps ``sys.argv[0]`` as given; the launcher (``runpy.run_path``) left ``__file__`` relative, so a script
    that changes directory and then resolves ``dirname(abspath(__file__))`` failed under ``python -m sai_hf.run``
    and ``find_lr`` only. Everything the probe sees equals what ``python`` gives it, ``sys.path`` included."""
    _probe_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "scripts/probe.py", str(tmp_path / "python.json")], check=True, timeout=60)
    monkeypatch.chdir(tmp_path)  # the probe changes directory: back for the launcher's run
    saved_path = list(sys.path)
    with monkeypatch.context() as mp:
        mp.setattr(sys, "path", [str(tmp_path), *saved_path[1:]])  # python -m puts the current directory first
        assert run_main(["scripts/probe.py", str(tmp_path / "launcher.json")]) == 0
    want, got = (json.loads((tmp_path / name).read_text()) for name in ("python.json", "launcher.json"))
    assert want["file"] == str(tmp_path / "scripts" / "probe.py") and want["argv0"] == "scripts/probe.py"
    want["path"], got["path"] = want["path"][0], got["path"][0]  # the rest: this interpreter's and pytest's entries
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["-I", "-P", None])
def test_launcher_under_isolated_and_safe_path_keeps_sys_path_as_python_does(tmp_path, flag):
    """``python -I SCRIPT.py`` and ``python -P SCRIPT.py`` (``PYTHONSAFEPATH``) put no script directory on
    ``sys.path``, and ``python -I/-P -m sai_hf.run`` no current directory: the launcher overwrote ``sys.path[0]``
    (the first real entry there, the standard library's zip or a ``PYTHONPATH`` entry) with the script's directory.
    ``sys.path`` must be python's own in each mode."""
    if flag == "-P" and sys.version_info < (3, 11):
        pytest.skip("-P is new in Python 3.11")
    flags = [flag] if flag else []
    if flag == "-I":
        found = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; print(u.find_spec('sai_hf') is not None)"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        if found.stdout.strip() != "True":
            pytest.skip("sai_hf is not installed in this interpreter (-I ignores PYTHONPATH)")
    scripts = _probe_dir(tmp_path)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]]) if env.get("PYTHONPATH") else str(REPO)
    for name, cmd in (("python", [scripts / "probe.py"]), ("launcher", ["-m", "sai_hf.run", scripts / "probe.py"])):
        done = subprocess.run([sys.executable, *flags, *map(str, cmd), str(tmp_path / f"{name}.json")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    want, got = (json.loads((tmp_path / name).read_text()) for name in ("python.json", "launcher.json"))
    assert got == want
    assert (str(scripts) in want["path"]) is (flag is None)


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


# --------------------------------------------------------------------------- the processes the script starts
# (sai_hf/child_site/sitecustomize.py): multiprocessing spawn workers, the script re-executing itself, a framework CLI
# that starts its own torchrun; the user's own sitecustomize still runs in each; a Python without sai_hf goes on.
USER_SITECUSTOMIZE = """
import json, os, sys
with open(os.environ["USER_SITE_LOG"], "a") as log:  # one line per process that ran it
    log.write(json.dumps({"pid": os.getpid(), "sai_hf_already_imported": "sai_hf" in sys.modules}) + "\\n")
"""


def _user_site(tmp_path: Path) -> tuple[Path, Path]:
    """A directory holding the user's own sitecustomize (it logs every process it runs in), and its log."""
    site = tmp_path / "user_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(USER_SITECUSTOMIZE)
    return site, tmp_path / "user_site.log"


def _launch(tmp_path: Path, argv: list, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sai_hf.run ARGV`` with the user's sitecustomize on PYTHONPATH (after this checkout)."""
    site, log = _user_site(tmp_path)
    env = child_env()
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(site)]), USER_SITE_LOG=str(log), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "sai_hf.run", *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)  # fmt: skip


def _user_site_runs(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "user_site.log").read_text().splitlines()]


SPAWN_SCRIPT = '''
import json, os, sys
import torch.multiprocessing as mp
from transformers import HfArgumentParser, TrainingArguments

def worker(rank, args, report):  # args: TrainingArguments(optim="sgd_sai"), pickled by spawn
    sys.path.insert(0, {support!r})
    from _models import TokenDataset, tiny_gpt2
    from transformers import Trainer
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=4))
    trainer.train()
    json.dump({{"optim": repr(args.optim), "optimizer": type(trainer.optimizer.optimizer).__name__,
               "steps": trainer.state.global_step, "pid": os.getpid()}}, open(report, "w"))

if __name__ == "__main__":
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(sys.argv[2:])
    mp.spawn(worker, args=(args, sys.argv[1]), nprocs=1)
'''

TRAIN_ARGS = ["--optim", "sgd_sai", "--use_cpu", "true", "--max_steps", "1", "--per_device_train_batch_size", "4",
              "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip


@pytest.mark.slow
def test_spawn_workers_unpickle_sgd_sai_arguments(tmp_path):
    """Without the children's registration the worker failed: 'Trainer cannot instantiate unsupported optimizer'."""
    script = tmp_path / "spawning.py"
    script.write_text(SPAWN_SCRIPT.format(support=str(REPO / "tests" / "support")))
    argv = [script, tmp_path / "worker.json", "--output_dir", tmp_path / "out", *TRAIN_ARGS]
    done = _launch(tmp_path, argv)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads((tmp_path / "worker.json").read_text())
    assert seen == {"optim": "<OptimizerNames.SGD_SAI: 'sgd_sai'>", "optimizer": "SGDSaI", "steps": 1, "pid": seen["pid"]}
    runs = _user_site_runs(tmp_path)  # in the launcher and the spawned worker (and its resource tracker), first
    assert seen["pid"] in {run["pid"] for run in runs} and not any(run["sai_hf_already_imported"] for run in runs)


REEXEC_SCRIPT = '''
import json, os, subprocess, sys
from transformers import HfArgumentParser, TrainingArguments

if os.environ.get("REEXECUTED") != "1":  # the script runs itself again, as some launch helpers do
    sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, "REEXECUTED": "1"}).returncode)
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(sys.argv[2:])
json.dump({"optim": args.optim.value, "optim_args": args.optim_args, "pid": os.getpid(),
           "path_clean": not any(p.endswith("child_site") for p in sys.path)}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_script_that_reexecutes_itself_keeps_sgd_sai(tmp_path):
    """Without the children's registration the child failed: "--optim: invalid choice: 'sgd_sai'"."""
    script = tmp_path / "reexec.py"
    script.write_text(REEXEC_SCRIPT)
    argv = [script, tmp_path / "child.json", "--output_dir", tmp_path / "out", "--optim", "sgd_sai",
            "--optim_args", "momentum=0.8", "--use_cpu", "true"]  # fmt: skip
    done = _launch(tmp_path, argv)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads((tmp_path / "child.json").read_text())
    assert seen == {"optim": "sgd_sai", "optim_args": "momentum=0.8", "path_clean": True, "pid": seen["pid"]}
    assert seen["pid"] in {run["pid"] for run in _user_site_runs(tmp_path)}


FRAMEWORK_CLI = '''
import subprocess, sys
# a framework's CLI in its multi-process mode: its own torchrun, over its own worker script
command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *sys.argv[1:]]
sys.exit(subprocess.run(command).returncode)
'''

FRAMEWORK_WORKER = '''
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {support!r})
from _models import TokenDataset, tiny_llama
from transformers import Trainer, TrainingArguments

args = TrainingArguments(output_dir=sys.argv[2], optim="sgd_sai", use_cpu=True, max_steps=1, per_device_train_batch_size=2,
                         report_to="none", save_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
model = tiny_llama()
trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=8))
result = trainer.train()
weights = float(sum(p.detach().double().sum() for p in model.parameters()))
json.dump({{"world": dist.get_world_size(), "optimizer": type(trainer.optimizer.optimizer).__name__,
           "steps": trainer.state.global_step, "loss": result.training_loss, "weights": weights, "pid": os.getpid()}},
          open(f"{{sys.argv[1]}}.{{dist.get_rank()}}.json", "w"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_framework_cli_that_starts_its_own_torchrun(tmp_path):
    """LLaMA-Factory's FORCE_TORCHRUN=1 (its CLI runs `torchrun ... launcher.py`), in miniature: without the
    children's registration both workers failed with "sgd_sai is not a valid OptimizerNames"."""
    (tmp_path / "framework_cli.py").write_text(FRAMEWORK_CLI)
    (tmp_path / "worker.py").write_text(FRAMEWORK_WORKER.format(support=str(REPO / "tests" / "support")))
    done = _launch(tmp_path, [tmp_path / "framework_cli.py", tmp_path / "worker.py", tmp_path / "rank", tmp_path / "out"])
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [json.loads((tmp_path / f"rank.{rank}.json").read_text()) for rank in (0, 1)]
    for seen in ranks:
        assert seen["world"] == 2 and seen["optimizer"] == "SGDSaI" and seen["steps"] == 1, seen
        assert math.isfinite(seen["loss"])
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one DDP step: the same weights on both ranks
    runs = _user_site_runs(tmp_path)  # the launcher, the CLI's torchrun and its 2 workers
    assert {seen["pid"] for seen in ranks} <= {run["pid"] for run in runs} and len(runs) >= 4
    assert not any(run["sai_hf_already_imported"] for run in runs)


def _python(argv: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, argv)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


PROBE = ("import json, sys; json.dump({'site': getattr(sys.modules.get('sitecustomize'), '__file__', None), "
         "'sai_hf': 'sai_hf' in sys.modules, 'path': sys.path}, sys.stdout)")  # fmt: skip


def test_child_sitecustomize_chains_to_the_users_and_leaves_the_path_as_it_was(tmp_path):
    """No sai_hf import here (gate 0: fast): the user's sitecustomize runs in its place, nested launchers add nothing,
    a chain through a second copy of child_site (another install) ends, and sys.path shows neither."""
    from sai_hf.run import CHILD_SITE, child_environment

    site, log = _user_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "USER_SITE_LOG": str(log)}
    env.update(child_environment(env))
    assert env["PYTHONPATH"] == os.pathsep.join([CHILD_SITE, str(site)]) and env["SAI_HF_REGISTER_IN_CHILDREN"] == "1"
    assert child_environment(env) == {"PYTHONPATH": env["PYTHONPATH"], "SAI_HF_REGISTER_IN_CHILDREN": "1"}  # nested
    assert child_environment({"SAI_HF_REGISTER_IN_CHILDREN": "0"}) == {}
    assert child_environment({}) == {"PYTHONPATH": CHILD_SITE, "SAI_HF_REGISTER_IN_CHILDREN": "1"}  # no empty entry
    other_install = tmp_path / "other_install" / "child_site"
    shutil.copytree(CHILD_SITE, other_install)
    env.update(SAI_HF_REGISTER_IN_CHILDREN="0",
               PYTHONPATH=os.pathsep.join([CHILD_SITE, str(other_install), CHILD_SITE, str(site)]))  # fmt: skip
    seen = json.loads(_python([sys.executable, "-c", PROBE], env, tmp_path).stdout)
    assert seen["site"] == str(site / "sitecustomize.py") and not seen["sai_hf"]
    assert not any(p.endswith("child_site") for p in seen["path"]) and str(site) in seen["path"]
    assert len(_user_site_runs(tmp_path)) == 1


def test_child_without_sai_hf_goes_on(tmp_path):
    """A Python without sai_hf nor transformers (another virtualenv) says nothing; one with transformers but a broken
    or missing sai_hf says so in one line; both run their program and the user's sitecustomize."""
    import venv

    from sai_hf.run import child_environment

    site, log = _user_site(tmp_path)
    bare = tmp_path / "bare_venv"
    venv.create(bare, with_pip=False)
    env = {**os.environ, "PYTHONPATH": str(site), "USER_SITE_LOG": str(log)}
    env.update(child_environment(env))
    done = _python([bare / "bin" / "python", "-c", PROBE], env, tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["site"] == str(site / "sitecustomize.py")

    broken = tmp_path / "broken"
    (broken / "sai_hf").mkdir(parents=True)
    (broken / "sai_hf" / "__init__.py").write_text("raise ImportError('sai-hf needs transformers>=5.2,<6 (found 4.0)')\n")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(broken)])  # ahead of the installed sai_hf
    done = _python([sys.executable, "-c", PROBE], env, tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["site"] == str(site / "sitecustomize.py")
    assert done.stderr.splitlines() == [
        f"sai_hf.run: --optim sgd_sai is not registered in this process ({sys.executable}): "
        "cannot import sai_hf (ImportError: sai-hf needs transformers>=5.2,<6 (found 4.0))"
    ]
    assert len(_user_site_runs(tmp_path)) == 2



CHILD_PROBE = ("import json, sys; json.dump({'sai_hf': 'sai_hf' in sys.modules, 'torch': 'torch' in sys.modules, "
               "'transformers': any(name.split('.')[0] == 'transformers' for name in sys.modules)}, sys.stdout)")  # fmt: skip


def _min_start_time(argv: list, env: dict[str, str], cwd: Path, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        assert _python(argv, env, cwd).returncode == 0
        times.append(time.perf_counter() - start)
    return min(times)


def test_a_child_that_never_imports_transformers_pays_next_to_nothing(tmp_path):
    """Issue 29: the children's sitecustomize imports sai_hf, which imports neither torch nor transformers (a data
    loader or compile worker took 7-8 s of CPU for them): within 0.3 s of a bare Python (measured: ~0.01 s)."""
    from sai_hf.run import child_environment

    bare = {**child_env(), "PYTHONPATH": str(REPO)}
    child = {**bare, **child_environment(bare)}
    assert json.loads(_python([sys.executable, "-c", CHILD_PROBE], child, tmp_path).stdout) == {
        "sai_hf": True, "torch": False, "transformers": False,
    }  # fmt: skip
    argv = [sys.executable, "-c", "pass"]
    assert _min_start_time(argv, child, tmp_path) - _min_start_time(argv, bare, tmp_path) < 0.3


FAKE_TRANSFORMERS_TRAINING_ARGS = """
import enum
class OptimizerNames(str, enum.Enum):
    ADAMW_TORCH = "adamw_torch"
class TrainingArguments:
    pass
"""


def test_registration_that_fails_when_transformers_loads(tmp_path):
    """The registration runs when transformers loads (here an unsupported release): a child under the launcher says
    so in one line and goes on, as where sai_hf cannot be imported, and still registers the DeepSpeed adapter's
    backends when ``deepspeed`` (here a stand-in) loads; a script's own ``import sai_hf`` fails that import of
    transformers with the reason."""
    from sai_hf.compat import SUPPORTED_TRANSFORMERS
    from sai_hf.run import child_environment

    fake = tmp_path / "fake" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '4.0.0'\n")
    (fake / "training_args.py").write_text(FAKE_TRANSFORMERS_TRAINING_ARGS)
    (fake.parent / "deepspeed").mkdir()
    (fake.parent / "deepspeed" / "__init__.py").write_text("")
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    env.update(child_environment(env))
    code = "import transformers.training_args, deepspeed, sai_hf.sharding as s; print('went on', [b.__name__ for b in s.BACKENDS][:2])"
    done = _python([sys.executable, "-c", code], env, tmp_path)
    assert done.returncode == 0 and done.stdout == "went on ['ZeroFragments', 'Zero3Partitions']\n", done.stderr
    reason = f"ImportError: sai-hf needs transformers{SUPPORTED_TRANSFORMERS} (found 4.0.0)"
    assert done.stderr.splitlines() == [
        f"sai_hf.run: --optim sgd_sai is not registered in this process ({sys.executable}): "
        f"registering with transformers failed ({reason})"
    ]
    env["SAI_HF_REGISTER_IN_CHILDREN"] = "0"
    done = _python([sys.executable, "-c", "import sai_hf, transformers.training_args"], env, tmp_path)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == reason, done.stderr


# --------------------------------------------------------------------------- --optim_args before the data, the process group after
def test_bad_optim_args_fail_where_the_script_parses_them(tmp_path, capsys):
    script = tmp_path / "parse_then_prepare.py"
    script.write_text(
        "import sys\nfrom transformers import HfArgumentParser, TrainingArguments\n"
        "HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(sys.argv[2:])\n"
        "open(sys.argv[1], 'w').write('the long data preparation started')\n"
    )
    marker = tmp_path / "prepared"
    argv = [str(script), str(marker), "--output_dir", str(tmp_path), "--optim", "sgd_sai", "--use_cpu", "true"]
    with pytest.raises(ValueError, match=r"--optim_args for sgd_sai: unknown key 'momentun'"):
        run_main([*argv, "--optim_args", "momentun=0.9"])
    with pytest.raises(ValueError, match=r"--optim_args for sgd_sai: Invalid momentum=2.0: must be in \[0, 1\)"):
        run_main([*argv, "--optim_args", "momentum=2"])
    assert not marker.exists()
    assert run_main([*argv, "--optim_args", "momentum=0.8"]) == 0 and marker.exists()


GROUP_SCRIPT = """
import sys
import torch, torch.distributed as dist
if not dist.is_initialized():
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
t = torch.ones(1)
dist.all_reduce(t)
if sys.argv[2] == "fail":
    raise RuntimeError("the script failed")
if sys.argv[2] == "exit0":
    sys.exit(0)
"""


def test_launcher_ends_the_process_group_the_script_left(tmp_path):
    import torch.distributed as dist

    script = tmp_path / "group.py"
    script.write_text(GROUP_SCRIPT)
    for ending in ("return", "exit0"):
        with pytest.raises(SystemExit) if ending == "exit0" else contextlib.nullcontext():
            run_main([str(script), str(tmp_path / f"store_{ending}"), ending])
        assert not dist.is_initialized(), ending
    try:  # a failing script's group is left (a barrier could wait for a rank that is gone) ...
        with pytest.raises(RuntimeError, match="the script failed"):
            run_main([str(script), str(tmp_path / "store_fail"), "fail"])
        assert dist.is_initialized()
        run_main([str(script), str(tmp_path / "store_fail"), "return"])
        assert dist.is_initialized()  # ... and so is one that was alive before the script started
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
