"""The DeepSpeed adapter: everything DeepSpeed-specific, and nothing the optimizer has to know.

==========================  ===================================================================
module                      what it holds
==========================  ===================================================================
:mod:`.partitions`          the sequence every ZeRO stage shares: blocks in flat fp32 partitions
                            stepped one call each, step counts, momentum buffers, the later
                            partitions measured at the first scaling step (DeepSpeed's unscale
                            and clip factor)
:mod:`.zero12`              ZeRO-1/2: fragments of one partition per parameter group; DeepSpeed's
                            optimizer found among the optimizer's wrappers
:mod:`.zero3`               ZeRO-3 (and offload): per-parameter pieces of sub-group partitions
:mod:`.config`              the DeepSpeed configurations refused before training
==========================  ===================================================================
"""

from __future__ import annotations

from .config import deepspeed_config, deepspeed_in_use, refuse_unsupported_deepspeed
from .partitions import Partitions, unscale_factor
from .zero3 import Zero3Partitions
from .zero12 import ZeroFragments

__all__ = [
    "Partitions", "ZeroFragments", "Zero3Partitions", "unscale_factor", "deepspeed_config", "deepspeed_in_use",
    "refuse_unsupported_deepspeed",
]  # fmt: skip
