"""Test-only shim: let Accelerate (and so ``Trainer``) run FSDP on CPU processes (gloo).

Accelerate enables FSDP only for accelerator device types (its ``AcceleratorState`` leaves a CPU
run as ``MULTI_CPU`` even when an FSDP plugin is configured). torch's FSDP2 (``fully_shard``) works
on CPU with gloo, so for the tests we turn such a state into ``FSDP`` with the configured plugin;
every FSDP code path of Accelerate and Trainer (sharding, DTensor gradients, sharded checkpoints)
then runs unchanged. Not needed, and not used, on GPUs.
"""

from __future__ import annotations

import os

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def enable_fsdp_on_cpu() -> None:
    if getattr(AcceleratorState, "_sai_cpu_fsdp", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            plugin = FullyShardedDataParallelPlugin()
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = __init__
    AcceleratorState._sai_cpu_fsdp = True
