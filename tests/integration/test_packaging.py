"""A newcomer's first minutes: the packaging metadata, the sdist (the whole repository, whose tests pass
unpacked) and the wheel (only ``sai_hf``), README's option list, ``scripts/setup.sh`` (quiet when pip
succeeds, loud when it fails)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from _scripts import load_module

REPO = Path(__file__).resolve().parents[2]
#: What the unpacked sdist's own tests run (one pytest call that collects every test file, tests/gpu
#: included): the docs and their links (README, configs/, scripts/results/), the update against
#: tests/support/reference.py, a Trainer run on tests/support/_models.py, a tests/workers script,
#: scripts/setup.sh. Slow ones (the results tables' render check) are left to the checkout's run.
SDIST_SUBSET = (
    "(test_docs.py and not committed_results and not no_longer_matches)"
    " or for-loop-fp32-mu0.9-wd0.1 or fused-fp32-mu0.9-wd0.1"
    " or test_training_writes_gsnr_json_and_logs_summary"
    " or test_interrupted_run_leaves_trainer_and_output_dir_as_they_were"
    " or test_setup_script_is_quiet_when_pip_succeeds_and_loud_when_it_fails"
)


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    requires = pyproject["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77


def test_pyproject_declares_license_file_authors_classifiers_and_keywords():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license-files"] == ["LICENSE"]
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "Copyright 2026 sai-hf authors" in license_text and "[yyyy]" not in license_text
    assert project["authors"] and project["keywords"]
    floor = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in project["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions and versions[0] == int(floor), (versions, floor)  # the classifiers start where requires-python does


def project_files() -> list[str]:
    """The files of this source tree, relative to it: in a git checkout what a clone of the working tree would hold
    (tracked and untracked-but-not-ignored files that exist); in an unpacked sdist (no checkout of its own) the
    files listed in its ``sai_hf.egg-info/SOURCES.txt``."""
    toplevel = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True, text=True)
    if toplevel.returncode == 0 and Path(toplevel.stdout.strip()).resolve() == REPO:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
        return sorted(name for name in listed.split("\0") if name and (REPO / name).is_file())
    sources = REPO / "sai_hf.egg-info" / "SOURCES.txt"
    assert sources.is_file(), f"{REPO} is neither a git checkout nor an unpacked sdist (no {sources})"
    return sorted(line for line in sources.read_text().splitlines() if line and (REPO / line).is_file())


def _build(kind: str, source: Path, outdir: Path, env: dict[str, str]) -> Path:
    """``python -m build --<kind> --no-isolation`` of ``source`` into ``outdir``: the one artifact built."""
    done = subprocess.run(
        [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(outdir), str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (artifact,) = outdir.iterdir()
    return artifact


@pytest.mark.slow
def test_sdist_holds_the_repository_and_its_tests_pass_unpacked_and_its_wheel_only_sai_hf(tmp_path):
    """The sdist holds every file of the source tree (every test, worker, support module, config, script and
    result the docs link), no bytecode; its wheel holds only ``sai_hf`` with its C sources; building leaves no
    ``build/`` folder behind; the unpacked sdist's tests pass against the unpacked ``sai_hf``."""
    files = project_files()
    assert "tests/conftest.py" in files and "tests/support/reference.py" in files
    source = tmp_path / "source"  # a copy: the build writes sai_hf.egg-info into the tree it builds
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    (source / "tests" / "unit" / "__pycache__").mkdir(parents=True)
    (source / "tests" / "unit" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"left by a test run")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    env.pop("PYTHONPATH", None)  # the build imports nothing of sai_hf

    sdist = _build("sdist", source, tmp_path / "sdist", env)
    with tarfile.open(sdist) as archive:
        (root,) = {name.split("/", 1)[0] for name in archive.getnames()}
        archived = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name and archive.getmember(name).isfile()}
        archive.extractall(tmp_path / "unpacked", filter="data")
    missing = sorted(set(files) - archived)
    assert not missing, f"the sdist lacks {missing}"
    assert not [name for name in archived if name.endswith((".pyc", ".pyo"))]
    pkg_info = (tmp_path / "unpacked" / root / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    unpacked = tmp_path / "unpacked" / root

    wheel = _build("wheel", unpacked, tmp_path / "wheel", env)
    assert not (unpacked / "build").exists(), "building the wheel left a build/ folder in the source tree"
    assert not list((tmp_path / "tmp").iterdir()), "the build's temporary directory was not removed"
    with zipfile.ZipFile(wheel) as archive:
        wheeled = set(archive.namelist())
    package = {name for name in archived if name.startswith("sai_hf/") and name.endswith((".py", ".c"))}
    assert {name for name in package if name.startswith("sai_hf/csrc/")} and package <= wheeled, sorted(package - wheeled)
    strays = sorted(name for name in wheeled - package if not name.startswith(f"{root}.dist-info/"))
    assert not strays, f"the wheel holds more than sai_hf's code: {strays}"

    env["PYTHONPATH"] = str(unpacked)  # the unpacked copy of sai_hf, not the checkout's (nor an installed one)
    origin = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('sai_hf').origin)"],
        cwd=unpacked, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(origin).resolve() == (unpacked / "sai_hf" / "__init__.py").resolve(), origin
    report = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-k", SDIST_SUBSET, f"--junitxml={report}"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {f"{case.get('classname')}::{case.get('name')}": [child.tag for child in case] for case in cases}
    unsuccessful = {name: tags for name, tags in outcomes.items() if {"failure", "error", "skipped"} & set(tags)}
    assert not unsuccessful, unsuccessful
    for module in ("test_docs", "test_update_against_reference", "test_trainer", "test_find_lr", "test_packaging"):
        assert any(f".{module}::" in name for name in outcomes), f"nothing of {module} ran: {sorted(outcomes)}"


def test_readme_lists_every_optim_args_key():
    from sai_hf.integration import REGISTRY

    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("`--optim_args` keys:") :].split("\n\n")[0]
    for key in REGISTRY["sgd_sai"].options:
        assert f"`{key}`" in paragraph, key


def _fake_venv(tmp_path: Path, fail_step: str | None) -> Path:
    """A venv whose python answers setup.sh's calls: noise on every pip call, a failure on one."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            case "$*" in
              *"import torch, transformers"*) echo "sai-hf fake"; exit 0 ;;
              *"import torch"*) exit 0 ;;
            esac
            echo "NOISE: BuildBackendWarning: Editable installation. Please be careful with folders"
            case "$*" in
              *"{fail_step or "never-fails"}"*) echo "ERROR: pip failed on purpose" >&2; exit 7 ;;
            esac
            exit 0
            """
        )
    )
    python.chmod(0o755)
    return venv


def test_setup_script_is_quiet_when_pip_succeeds_and_loud_when_it_fails(tmp_path):
    venv = _fake_venv(tmp_path, fail_step=None)
    env = {**os.environ, "VENV": str(venv)}
    ok = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "NOISE" not in ok.stdout + ok.stderr and "NOISE" in (venv / "pip-install.log").read_text()
    assert (venv / ".sai_hf_installed").exists()

    venv = _fake_venv(tmp_path / "failing", fail_step=" -e ")
    env = {**os.environ, "VENV": str(venv)}
    failed = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 7
    assert "ERROR: pip failed on purpose" in failed.stderr and "setup: error:" in failed.stderr
    assert not (venv / ".sai_hf_installed").exists()


def _version_legs():
    return load_module(REPO / "scripts" / "test_versions.py")


def test_version_legs_pin_the_floors_pyproject_declares():
    """``make test-versions``: the floor legs install exactly pyproject's lower bounds (their one place)."""
    legs = _version_legs()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    floors = legs.floors(pyproject["project"]["dependencies"])
    assert floors["transformers"] == "4.57.1" and set(floors) >= {"torch", "accelerate", "peft", "tokenizers"}
    torch, floor = legs.leg_requirements("floor", pyproject, "torch==2.13.0")
    pins = [f"{name}=={version}" for name, version in floors.items() if name != "torch"]
    assert torch == "torch==2.13.0" and floor[: len(pins)] == pins
    assert {r.split(">=")[0] for r in floor[len(pins) :]} == set(legs.TEST_TOOLS) == {"pytest", "hypothesis", "gguf"}
    torch, transformers5 = legs.leg_requirements("transformers5", pyproject, "torch==2.13.0")
    assert "transformers==5.0.0" in transformers5 and f"accelerate=={floors['accelerate']}" in transformers5
    assert legs.leg_requirements("torch-floor", pyproject, "torch==2.13.0")[0] == f"torch=={floors['torch']}"
    torch, newest = legs.leg_requirements("newest", pyproject, "torch==2.13.0")
    assert torch == "torch==2.13.0" and not any("==" in r for r in newest)


def test_a_dependency_without_a_floor_is_named():
    import pytest

    with pytest.raises(ValueError, match="'peft' has no '>=' lower bound"):
        _version_legs().floors(["torch>=2.6", "peft"])


def test_every_smoke_test_exists():
    """tests/smoke.txt names test functions that exist (a renamed test would make the leg fail to start)."""
    smoke = _version_legs().smoke_tests()
    assert len(smoke) >= 10
    for node in smoke:
        path, _, name = node.partition("::")
        assert (REPO / path).is_file(), node
        if name:
            assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), node
