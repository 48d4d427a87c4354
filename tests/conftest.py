"""Shared pytest configuration: hypothesis profiles for the property tests (tests/test_properties.py).

* ``ci`` (the default, and what CI runs): derandomised, a fixed example budget (the property file
  takes about a minute on 2 CPU cores), no deadline, no example database.
* ``thorough``: 10x the examples, random seeds, failures kept in ``.pytest_cache/hypothesis``.
  ``pytest tests/test_properties.py --hypothesis-profile=thorough`` (or ``HYPOTHESIS_PROFILE=thorough``).

Each property test takes a fixed share of the loaded profile's ``max_examples``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

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
