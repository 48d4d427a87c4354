"""sai-hf: SGD-SaI (SGD with learning-rate Scaling at Initialization) for Hugging Face training.

``import sai_hf`` makes ``--optim sgd_sai`` a transformers optimizer name, at no cost until transformers is used: it
imports neither torch nor transformers. Where ``transformers.training_args`` (``TrainingArguments``,
``OptimizerNames``) or ``transformers.trainer`` (the ``Trainer``) is already imported, it registers there and then;
otherwise it registers each part right after transformers loads that module, before or after ``import sai_hf``
(:func:`_after_import`, :mod:`sai_hf.integration`). The DeepSpeed adapter's backends register the same way when
``deepspeed`` loads (:mod:`sai_hf.deepspeed`). Every public name is imported on first access (PEP 562).

Public API: ``SGDSaI`` (the optimizer) and ``sgd_sai`` (its functional update); ``GSNRCallback`` (reports the scales in
the Trainer's logs and ``gsnr.json``, and g-SNR drift); ``gradient_statistics``, ``gsnr_from_statistics``,
``BlockStatus`` (the g-SNR math); ``statistics_reducer``, ``register_sharded_model``, ``UnsupportedShardingError``
(exact statistics of sharded gradients across ranks, :mod:`sai_hf.sharding`); ``register`` (register the ``--optim``
names now, importing transformers' Trainer; idempotent).
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

#: Each public name -> the submodule that defines it, imported on first access.
_EXPORTS = {
    "SGDSaI": "optimizer", "find_sgd_sai": "optimizer", "ScaleRecord": "optimizer", "NORMALIZATIONS": "optimizer",
    "register_sharded_model": "sharded_model", "validate_hyperparameters": "optimizer",
    "sgd_sai": "functional",
    "GSNRCallback": "callback", "GSNR_FILENAME": "callback",
    "BlockStatus": "gsnr", "gradient_statistics": "gsnr", "gsnr_from_statistics": "gsnr",
    "statistics_reducer": "sharding", "UnsupportedShardingError": "sharding",
    "OptimizerRegistration": "integration", "REGISTRY": "integration", "register": "integration",
}  # fmt: skip

__all__ = [
    "SGDSaI", "sgd_sai", "GSNRCallback", "GSNR_FILENAME", "find_sgd_sai", "ScaleRecord", "BlockStatus", "gradient_statistics",
    "gsnr_from_statistics", "statistics_reducer", "register_sharded_model", "UnsupportedShardingError", "NORMALIZATIONS",
    "validate_hyperparameters", "OptimizerRegistration", "REGISTRY", "register", "__version__",
]  # fmt: skip


def __getattr__(name: str) -> object:
    """A public name (from its submodule), or a submodule (``sai_hf.callback``), imported on first access."""
    submodule = _EXPORTS.get(name)
    if submodule is not None:
        value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# --------------------------------------------------------------------------- registration when a framework loads
#: Modules of transformers and DeepSpeed -> the submodule and function that registers with each: the ``OptimizerNames``
#: members and ``TrainingArguments``' checks; the optimizer handlers and ``DEFAULT_CALLBACKS`` (:mod:`sai_hf.integration`);
#: the ZeRO backends (:mod:`sai_hf.deepspeed`). In import order: ``transformers.trainer`` imports
#: ``transformers.training_args``.
_REGISTRATIONS = {
    "transformers.training_args": ("integration", "register_training_arguments"),
    "transformers.trainer": ("integration", "register_trainer"),
    "deepspeed": ("deepspeed", "register_backends"),
}

#: Called with the exception where registering fails while transformers loads one of :data:`_REGISTRATIONS`' modules;
#: ``None``: the exception propagates out of that import (as out of ``import sai_hf`` where transformers was loaded).
#: The children's ``sitecustomize`` (``child_site/``) sets it to write one line and go on. A failure to register the
#: DeepSpeed adapter always propagates out of ``import deepspeed``: without its backends, ZeRO's flat partitions would
#: be scaled as whole tensors.
_on_registration_error = None  # Callable[[Exception], None] | None

#: The modules of :data:`_REGISTRATIONS` whose registration is still to run (when they load).
_pending: set[str] = set()


def _register_with(name: str, module: object) -> None:
    """Run the registration that ``module`` (the framework's module ``name``) needs."""
    submodule, function = _REGISTRATIONS[name]
    getattr(importlib.import_module(f"{__name__}.{submodule}"), function)(module)


class _RegisteringLoader:
    """Wraps the loader of one of transformers' modules: executes it, then registers with it. The module keeps its
    own loader (``__loader__``, ``__spec__.loader``); every other attribute is the wrapped loader's."""

    def __init__(self, loader: object, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attribute: str) -> object:
        return getattr(self._loader, attribute)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if self._name not in _pending:  # registered meanwhile (sai_hf.register() during the import)
            return
        _pending.discard(self._name)
        try:
            _register_with(self._name, module)
        except Exception as err:
            framework = self._name.split(".")[0]
            if _on_registration_error is None or framework != "transformers":
                _pending.add(self._name)  # the import fails, and so runs again next time: so does the registration
                raise
            _pending.difference_update([name for name in _REGISTRATIONS if name.startswith("transformers")])  # one report
            _on_registration_error(err)


class _AfterImport:
    """A ``sys.meta_path`` finder (first on it) that asks the finders after it for the modules in :data:`_pending`
    and hands their specs back with a :class:`_RegisteringLoader`; it finds nothing itself."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in _pending:
            return None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module") and not isinstance(spec.loader, _RegisteringLoader):
            spec.loader = _RegisteringLoader(spec.loader, name)
        return spec

    def invalidate_caches(self) -> None:
        pass


def _after_import() -> None:
    """Register with each of :data:`_REGISTRATIONS`' modules that transformers already loaded; the others, when it does."""
    for name in _REGISTRATIONS:
        module = sys.modules.get(name)
        if module is None:
            _pending.add(name)
        else:
            _pending.discard(name)
            _register_with(name, module)
    if _pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


_after_import()
