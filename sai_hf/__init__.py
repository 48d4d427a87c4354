"""sai-hf: SGD-SaI (SGD with learning-rate Scaling at Initialization) for Hugging Face training.

``import sai_hf`` registers ``--optim sgd_sai`` with ``transformers`` (idempotent).

Public API:
    SGDSaI: the optimizer (``torch.optim.Optimizer``).
    sgd_sai: its functional update.
    GSNRCallback: the ``TrainerCallback`` that fixes the scales from the accumulated gradient,
        logs a summary and writes ``gsnr.json``.
    gradient_statistics, gsnr_from_statistics, BlockStatus: the g-SNR math.
    statistics_reducer, register_sharded_model, UnsupportedShardingError: exact g-SNR statistics of
        sharded gradients (FSDP2, FSDP1 ``use_orig_params=True``, DeepSpeed ZeRO-1/2) across ranks
        (:mod:`sai_hf.sharding`: one interface, one module per backend).
    register: (re-)register the ``--optim`` names.
"""

from __future__ import annotations

from .callback import GSNR_FILENAME, GSNRCallback
from .functional import sgd_sai
from .gsnr import BlockStatus, gradient_statistics, gsnr_from_statistics
from .integration import REGISTRY, OptimizerRegistration, register
from .optimizer import NORMALIZATIONS, ScaleRecord, SGDSaI, find_sgd_sai, register_sharded_model, validate_hyperparameters
from .sharding import UnsupportedShardingError, statistics_reducer

__version__ = "0.1.0"

__all__ = [
    "SGDSaI",
    "sgd_sai",
    "GSNRCallback",
    "GSNR_FILENAME",
    "find_sgd_sai",
    "ScaleRecord",
    "BlockStatus",
    "gradient_statistics",
    "gsnr_from_statistics",
    "statistics_reducer",
    "register_sharded_model",
    "UnsupportedShardingError",
    "NORMALIZATIONS",
    "validate_hyperparameters",
    "OptimizerRegistration",
    "REGISTRY",
    "register",
    "__version__",
]

register()
