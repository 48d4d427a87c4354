"""``--optim adam_mini``: the official Adam-mini (``adam-mini`` package) as a Trainer optimizer. Adam-mini partitions
parameters by *name* and needs the attention shape, so :class:`AdamMiniFactory` is an optimizer factory given the model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

__all__ = ["AdamMiniFactory", "adam_mini_name", "attention_shape", "require_adam_mini"]

INSTALL_HINT = "pip install 'sai-hf[adam-mini]'  (or: pip install adam-mini==1.1.1)"


def require_adam_mini() -> None:
    """Raise ``ImportError`` naming the extra to install when ``adam-mini`` is missing."""
    if importlib.util.find_spec("adam_mini") is None:
        raise ImportError(f"--optim adam_mini needs the adam-mini package: {INSTALL_HINT}")


def attention_shape(model: torch.nn.Module) -> dict[str, int | None]:
    """``dim``, ``n_heads``, ``n_kv_heads`` from ``model.config`` (``hidden_size``, ``num_attention_heads``, ...)."""
    config = getattr(model, "config", None)
    dim = getattr(config, "hidden_size", None)
    n_heads = getattr(config, "num_attention_heads", None)
    if dim is None or n_heads is None:
        raise ValueError(
            "--optim adam_mini needs model.config.hidden_size and model.config.num_attention_heads "
            f"(got a {type(model).__name__} without them)"
        )
    return {"dim": int(dim), "n_heads": int(n_heads), "n_kv_heads": getattr(config, "num_key_value_heads", None)}


def adam_mini_name(name: str, param: torch.Tensor, index: int) -> str:
    """The name Adam-mini sees for ``param``: its own, except for PEFT adapter tensors, which become
    ``adapter.<index>.linear`` (a matrix: per-row rule) or ``adapter.<index>.vector``: matched by substring, a LoRA
    factor of ``q_proj`` was cut into attention heads and crashed."""
    if "lora_" not in name:
        return name
    return f"adapter.{index}.linear" if param.dim() == 2 else f"adapter.{index}.vector"


class AdamMiniFactory:
    """Builds ``adam_mini.Adam_mini`` for a model: ``AdamMiniFactory()(model, lr=..., ...)``."""

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        require_adam_mini()
        from adam_mini import Adam_mini

        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        named = [(adam_mini_name(name, p, i), p) for i, (name, p) in enumerate(trainable)]
        return Adam_mini(named_parameters=named, verbose=False, **attention_shape(model), **kwargs)
