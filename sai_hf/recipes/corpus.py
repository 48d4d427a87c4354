"""The offline corpus: the Python standard library's own source files.

Every Python installation ships it, so the default recipes train on real text with no
download. Files are split into train/validation *by file*, deterministically, from a hash of
each file's path relative to the stdlib root, so the split is the same on every machine with
the same Python version. Test suites (``test``/``tests``/``idle_test``), ``site-packages`` and
files that are not valid UTF-8 are left out.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class SourceFile:
    """One stdlib file: its path relative to the stdlib root and its text."""

    relpath: str
    text: str


def stdlib_root() -> Path:
    """The directory holding the standard library's ``*.py`` files."""
    return Path(sysconfig.get_paths()["stdlib"])


def path_hash(relpath: str) -> int:
    """A stable integer hash of a relative path (used for the split and for subsampling)."""
    return int(hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:12], 16)


def is_validation_file(relpath: str, validation_percent: float) -> bool:
    """Whether a file belongs to the validation split (about ``validation_percent`` % of files)."""
    return (path_hash(relpath) % 10_000) < validation_percent * 100


def list_stdlib_files(root: Path | None = None, max_files: int | None = None) -> list[SourceFile]:
    """Read the stdlib's source files, ordered by path hash, keeping the first ``max_files``.

    Ordering by hash makes ``max_files`` a deterministic, directory-independent subsample.
    """
    root = root or stdlib_root()
    relpaths = sorted(
        (path.relative_to(root).as_posix() for path in root.rglob("*.py")),
        key=lambda relpath: (path_hash(relpath), relpath),
    )
    files: list[SourceFile] = []
    for relpath in relpaths:
        if EXCLUDED_DIRS.intersection(Path(relpath).parts[:-1]):
            continue
        try:
            text = (root / relpath).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        files.append(SourceFile(relpath, text))
        if max_files and len(files) >= max_files:
            break
    if not files:
        raise FileNotFoundError(f"no readable *.py files found under the standard library root {root}")
    return files


def split_stdlib_files(
    files: list[SourceFile], validation_percent: float
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Split files into (train, validation) by path hash; validation is never empty."""
    train = [f for f in files if not is_validation_file(f.relpath, validation_percent)]
    validation = [f for f in files if is_validation_file(f.relpath, validation_percent)]
    if not validation:  # tiny subsamples: move one file over so there is something to evaluate on
        validation, train = train[-1:], train[:-1]
    return train, validation


def corpus_id(split: Dataset) -> dict[str, object]:
    """What identifies a corpus split for caching.

    For the stdlib corpus (it has a ``path`` column): the Python version and each file's path and
    size. For any other dataset: its ``datasets`` fingerprint.
    """
    if "path" not in split.column_names or "text" not in split.column_names:
        return {"fingerprint": split._fingerprint, "rows": len(split)}
    digest = hashlib.sha256()
    for relpath, text in zip(split["path"], split["text"]):
        digest.update(f"{relpath}:{len(text)}\n".encode("utf-8"))
    return {"python": platform.python_version(), "files": len(split), "digest": digest.hexdigest()[:16]}


def stdlib_corpus(max_files: int | None = None, validation_percent: float = 5.0) -> DatasetDict:
    """The stdlib corpus as a ``DatasetDict`` with ``train`` and ``validation`` splits.

    Each row is one file: columns ``text`` (its source) and ``path`` (relative to the stdlib root).
    """
    train, validation = split_stdlib_files(list_stdlib_files(max_files=max_files), validation_percent)

    def to_dataset(files: list[SourceFile]) -> Dataset:
        return Dataset.from_dict({"text": [f.text for f in files], "path": [f.relpath for f in files]})

    return DatasetDict(train=to_dataset(train), validation=to_dataset(validation))
