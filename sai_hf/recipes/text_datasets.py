"""Loading raw datasets with ``datasets``: hub names, local directories and local files.

Whatever the source, the result is a ``DatasetDict`` with ``train`` and ``validation`` splits; a
dataset without a validation split gets one carved out of ``train`` (seeded, so reproducible).
Column checks (:func:`require_columns`) name the column expected and the ones present.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

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


def _load_local_files(train_file: str, validation_file: str | None) -> DatasetDict:
    data_files = {"train": train_file}
    if validation_file:
        data_files["validation"] = validation_file
    for split, path in data_files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{split} file not found: {path}")
    builders = {_builder_for(path) for path in data_files.values()}
    if len(builders) > 1:
        raise ValueError(f"train_file and validation_file must have the same type, got {sorted(builders)}")
    return load_dataset(builders.pop(), data_files=data_files)


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
    if "validation" not in raw:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError(
                f"dataset {source} has no 'validation' split and validation_split_percentage="
                f"{data_args.validation_split_percentage} cannot carve one out of 'train'"
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


def select_first(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first ``max_samples`` rows of ``dataset`` (all of them when ``None``)."""
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

