"""``make test-versions LEG=...``: install sai-hf in a fresh virtualenv with one set of dependency versions and run
the smoke tests (``tests/smoke.txt``) there, so that the range ``pyproject.toml`` declares is one that works.

Legs (each in its own git-ignored ``.venv-LEG/``, made anew every run):

- ``floor``: every ``[project].dependencies`` entry at its lower bound (transformers 4.57.1, accelerate, peft,
  datasets, evaluate, tokenizers, pyyaml), torch 2.13.0. What CI runs.
- ``transformers5``: the same, with transformers at the first 5.x release (5.0.0).
- ``newest``: the newest releases of every dependency that resolve together, torch 2.13.0.
- ``torch-floor``: ``floor`` with torch at its lower bound too. Not in CI: any torch but 2.13.0 is a download of a
  CUDA build from PyPI (about 3 GB and 3-5 minutes here).

The floors are read from ``pyproject.toml``, the one place they are written: a dependency without a ``>=`` lower
bound is an error. ``TORCH_SPEC`` overrides the torch of the other legs (as in ``scripts/setup.sh``).

Usage: ``python scripts/test_versions.py LEG [LEG ...]`` (from any Python >= 3.10; each leg's virtualenv uses it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SMOKE_LIST = REPO / "tests" / "smoke.txt"
TORCH_TESTED = "2.13.0"  # the torch of every leg but torch-floor (a CPU wheel on this project's machines)
FIRST_TRANSFORMERS_5 = "5.0.0"
TEST_TOOLS = ("pytest", "hypothesis", "gguf")  # what the smoke tests need besides sai-hf (their specs: the test extra)
SHOWN = ("torch", "transformers", "accelerate", "peft", "datasets", "evaluate", "tokenizers", "pyyaml", "huggingface-hub")
LEGS = ("floor", "transformers5", "newest", "torch-floor")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def floors(dependencies: list[str]) -> dict[str, str]:
    """``{name: lower bound}`` of every dependency; ``ValueError`` naming one without a ``>=`` bound."""
    found = {}
    for requirement in dependencies:
        match = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        if match is None:
            raise ValueError(f"pyproject.toml: dependency {requirement!r} has no '>=' lower bound (its tested floor)")
        found[_name(requirement)] = match.group(1)
    return found


def leg_requirements(leg: str, pyproject: dict, torch_spec: str) -> tuple[str, list[str]]:
    """``(torch requirement, the other requirements)`` that ``leg`` installs next to ``-e .``."""
    project = pyproject["project"]
    dependencies = project["dependencies"]
    tools = [r for r in project["optional-dependencies"]["test"] if _name(r) in TEST_TOOLS]
    if len(tools) != len(TEST_TOOLS):
        raise ValueError(f"pyproject.toml: the test extra must name {', '.join(TEST_TOOLS)}")
    lower = floors(dependencies)
    if leg == "newest":
        return torch_spec, [r for r in dependencies if _name(r) != "torch"] + tools
    pins = {name: f"{name}=={version}" for name, version in lower.items()}
    if leg == "transformers5":
        pins["transformers"] = f"transformers=={FIRST_TRANSFORMERS_5}"
    torch = pins.pop("torch")
    return (torch if leg == "torch-floor" else torch_spec), list(pins.values()) + tools


def _run(command: list[str], log: Path, env: dict[str, str]) -> None:
    """Run ``command`` with its output appended to ``log``; on failure show that output and exit with its status."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        status = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if status:
        sys.stderr.write(log.read_text())
        sys.exit(f"test-versions: '{' '.join(command)}' failed with exit status {status} (output above, also in {log})")


def smoke_tests() -> list[str]:
    tests = [line.split("#", 1)[0].strip() for line in SMOKE_LIST.read_text().splitlines()]
    return [test for test in tests if test]


def run_leg(leg: str, torch_spec: str) -> int:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch, requirements = leg_requirements(leg, pyproject, torch_spec)
    venv = REPO / f".venv-{leg}"
    shutil.rmtree(venv, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # sai_hf from this checkout, nothing else
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    log = venv / "pip-install.log"
    print(f"test-versions: {leg}: installing {torch}, then -e . {' '.join(requirements)} in {venv.name}/", flush=True)
    _run([python, "-m", "pip", "install", torch], log, env)
    _run([python, "-m", "pip", "install", "-e", ".", torch, *requirements], log, env)
    installed = subprocess.run(
        [python, "-c", "import importlib.metadata as m, sys; print(' '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))", *SHOWN],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()
    print(f"test-versions: {leg}: installed in {time.monotonic() - started:.0f} s: {installed}", flush=True)
    return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *smoke_tests()], cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("legs", nargs="+", choices=LEGS, metavar="LEG", help=f"one of {', '.join(LEGS)}")
    args = parser.parse_args(argv)
    torch_spec = os.environ.get("TORCH_SPEC") or f"torch=={TORCH_TESTED}"
    failed = [leg for leg in args.legs if run_leg(leg, torch_spec) != 0]
    if failed:
        print(f"test-versions: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
