"""For `make test-frameworks` only: axolotl 0.19 on several CPU processes.

With more than one process axolotl loads the model on accelerator number LOCAL_RANK (its normalize_config sets
``device_map = {"": LOCAL_RANK}``), which fails on a machine without one ("Cannot access accelerator device when none
is available"). This plugin puts the model on the CPU instead: ``load_datasets`` is the first hook axolotl calls
after that setting and before the model is loaded. Nothing about SGD-SaI; a GPU run does not need it.
"""

from axolotl.integrations.base import BasePlugin


class CPUDeviceMapPlugin(BasePlugin):
    def load_datasets(self, cfg, preprocess=False):
        cfg.device_map = "cpu"
        return None  # axolotl loads the data itself
