"""Loading raw datasets with ``datasets``: hub names, local directories and local files.

Whatever the source, the result is a ``DatasetDict`` with ``train`` and ``validation`` splits; a
dataset without a validation split gets one carved out of ``train`` (seeded, so reproducible).
Column checks (:func:`require_columns`) name the column expected and the ones present, and
:func:`require_text_columns` also what a non-text column holds. A local file that is empty, holds
only whitespace, cannot be parsed or yields no rows is named in the error.
"""

from __future__ import annotations

import math
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk

from .arguments import DataArguments

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def uses_offline_corpus(data_args: DataArguments) -> bool:
    """Whether no dataset was given, so the recipe uses its offline stdlib data."""
    return not (data_args.dataset_name or data_args.train_file)


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ValueError(f"unsupported data file type '{suffix}' for {path}; use one of {sorted(FILE_BUILDERS)}")
    return FILE_BUILDERS[suffix]


def _check_local_file(split: str, path: str) -> None:
    """``FileNotFoundError`` / ``ValueError`` naming ``path`` if it is missing, not a file, or holds
    nothing (empty, or only whitespace)."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{split} file not found: {path}")
    if not file.is_file():
        raise ValueError(f"{split} file {path} is not a regular file")
    if file.stat().st_size == 0:
        raise ValueError(f"{split} file {path} is empty")
    if FILE_BUILDERS.get(file.suffix.lower()) in ("text", "json", "csv"):
        with open(file, "rb") as fh:  # stops at the first non-blank chunk: cheap for any real file
            while chunk := fh.read(1 << 16):
                if chunk.strip():
                    return
        raise ValueError(f"{split} file {path} holds only whitespace")


def _load_local_files(train_file: str, validation_file: str | None) -> DatasetDict:
    data_files = {"train": train_file}
    if validation_file:
        data_files["validation"] = validation_file
    for split, path in data_files.items():
        _check_local_file(split, path)
    builders = {_builder_for(path) for path in data_files.values()}
    if len(builders) > 1:
        raise ValueError(f"train_file and validation_file must have the same type, got {sorted(builders)}")
    builder = builders.pop()
    splits = {}
    for split, path in data_files.items():  # one file at a time, so that an error names its file
        try:
            splits[split] = load_dataset(builder, data_files={split: path}, split=split)
        except Exception as err:  # datasets wraps the reader's error (e.g. pandas, pyarrow) in its own
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            if "corresponds to no data" in str(cause):  # e.g. a CSV with a header only, or "[]"
                raise ValueError(f"{split} file {path} holds no rows") from err
            detail = f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:300]
            raise ValueError(f"cannot read {split} file {path} as {builder} data ({detail})") from err
        if len(splits[split]) == 0:
            raise ValueError(f"{split} file {path} holds no rows")
    return DatasetDict(splits)


def _is_saved_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_raw_datasets(data_args: DataArguments, seed: int = 42) -> DatasetDict:
    """Load ``dataset_name`` (hub id or local directory) or ``train_file``/``validation_file``.

    Returns ``train`` and ``validation`` splits.
    """
    if data_args.validation_file and not data_args.train_file:
        raise ValueError("validation_file is set but train_file is not; give both (or neither)")
    if data_args.dataset_name and data_args.train_file:
        raise ValueError("set either dataset_name or train_file/validation_file, not both")
    source = data_args.dataset_name or data_args.train_file
    if data_args.train_file:
        raw = _load_local_files(data_args.train_file, data_args.validation_file)
    elif _is_saved_dataset_dir(Path(data_args.dataset_name)):
        raw = load_from_disk(data_args.dataset_name)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    if isinstance(raw, Dataset):
        raw = DatasetDict(train=raw)
    if "train" not in raw:
        raise ValueError(f"dataset {source} has no 'train' split; splits present: {sorted(raw)}")
    for split in ("train", "validation"):
        if split in raw and len(raw[split]) == 0:
            raise ValueError(f"dataset {source} has an empty '{split}' split")
    if "validation" not in raw:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError(
                f"dataset {source} has no 'validation' split and validation_split_percentage="
                f"{data_args.validation_split_percentage} cannot carve one out of 'train'"
            )
        rows = len(raw["train"])
        held = math.ceil(rows * data_args.validation_split_percentage / 100)
        if rows - held < 1:
            raise ValueError(
                f"dataset {source} has no 'validation' split and its 'train' split has only {rows} row(s): "
                f"validation_split_percentage={data_args.validation_split_percentage} leaves none to train on; "
                "give a validation_file (or a dataset with a validation split) or more data"
            )
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def require_columns(raw: DatasetDict, columns: dict[str, str], source: str | None = None) -> None:
    """Raise ``ValueError`` unless every split has each column.

    ``columns`` maps a column name to what it is for, e.g. ``{"text": "the text column (--text_column)"}``.
    """
    for split, dataset in raw.items():
        missing = [name for name in columns if name not in dataset.column_names]
        if missing:
            wanted = "; ".join(f"'{name}' ({columns[name]})" for name in missing)
            where = f"dataset {source}" if source else "the dataset"
            raise ValueError(
                f"{where} has no column {wanted} in its '{split}' split; columns present: {dataset.column_names}"
            )


#: ``datasets`` dtypes that hold text.
TEXT_DTYPES = ("string", "large_string")


def require_text_columns(
    raw: DatasetDict, columns: dict[str, str], source: str | None = None, allow_missing_values: bool = False
) -> None:
    """:func:`require_columns`, then ``ValueError`` unless every split holds text in each column
    (naming the column, the split, what it holds instead and ``source``). Missing values (null) are
    refused too unless ``allow_missing_values`` (they then count as empty text)."""
    require_columns(raw, columns, source)
    where = f"dataset {source}" if source else "the dataset"
    for split, dataset in raw.items():
        for name in columns:
            feature = dataset.features[name]
            dtype = getattr(feature, "dtype", None) if isinstance(feature, Value) else None
            if dtype not in TEXT_DTYPES:
                held = f"{dtype} values" if dtype else f"{type(feature).__name__} values ({feature})"
                raise ValueError(
                    f"column '{name}' ({columns[name]}) of {where} holds {held} in its '{split}' split, not text"
                )
            if not allow_missing_values:
                missing = dataset.data.column(name).null_count
                if missing:
                    raise ValueError(
                        f"column '{name}' ({columns[name]}) of {where} has {missing} missing (null) value(s) in "
                        f"its '{split}' split"
                    )


def select_first(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first ``max_samples`` rows of ``dataset`` (all of them when ``None``; at least 1)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples={max_samples} would leave no examples; give a number >= 1 (or none for all)")
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


def dataset_source(data_args: DataArguments) -> str:
    """A short description of where the data comes from, for messages."""
    if data_args.dataset_name:
        return data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
    if data_args.train_file:
        return ", ".join(p for p in (data_args.train_file, data_args.validation_file) if p)
    return "the Python standard library sources"

