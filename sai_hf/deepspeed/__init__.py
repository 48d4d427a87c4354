"""The DeepSpeed adapter: everything DeepSpeed-specific, and nothing the optimizer has to know. A layer above the
optimizer: the core never imports it; when ``deepspeed`` is imported (before or after ``sai_hf``; ``sai_hf``'s import
hook), :func:`register_backends` puts its flat-partition backends first in :data:`sai_hf.sharding.BACKENDS`.

==========================  ===================================================================
module                      what it holds
==========================  ===================================================================
:mod:`.partitions`          the sequence every ZeRO stage shares: blocks in flat fp32 partitions
                            stepped one call each, step counts, momentum buffers, the later
                            partitions measured at the first scaling step (DeepSpeed's unscale
                            and clip factor)
:mod:`.zero12`              ZeRO-1/2: fragments of one partition per parameter group (DeepSpeed's
                            optimizer given by :func:`find_zero_optimizer`)
:mod:`.zero3`               ZeRO-3 (and offload): per-parameter pieces of sub-group partitions
:mod:`.config`              the DeepSpeed configurations refused before training
==========================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..optimizer import SGDSaI
from ..sharding import add_backends
from .config import deepspeed_config, deepspeed_in_use, refuse_unsupported_deepspeed
from .partitions import Partitions, unscale_factor
from .zero3 import Zero3Partitions
from .zero12 import ZeroFragments

__all__ = [
    "Partitions", "ZeroFragments", "Zero3Partitions", "unscale_factor", "deepspeed_config", "deepspeed_in_use",
    "refuse_unsupported_deepspeed", "register_backends", "find_zero_optimizer",
]  # fmt: skip


def register_backends(deepspeed: Any = None) -> None:
    """Put the ZeRO-1/2 and ZeRO-3 backends ahead of the per-tensor ones (idempotent). ``deepspeed``: the module,
    as the import hook passes it (unused)."""
    add_backends(ZeroFragments, Zero3Partitions)


def find_zero_optimizer(sai: SGDSaI, wrappers: Sequence[Any]) -> bool:
    """Give ``sai``'s ZeRO-1/2 backend DeepSpeed's ZeRO-1/2 optimizer, where ``wrappers`` (the objects around ``sai``,
    outermost first) hold it: it holds every group's partition and the not yet flattened gradients. Whether found."""
    zero = next((w for w in wrappers if hasattr(w, "single_partition_of_fp32_groups") and hasattr(w, "averaged_gradients")), None)
    if zero is None:
        return False
    register_backends()
    fragments = sai.sharding.backend_of_type(ZeroFragments)
    assert isinstance(fragments, ZeroFragments)
    fragments.zero = zero
    return True
