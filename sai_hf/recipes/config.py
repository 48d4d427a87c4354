"""Recipe command lines: a YAML config file first, then ``--field value`` overrides.

``python scripts/pretrain_gpt2.py configs/gpt2-local.yaml --max_steps 200 --learning_rate 5e-4``

The YAML file is turned into command-line tokens placed *before* the overrides, and the whole
list is parsed by one ``HfArgumentParser``, so an override always wins over the file and every
value goes through the same type conversion. Problems are reported before anything runs:
a missing config file raises ``FileNotFoundError``; an unknown key (in the file or on the
command line), a malformed file or a value of the wrong type raises ``ValueError`` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

USAGE = "usage: {prog} CONFIG.yaml [--field value ...]"


class RecipeArgumentParser(HfArgumentParser):
    """An ``HfArgumentParser`` that raises ``ValueError`` instead of exiting on bad input."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"invalid recipe argument: {message}")


def load_yaml_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe config: a YAML mapping from field names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (the first argument must be a YAML config file)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(config).__name__}")
    return config


def known_fields(dataclass_types: Iterable[type]) -> list[str]:
    """The field names the recipe accepts (those of all its argument dataclasses)."""
    return [f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init]


def check_config_keys(config: dict[str, Any], fields: Sequence[str], source: str) -> None:
    """Raise ``ValueError`` naming every key of ``config`` that is not a recipe field."""
    unknown = [key for key in config if key not in fields]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), fields, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} in {source}: {', '.join(hints)}")


def config_to_cli_tokens(config: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """Turn a config mapping into ``--field value`` tokens for ``parser``.

    Booleans become ``true``/``false``, mappings become JSON (TrainingArguments parses JSON for its
    dict fields such as ``gradient_checkpointing_kwargs``), lists become several tokens for fields
    that take several values. ``null`` keeps the field's default.
    """
    actions = {action.dest: action for action in parser._actions}
    tokens: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            tokens += [flag, str(value).lower()]
        elif isinstance(value, dict):
            tokens += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            if actions[key].nargs not in ("+", "*"):
                raise ValueError(f"config key '{key}' takes a single value, got the list {value!r}")
            if not value:
                continue
            tokens += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def parse_recipe_args(
    argv: Sequence[str] | None, dataclass_types: Sequence[type], prog: str = "recipe"
) -> tuple[Any, ...]:
    """Parse ``CONFIG.yaml [--field value ...]`` into one instance of each of ``dataclass_types``.

    ``argv`` excludes the program name (``sys.argv[1:]`` when ``None``). ``-h``/``--help`` as the
    first argument prints every field with its help and default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"the first argument must be a YAML config file; {USAGE.format(prog=prog)}")
    config_path, overrides = argv[0], argv[1:]
    config = load_yaml_config(config_path)
    fields = known_fields(dataclass_types)
    check_config_keys(config, fields, source=f"config file {config_path}")
    override_keys = {tok[2:].split("=", 1)[0]: None for tok in overrides if tok.startswith("--")}
    check_config_keys(override_keys, fields, source="the command line")

    tokens = config_to_cli_tokens(config, parser) + overrides
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=tokens, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ValueError(f"unexpected command-line arguments {remaining}; {USAGE.format(prog=prog)}")
    return tuple(parsed)
