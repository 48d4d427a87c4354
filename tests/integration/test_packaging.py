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
