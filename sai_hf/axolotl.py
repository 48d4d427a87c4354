"""``optimizer: sgd_sai`` in axolotl: the plugin ``sai_hf.axolotl.SGDSaIPlugin`` (configs/frameworks/README.md)::

    plugins:
      - sai_hf.axolotl.SGDSaIPlugin
    optimizer: sgd_sai
    optim_args: {momentum: 0.9}

axolotl loads the plugin in each process it starts and calls its ``register(cfg)`` before it loads data or a model: it
registers the ``--optim`` names and checks ``optim_args``. The class subclasses axolotl's ``BasePlugin``, so it is built
on first access: importing this module needs no axolotl.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

__all__ = ["SGDSaIPlugin", "optim_args_text"]


def optim_args_text(optim_args: Any) -> str | None:
    """axolotl's ``optim_args`` (``key=value,...`` or a mapping) as the ``--optim_args`` string it passes on."""
    if isinstance(optim_args, Mapping):
        return ",".join(f"{key}={value}" for key, value in optim_args.items())
    if optim_args is not None and not isinstance(optim_args, str):
        raise ValueError(f"optim_args: expected key=value,... or a mapping, got {optim_args!r}")
    return optim_args


def __getattr__(name: str) -> Any:
    if name == "SGDSaIPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _plugin_class() -> type:
    """``SGDSaIPlugin``, a subclass of axolotl's ``BasePlugin`` (built once; ``ImportError`` without axolotl)."""
    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as err:
        raise ImportError(f"sai_hf.axolotl.SGDSaIPlugin is an axolotl plugin: axolotl is not importable ({err})") from err

    class SGDSaIPlugin(BasePlugin):
        """Registers ``optimizer: sgd_sai`` (and sai-hf's other names) and checks their ``optim_args``."""

        def register(self, cfg: Mapping[str, Any]) -> None:
            from .integration import check_optim_args, register

            register()  # importing sai_hf did; explicit, and idempotent
            check_optim_args(str(cfg.get("optimizer")), optim_args_text(cfg.get("optim_args")))

    SGDSaIPlugin.__qualname__ = "SGDSaIPlugin"  # pickled by name: found again through this module's __getattr__
    return SGDSaIPlugin
