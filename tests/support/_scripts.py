"""Load a file that is not in a package (``scripts/*.py``, a worker) as a module, for its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """A fresh module executed from ``path`` under ``name`` (default: the file's stem), registered in
    ``sys.modules`` first (dataclasses and pickling look their module up there)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
