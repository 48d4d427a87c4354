"""Shared pytest configuration (loaded for every test under tests/, ``tests/gpu`` included).

Layout: ``unit/`` (in-process contracts of the package: update paths, statistics, scaling,
checkpoints, kernels), ``integration/`` (Trainer, resume, recipes and the scripts), ``distributed/``
(2-process gloo runs: DDP, FSDP1/2, DeepSpeed), ``gpu/`` (CUDA, ``make test-gpu``), ``workers/``
(scripts the tests launch as subprocesses), ``support/`` (helpers the tests and workers import:
``_models``, ``reference``, ``_triton_reference``, ``_scripts``, ...). ``support/`` is put on ``sys.path`` here, so a test
in any folder imports them by their plain names; the workers add it themselves.

Hypothesis profiles for the property tests (tests/unit/test_properties.py):

* ``ci`` (the default, and what CI runs): derandomised, a fixed example budget (the property file
  takes about a minute on 2 CPU cores), no deadline, no example database.
* ``thorough``: 10x the examples, random seeds, failures kept in ``.pytest_cache/hypothesis``.
  ``pytest tests/unit/test_properties.py --hypothesis-profile=thorough`` (or ``HYPOTHESIS_PROFILE=thorough``).

Each property test takes a fixed share of the loaded profile's ``max_examples``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=_SLOW_DATA,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    database=DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "hypothesis")),
    suppress_health_check=_SLOW_DATA,
)
# `--hypothesis-profile NAME` (hypothesis' pytest plugin) overrides this after conftest is loaded.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
