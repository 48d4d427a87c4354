"""A newcomer's first minutes: the packaging metadata, README's option list, ``scripts/setup.sh``
(quiet when pip succeeds, loud when it fails)."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    requires = pyproject["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77


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
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_versions", REPO / "scripts" / "test_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_version_legs_pin_the_floors_pyproject_declares():
    """``make test-versions``: the floor legs install exactly pyproject's lower bounds (their one place)."""
    legs = _version_legs()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    floors = legs.floors(pyproject["project"]["dependencies"])
    assert floors["transformers"] == "4.57.1" and set(floors) >= {"torch", "accelerate", "peft", "tokenizers"}
    torch, floor = legs.leg_requirements("floor", pyproject, "torch==2.13.0")
    pins = [f"{name}=={version}" for name, version in floors.items() if name != "torch"]
    assert torch == "torch==2.13.0" and floor[: len(pins)] == pins
    assert {r.split(">=")[0] for r in floor[len(pins) :]} == {"pytest", "hypothesis"}
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
