"""``--optim_args "key=value,key=value"`` for sai-hf's optimizers: every key looked up in the optimizer's table of
:class:`OptionSpec`, every value converted, so that a typo fails with a ``ValueError`` naming the key before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OptionSpec", "optim_args_source", "parse_bool", "parse_dtype", "parse_float", "parse_optional_bool", "parse_optim_args",
    "parse_str",
]


@dataclass(frozen=True)
class OptionSpec:
    """One accepted ``--optim_args`` key: how to turn its string into a value."""

    parse: Callable[[str], Any]
    help: str = ""


#: ``"0.9"`` -> 0.9 (any Python float literal).
parse_float = float


def parse_bool(text: str) -> bool:
    """``true/false/1/0/yes/no`` (any case) -> bool."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_optional_bool(text: str) -> bool | None:
    """Like :func:`parse_bool`, plus ``none`` -> None (let the optimizer decide)."""
    return None if text.strip().lower() == "none" else parse_bool(text)


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float16": "float16",
           "fp16": "float16"}  # fmt: skip


def parse_dtype(text: str) -> Any:
    """``bf16/bfloat16/fp32/float32/fp16/float16`` -> the ``torch.dtype``; ``none`` -> None."""
    import torch

    lowered = text.strip().lower()
    if lowered == "none":
        return None
    if lowered not in _DTYPES:
        raise ValueError(f"expected one of {sorted(_DTYPES)} or none, got {text!r}")
    return getattr(torch, _DTYPES[lowered])


def parse_str(text: str) -> str:
    """A choice (``normalize``, ``scale_rule``), in any case: lowercased (the optimizer checks the value)."""
    return text.strip().lower()


def optim_args_source(optimizer: str) -> str:
    """How an error message names a value that came from ``--optim_args`` for ``optimizer`` (the ``--optim`` name)."""
    return f"--optim_args for {optimizer}"


def parse_optim_args(text: str | None, options: Mapping[str, OptionSpec], optimizer: str) -> dict[str, Any]:
    """``text`` (``None`` or empty: no options) parsed by ``options``, the accepted keys of ``optimizer`` (the
    ``--optim`` name); ``ValueError`` naming the offending key. Every entry is one ``key=value``, as transformers splits
    them (it crashes inside ``train()`` on an empty entry or a second ``=``)."""
    parsed: dict[str, Any] = {}
    if not text:
        return parsed
    prefix = optim_args_source(optimizer)
    if not text.strip():
        raise ValueError(f"{prefix}: {text!r} is blank; leave --optim_args out, or give key=value entries")
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(
                f"{prefix}: empty entry in {text!r} (a trailing, leading or doubled comma); "
                "write key=value entries separated by single commas"
            )
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{prefix}: entry {item!r} is not of the form key=value")
        if "=" in value:
            raise ValueError(f"{prefix}: entry {item!r} has more than one '='; write one key=value per entry")
        if key not in options:
            raise ValueError(f"{prefix}: unknown key {key!r}; accepted keys: {sorted(options)}")
        if key in parsed:
            raise ValueError(f"{prefix}: key {key!r} given twice")
        if not value.strip():
            raise ValueError(f"{prefix}: key {key!r} has no value ({item!r})")
        try:
            parsed[key] = options[key].parse(value.strip())
        except ValueError as err:
            raise ValueError(f"{prefix}: cannot parse {key}={value.strip()!r}: {err}") from None
    return parsed
