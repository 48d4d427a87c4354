"""Recipe command lines: a YAML config file first, then ``--field value`` overrides.

``python scripts/pretrain_gpt2.py configs/gpt2-local.yaml --max_steps 200 --learning_rate 5e-4``

The YAML file is turned into command-line tokens placed *before* the overrides, and the whole
list is parsed by one ``HfArgumentParser``, so an override always wins over the file and every
value goes through the same type conversion. An unquoted value reaches a text field as it was
written (YAML 1.1 would turn ``save_strategy: no`` into false and ``run_name: 12:30`` into 750;
keys brought in by a YAML merge key ``<<:`` too),
YAML booleans and numbers still feed bool and numeric fields, and a value may start with ``-``.
Problems are reported before anything runs: a missing config file raises ``FileNotFoundError``;
an unknown key (in the file or on the command line), a key given twice, a malformed, undecodable
or empty file or a value of the wrong type raises ``ValueError`` naming it.
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
from transformers.hf_argparser import string_to_bool

from ..compat import training_argument_name

USAGE = "usage: {prog} CONFIG.yaml [--field value ...]"


class RecipeArgumentParser(HfArgumentParser):
    """An ``HfArgumentParser`` that raises ``ValueError`` instead of exiting on bad input."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"invalid recipe argument: {message}")


def load_yaml_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe config: a YAML mapping from field names to values (YAML's own typing)."""
    return _load_config(path)[0]


class _Plain(str):
    """The source text of an unquoted YAML scalar, kept next to YAML's reading of it.

    YAML 1.1 (PyYAML) reads ``no``/``off`` as false, ``12:30`` as 750, ``010`` as 8 and ``1.10`` as
    1.1; a string field must get what was written instead. ``typed`` is YAML's value."""

    typed: Any


def _load_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(typed, written)``: the config as YAML types it, and the same mapping with every unquoted
    top-level scalar (and unquoted list item) replaced by a :class:`_Plain` of its source text.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a
    directory, undecodable bytes, invalid YAML, a top level that is not a mapping, a file that sets
    no field (empty, only comments, ``{}``), or a key given twice.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; the first argument must be a YAML config file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (the first argument must be a YAML config file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(config, (dict, type(None))):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(config).__name__}")
    if not config:  # nothing set: the run would be transformers' defaults (AdamW at 5e-5), not a recipe
        raise ValueError(f"config file {path} sets no field (it is empty or only comments); expected a mapping of field: value")
    written: dict[str, Any] = dict(config)
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else []:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = key_node.value
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ValueError(f"config file {path}: key '{key}' is given twice (lines {seen[key]} and {line})")
        seen[key] = line
    for key, value_node in _value_nodes(node).items():
        if key in config:
            written[key] = _written(config[key], value_node)
    return config, written


def _value_nodes(node: Any) -> dict[str, Any]:
    """Key text -> value node of a YAML mapping node, with merge keys (``<<: *anchor``,
    ``<<: [*a, *b]``, ``<<: {...}``) resolved by PyYAML's own ``flatten_mapping`` (which mutates
    ``node``), so each key's node is the one whose value ``yaml.safe_load`` kept."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    yaml.constructor.SafeConstructor().flatten_mapping(node)
    return {key_node.value: value_node for key_node, value_node in node.value if isinstance(key_node, yaml.ScalarNode)}


def _written(value: Any, node: Any) -> Any:
    """``value`` with unquoted scalars replaced by their source text (see :func:`_load_config`)."""
    if isinstance(node, yaml.ScalarNode):
        if value is None or isinstance(value, str) or node.style is not None:
            return value
        plain = _Plain(node.value)
        plain.typed = value
        return plain
    if isinstance(node, yaml.SequenceNode) and isinstance(value, list) and len(value) == len(node.value):
        return [_written(v, n) for v, n in zip(value, node.value)]
    return value


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


def _scalar_text(key: str, value: Any, action: argparse.Action) -> str:
    """The command-line text of one config value for ``action``'s field.

    An unquoted scalar goes in as written, except where YAML's typing is what the field wants: a
    YAML boolean for a bool field (``no``/``off`` -> ``false``) and a YAML number for a numeric field
    (``0x10``, ``.inf``, ``1_000``)."""
    if isinstance(value, _Plain):
        typed = value.typed
        if isinstance(typed, bool):
            return str(typed).lower() if action.type is string_to_bool else str(value)
        if isinstance(typed, (int, float)) and action.type in (int, float):
            return repr(typed) if isinstance(typed, float) else str(typed)
        return str(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict) and key == "optim_args":  # axolotl's style, {momentum: 0.9}: the key=value string
        return ",".join(f"{name}={str(item).lower() if isinstance(item, bool) else item}" for name, item in value.items())
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def config_to_cli_tokens(config: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """Turn a config mapping into ``--field=value`` tokens for ``parser``.

    Unquoted scalars go in as written (so ``save_strategy: no`` is ``no`` and ``run_name: 1.10`` is
    ``1.10``), except that YAML booleans become ``true``/``false`` for bool fields and YAML numbers
    feed numeric fields; mappings become JSON (TrainingArguments parses JSON for its dict fields
    such as ``gradient_checkpointing_kwargs``), except ``optim_args``, whose mapping becomes its
    ``key=value,...`` string. ``--field=value`` keeps a value that starts with
    ``-`` a value. Lists are for fields that take several values and are set as that field's default
    (converted and checked here: argparse would read an item starting with ``-`` as an option), so a
    command-line override still wins. ``null`` keeps the field's default.
    """
    actions = {action.dest: action for action in parser._actions}
    tokens: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        action = actions[key]
        if isinstance(value, (list, tuple)):
            if action.nargs not in ("+", "*"):
                raise ValueError(f"config key '{key}' takes a single value, got the list {list(value)!r}")
            if not value:
                continue
            parser.set_defaults(**{action.dest: [_list_item(key, item, action) for item in value]})
            continue
        tokens.append(f"--{key}={_scalar_text(key, value, action)}")
    return tokens


def _list_item(key: str, item: Any, action: argparse.Action) -> Any:
    """One item of a list-valued config key, converted by ``action``'s type and checked against its choices."""
    if item is None or isinstance(item, (list, dict)):
        raise ValueError(f"config key '{key}': list item {item!r} is not a single value")
    text = _scalar_text(key, item, action)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"config key '{key}': invalid list item {text!r} ({err})") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"config key '{key}': invalid list item {text!r} (choose from {list(action.choices)})")
    return converted


def _installed_names(config: dict[str, Any], path: str) -> dict[str, Any]:
    """``config`` with its keys named as the installed ``TrainingArguments`` names them; ``ValueError`` for two
    keys that name one field there (``activation_checkpointing`` and ``gradient_checkpointing`` on 4.57)."""
    renamed: dict[str, Any] = {}
    first: dict[str, str] = {}
    for key, value in config.items():
        name = training_argument_name(key)
        if name in renamed:
            raise ValueError(f"config file {path}: keys '{first[name]}' and '{key}' set the same field ({name})")
        renamed[name], first[name] = value, key
    return renamed


def _installed_name(token: str) -> str:
    """A command-line token with its ``--field`` named as the installed ``TrainingArguments`` names it."""
    if not token.startswith("--"):
        return token
    name, sep, value = token[2:].partition("=")
    return f"--{training_argument_name(name)}{sep}{value}"


def mixed_precision_on_the_cpu(parser: argparse.ArgumentParser, tokens: Sequence[str]) -> list[str]:
    """``["--use_cpu", "true"]`` where ``tokens`` ask for bf16 mixed precision, leave ``use_cpu`` unset and torch finds
    no accelerator; else ``[]``. transformers refuses bf16 there unless told ``use_cpu`` (then it trains under CPU
    autocast, about 2.3x faster than float32 for SmolLM2-135M on AVX512-BF16 cores); a recipe's ``bf16: true`` runs as
    written on a GPU and on this CPU alike. Says so in one line."""
    import torch

    namespace, _ = parser.parse_known_args(list(tokens))
    if not getattr(namespace, "bf16", False) or getattr(namespace, "use_cpu", False):
        return []
    if "--use_cpu" in {token.split("=", 1)[0] for token in tokens}:
        return []
    try:
        if torch.accelerator.current_accelerator() is not None:
            return []
    except RuntimeError:  # torch 2.6 on a CPU-only build
        pass
    print("bf16 mixed precision and no GPU: use_cpu set to True (CPU autocast); --bf16 false trains in float32", flush=True)
    return ["--use_cpu", "true"]


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
    config_path, overrides = argv[0], [_installed_name(token) for token in argv[1:]]
    config, written = (_installed_names(mapping, config_path) for mapping in _load_config(config_path))
    fields = known_fields(dataclass_types)
    check_config_keys(config, fields, source=f"config file {config_path}")
    override_keys = {tok[2:].split("=", 1)[0]: None for tok in overrides if tok.startswith("--")}
    check_config_keys(override_keys, fields, source="the command line")

    tokens = config_to_cli_tokens(written, parser) + overrides
    tokens += mixed_precision_on_the_cpu(parser, tokens)
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=tokens, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ValueError(f"unexpected command-line arguments {remaining}; {USAGE.format(prog=prog)}")
    return tuple(parsed)
