"""Where the recipes keep what they build once and reuse: trained tokenizers and pretrained bases.

Everything lives under one cache directory, chosen in this order: the recipe field
``cache_dir`` (``--cache_dir``), the environment variable ``SAI_HF_CACHE``, then
``~/.cache/sai_hf``. Entries are directories written atomically (built in a temporary
sibling, then renamed), so an interrupted or concurrent run never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV_VAR = "SAI_HF_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the sai_hf cache directory (created if needed)."""
    if cache_dir:
        path = Path(cache_dir)
    elif os.environ.get(CACHE_ENV_VAR):
        path = Path(os.environ[CACHE_ENV_VAR])
    else:
        path = Path.home() / ".cache" / "sai_hf"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(payload: Any, length: int = 16) -> str:
    """A short, stable hex digest of a JSON-serialisable payload (the cache key)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def build_cached_dir(entry: Path, build: Callable[[Path], None]) -> Path:
    """Return ``entry``, first calling ``build(tmp_dir)`` and renaming the result into place if missing.

    ``build`` writes the entry's files into the empty directory it is given. If another process
    finished the same entry first, its copy is kept and ours is discarded.
    """
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        build(tmp_dir)
        try:
            os.replace(tmp_dir, entry)
        except OSError:
            if not entry.is_dir():  # a real failure, not a lost race
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return entry
