"""sai-hf: SGD-SaI (SGD with learning-rate Scaling at Initialization) for Hugging Face training.

``import sai_hf`` registers ``--optim sgd_sai`` with ``transformers`` (idempotent). Public API: ``SGDSaI`` (the
optimizer) and ``sgd_sai`` (its functional update); ``GSNRCallback`` (reports the scales in the Trainer's logs and
``gsnr.json``, and g-SNR drift); ``gradient_statistics``, ``gsnr_from_statistics``, ``BlockStatus`` (the g-SNR math);
``statistics_reducer``, ``register_sharded_model``, ``UnsupportedShardingError`` (exact statistics of sharded gradients
across ranks, :mod:`sai_hf.sharding`); ``register`` (re-register the ``--optim`` names).
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
    "SGDSaI", "sgd_sai", "GSNRCallback", "GSNR_FILENAME", "find_sgd_sai", "ScaleRecord", "BlockStatus", "gradient_statistics",
    "gsnr_from_statistics", "statistics_reducer", "register_sharded_model", "UnsupportedShardingError", "NORMALIZATIONS",
    "validate_hyperparameters", "OptimizerRegistration", "REGISTRY", "register", "__version__",
]  # fmt: skip

register()
