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
    """Return the sai_hf cache directory (created if needed).

    ``ValueError`` naming where the directory came from (``recipe_cache_dir``, ``$SAI_HF_CACHE`` or
    the default) if it cannot be created or is not a writable directory."""
    if cache_dir:
        path, origin = Path(cache_dir), f"recipe_cache_dir={os.fspath(cache_dir)!r}"
    elif os.environ.get(CACHE_ENV_VAR, "").strip():
        path, origin = Path(os.environ[CACHE_ENV_VAR]), f"environment variable {CACHE_ENV_VAR}={os.environ[CACHE_ENV_VAR]!r}"
    else:
        path, origin = Path.home() / ".cache" / "sai_hf", "the default cache directory"
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot use {origin} as the sai_hf cache: {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot use {origin} as the sai_hf cache: {err.strerror or err} ({path})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cannot use {origin} as the sai_hf cache: {path} is not writable")
    return path


def fingerprint(payload: Any, length: int = 16) -> str:
    """A short, stable hex digest of a JSON-serialisable payload (the cache key)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        tmp_dir.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep a shared $SAI_HF_CACHE from other users
        try:
            os.replace(tmp_dir, entry)
        except OSError:
            if not entry.is_dir():  # a real failure, not a lost race
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return entry
