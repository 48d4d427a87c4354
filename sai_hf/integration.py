"""Registration of sai-hf's optimizers as ``--optim`` names in ``transformers`` (4.57 or 5.x), as data: one
:class:`OptimizerRegistration` per optimizer in :data:`REGISTRY`. Registration comes in two parts, one per module of
transformers, each idempotent; ``import sai_hf`` runs each when transformers loads that module (or at once where it
already did), :func:`register` runs both now.

:func:`register_training_arguments` (``transformers.training_args``) adds each name as a member of ``OptimizerNames``,
so ``TrainingArguments(optim=...)`` and its subclasses validate it and ``HfArgumentParser`` lists it. transformers has
no supported way to add an ``--optim`` name: the member is added to the enum's tables. It pickles as
``getattr(OptimizerNames, NAME, "name")``, so a checkpoint's ``training_args.bin`` unpickles without sai_hf (as the
plain string).

:func:`register_trainer` (``transformers.trainer``) adds each name as a handler in the table
``Trainer.get_optimizer_cls_and_kwargs`` consults (:func:`sai_hf.compat.optimizer_handlers`:
``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` on 5.2+), and appends :class:`OptimArgsCheck`,
:class:`ImportedSchedulerAlignment` and :class:`sai_hf.callback.AutoGSNRCallback` to
``transformers.trainer.DEFAULT_CALLBACKS``, so every Trainer gets them. This module imports no transformers itself: the
two callback classes subclass ``TrainerCallback`` and are built on first access (PEP 562 ``__getattr__``).

With the first part ``TrainingArguments.__post_init__`` (its subclasses call it) checks ``--optim_args`` too
(:func:`check_optim_args_when_built`): a script fails where it parses its arguments, before it prepares its data.
The same hook makes a multi-process launch on a machine without an accelerator one job (:func:`train_together_on_cpu`:
``use_cpu``) and connects DeepSpeed to its process group before ``from_pretrained`` runs
(:func:`connect_deepspeed_to_process_group`).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import align_scheduler, remember_parameter_order
from .compat import check_installed_transformers, optimizer_handlers
from .sharding import refuse_unsupported_setup
from .deepspeed import deepspeed_in_use, refuse_unsupported_deepspeed
from .optim_args import (
    OptionSpec, optim_args_source, parse_bool, parse_dtype, parse_float, parse_optim_args, parse_optional_bool, parse_str,
)
from .optimizer import SGDSaI, find_sgd_sai, validate_hyperparameters

__all__ = ["OptimizerRegistration", "REGISTRY", "OptimArgsCheck", "ImportedSchedulerAlignment", "register",
           "register_training_arguments", "register_trainer", "optimizer_kwargs_from_args", "check_optim_args",
           "check_optim_args_when_built", "train_together_on_cpu", "connect_deepspeed_to_process_group"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerRegistration:
    """An optimizer that ``--optim NAME`` selects: ``name`` (the ``--optim`` value), ``enum_name`` (the member added to
    ``OptimizerNames``), ``optimizer_cls`` (returns the class: optional dependencies are imported only when used),
    ``options`` (the accepted ``--optim_args`` keys), ``build_kwargs`` (``(args, parsed_optim_args) -> constructor
    kwargs``, raising ``ValueError`` naming the offending key), ``check_options`` (the part of ``build_kwargs``'s
    checks that needs only the parsed ``--optim_args``: :func:`check_optim_args`)."""

    name: str
    enum_name: str
    optimizer_cls: Callable[[], type]
    options: Mapping[str, OptionSpec] = field(default_factory=dict)
    build_kwargs: Callable[[Any, dict[str, Any]], dict[str, Any]] = lambda args, options: dict(options)
    check_options: Callable[[dict[str, Any]], None] = lambda options: None


def _check_sgd_sai_options(options: dict[str, Any]) -> None:
    """The optimizer's own range checks of parsed ``--optim_args`` (e.g. momentum=2), naming ``--optim_args``."""
    _validated(optim_args_source(SGD_SAI.name), **{k: v for k, v in options.items() if k != "maximize"})


def _validated(source: str, **values: Any) -> None:
    """:func:`validate_hyperparameters` of ``values``, its ``ValueError`` naming where they came from (``source``: the
    ``TrainingArguments`` flag, or ``--optim_args``)."""
    try:
        validate_hyperparameters(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def _sgd_sai_kwargs(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    _check_sgd_sai_options(options)
    _validated("--learning_rate", lr=args.learning_rate)
    _validated("--weight_decay", weight_decay=args.weight_decay)
    return {"lr": args.learning_rate, **options}


SGD_SAI = OptimizerRegistration(
    name="sgd_sai",
    enum_name="SGD_SAI",
    optimizer_cls=lambda: SGDSaI,
    options={
        "momentum": OptionSpec(parse_float, "momentum coefficient in [0, 1) (default 0.9)"),
        "eps": OptionSpec(parse_float, "added to the gradient std in the g-SNR (default 1e-8)"),
        "normalize": OptionSpec(parse_str, "'none' (official sgd-sai scales, default) or 'max' (paper)"),
        "maximize": OptionSpec(parse_bool, "maximize the objective (default false)"),
        "scale_rule": OptionSpec(
            parse_str, "'gsnr' (default) or 'sqrt_numel' (the authors' later v1.1.0-nightly: sqrt(numel) for g-SNR)"
        ),
        "foreach": OptionSpec(parse_optional_bool, "multi-tensor kernels: true/false/none (default none)"),
        "fused": OptionSpec(parse_optional_bool, "one-pass fused kernel: true/false/none (default none: where it applies)"),
        "momentum_dtype": OptionSpec(parse_dtype, "momentum buffer dtype: bf16/fp32/fp16/none (default none: the parameter's)"),
    },
    build_kwargs=_sgd_sai_kwargs,
    check_options=_check_sgd_sai_options,
)


def _adam_mini_kwargs(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    from .adam_mini_factory import require_adam_mini

    require_adam_mini()
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **options,
    }
    _validated("--learning_rate", lr=kwargs["lr"])
    _validated("--adam_epsilon", eps=kwargs["eps"])
    _validated("--weight_decay", weight_decay=kwargs["weight_decay"])
    return kwargs


def _adam_mini_factory() -> type:
    from .adam_mini_factory import AdamMiniFactory

    return AdamMiniFactory


ADAM_MINI = OptimizerRegistration(
    name="adam_mini",
    enum_name="ADAM_MINI",
    optimizer_cls=_adam_mini_factory,
    options={},
    build_kwargs=_adam_mini_kwargs,
)

#: Every optimizer sai-hf registers, by ``--optim`` name.
REGISTRY: dict[str, OptimizerRegistration] = {entry.name: entry for entry in (SGD_SAI, ADAM_MINI)}


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return optim.value if isinstance(optim, enum.Enum) else str(optim)


def optimizer_kwargs_from_args(args: Any) -> tuple[type, dict[str, Any]] | None:
    """``(optimizer class, kwargs)`` for ``args.optim`` if sai-hf registered it, else ``None``.

    Raises ``ValueError`` naming the offending key for a bad ``--optim_args`` or hyperparameter.
    """
    entry = REGISTRY.get(_optim_name(args))
    if entry is None:
        return None
    options = parse_optim_args(args.optim_args, entry.options, entry.name)
    return entry.optimizer_cls(), entry.build_kwargs(args, options)


def check_optim_args(optim: str, optim_args: str | None) -> None:
    """``ValueError`` naming the key if ``optim_args`` are bad for sai-hf's optimizer ``optim`` (nothing for other
    names): the check of a framework config, before any ``TrainingArguments`` exist (:mod:`sai_hf.axolotl`)."""
    entry = REGISTRY.get(optim)
    if entry is not None:
        entry.check_options(parse_optim_args(optim_args, entry.options, entry.name))


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """The optimizer-handler table's entry: Trainer's ``lr`` plus the validated ``--optim_args``."""
    found = optimizer_kwargs_from_args(ctx.args)
    if found is None:  # pragma: no cover - only registered names are routed here
        raise ValueError(f"sai-hf has no optimizer named {_optim_name(ctx.args)!r}")
    optimizer_cls, kwargs = found
    if ctx.model is not None:  # lets an official sgd-sai checkpoint over model.parameters() be mapped onto these groups
        remember_parameter_order(ctx.model)
    ctx.optimizer_kwargs.update(kwargs)
    return optimizer_cls, ctx.optimizer_kwargs


def _add_enum_member(enum_cls: type[enum.Enum], member_name: str, value: str) -> None:
    """Add ``member_name = value`` to an existing ``(str, Enum)`` class (no-op if present)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    # Pickled (training_args.bin in every Trainer checkpoint) as getattr(OptimizerNames, NAME, value):
    # the member where sai_hf registered it, the plain string elsewhere, instead of an
    # OptimizerNames(value) that fails to unpickle without `import sai_hf`.
    member.__reduce_ex__ = lambda protocol: (getattr, (enum_cls, member_name, value))
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, member_name, member)
    enum_cls._member_map_[member_name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member_name)


class _OptimArgsCheckEvents:
    """Rejects a bad ``--optim_args`` for a sai-hf optimizer at the end of ``Trainer.__init__`` (the Trainer reads them
    only inside ``train()``), and for SGD-SaI the setups that :func:`sai_hf.sharding.refuse_unsupported_setup` (FSDP1
    ``use_orig_params=False``) and :func:`sai_hf.deepspeed.refuse_unsupported_deepspeed` refuse (DeepSpeed NVMe
    offload, optimizer offload without ``"zero_force_ds_cpu_optimizer": false``, an ``optimizer`` section, ...),
    naming the key and what to use instead."""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        found = optimizer_kwargs_from_args(args)
        if found is not None and issubclass(found[0], SGDSaI):
            refuse_unsupported_setup(args)
            refuse_unsupported_deepspeed(args)


class _ImportedSchedulerAlignmentEvents:
    """When training begins (after the Trainer loaded a checkpoint), :func:`sai_hf.checkpoint.align_scheduler`: an
    official ``SGD_sai(model.parameters())`` run resumed with ``--optim sgd_sai`` keeps its schedule on both groups."""

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        optimizer = find_sgd_sai(optimizer)
        while lr_scheduler is not None and hasattr(lr_scheduler, "scheduler"):
            lr_scheduler = lr_scheduler.scheduler  # accelerate's AcceleratedScheduler
        if isinstance(optimizer, SGDSaI) and lr_scheduler is not None:
            align_scheduler(optimizer, lr_scheduler)


#: The ``TrainerCallback`` subclasses of this module, ``OptimArgsCheck`` and ``ImportedSchedulerAlignment``: their
#: events, made into classes on first access (:func:`_trainer_callback`).
_TRAINER_CALLBACKS = {"OptimArgsCheck": _OptimArgsCheckEvents, "ImportedSchedulerAlignment": _ImportedSchedulerAlignmentEvents}


@functools.cache
def _trainer_callback(name: str) -> type:
    """The ``TrainerCallback`` subclass ``name`` (built once; imports transformers' ``trainer_callback``)."""
    from transformers import TrainerCallback

    events = _TRAINER_CALLBACKS[name]
    # __qualname__: pickled by name, found again through this module's __getattr__
    return type(name, (events, TrainerCallback), {"__module__": __name__, "__qualname__": name, "__doc__": events.__doc__})


def __getattr__(name: str) -> Any:
    if name in _TRAINER_CALLBACKS:
        return _trainer_callback(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_optim_args_when_built(training_args_cls: type) -> None:
    """Make ``training_args_cls.__post_init__`` end with :func:`optimizer_kwargs_from_args` (idempotent): arguments
    built or parsed with a sai-hf ``--optim`` and a bad ``--optim_args`` (or hyperparameter) raise the ``ValueError``
    naming the key right there. :class:`OptimArgsCheck` checks again when a Trainer is built, for changes since.

    For every ``--optim``, it also starts with :func:`train_together_on_cpu` (before transformers sets up the devices
    and the process group) and ends with :func:`connect_deepspeed_to_process_group`."""
    post_init = training_args_cls.__post_init__
    if getattr(post_init, "_sai_hf_checks_optim_args", False):
        return

    @functools.wraps(post_init)
    def __post_init__(self: Any) -> None:
        train_together_on_cpu(self)
        post_init(self)
        connect_deepspeed_to_process_group(self)
        optimizer_kwargs_from_args(self)

    __post_init__._sai_hf_checks_optim_args = True  # type: ignore[attr-defined]
    training_args_cls.__post_init__ = __post_init__  # type: ignore[attr-defined]


def _world_size_from_environment() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def _no_distributed_accelerator() -> bool:
    """Whether accelerate finds no device it can train several processes on (no CUDA, XPU, NPU, HPU, ...; MPS has no
    distributed backend): accelerate then runs each process alone unless told ``cpu``. A TPU (torch_xla) counts as one."""
    from transformers.utils import is_torch_xla_available

    if is_torch_xla_available():
        return False
    try:
        from accelerate.utils.imports import get_distributed_backend, get_torch_accelerator_backend
    except ImportError:  # an older accelerate: the accelerator torch reports
        import torch

        try:
            device = torch.accelerator.current_accelerator()
        except RuntimeError:  # torch 2.6 on a CPU-only build
            device = None
        return device is None or device.type == "mps"
    return get_distributed_backend(get_torch_accelerator_backend()[0]) is None


def train_together_on_cpu(args: Any) -> None:
    """Set ``args.use_cpu`` where the launch started several processes (``WORLD_SIZE`` > 1: torchrun, accelerate
    launch, the deepspeed launcher) on a machine without an accelerator, and nothing asked for the CPU.

    Without it transformers (with accelerate) counts a world size of 1 in each process: the processes train apart,
    each on the whole data set, and all write the same ``output_dir``. ``accelerate launch --config_file
    configs/accelerate/cpu-ddp.yaml`` is such a launch: accelerate (1.16) does not pass the YAML's ``use_cpu: true``
    on to the processes it starts. With ``use_cpu`` they are one job over gloo (DDP, or DeepSpeed); the main process
    says so in one line. Called before transformers' own ``__post_init__``, which sets the devices up."""
    if getattr(args, "use_cpu", True) or _env_flag("ACCELERATE_USE_CPU"):
        return
    world_size = _world_size_from_environment()
    if world_size <= 1 or not _no_distributed_accelerator():
        return
    args.use_cpu = True
    if os.environ.get("RANK", "0") == "0":
        logger.warning(
            "sai_hf: %d processes (WORLD_SIZE=%d) and no GPU: use_cpu set to True, so they train as one job over gloo "
            "on the CPU (transformers would train each alone); pass --use_cpu true to say so yourself",
            world_size, world_size,
        )  # fmt: skip


def connect_deepspeed_to_process_group(args: Any) -> None:
    """Hand DeepSpeed the process group transformers started, where it has none yet (``deepspeed.init_distributed``).

    With ``use_cpu`` (a CPU-only machine) transformers starts the process group with torch.distributed itself, not
    through DeepSpeed; ``from_pretrained`` under a ZeRO-3 config then builds ``deepspeed.zero.Init``, whose
    DeepSpeedConfig reads the world size from DeepSpeed's own communication backend before creating it, counts 1,
    and fails ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 1 * 1 *
    1"), with any optimizer. ``deepspeed.initialize`` would connect the two later, inside the Trainer. Does nothing
    without DeepSpeed in use, without a process group, or when DeepSpeed already has one (the GPU path)."""
    if not deepspeed_in_use(args):
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        from deepspeed import comm as deepspeed_comm
    except ImportError:  # not installed: the Trainer says so itself
        return
    if not deepspeed_comm.is_initialized():
        deepspeed_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def register() -> None:
    """Make every :data:`REGISTRY` name a valid ``--optim`` in transformers now (idempotent): both parts of the
    registration at once, importing transformers' ``Trainer``. ``import sai_hf`` already runs each part when
    transformers loads its module; this is for code that wants them in place before that."""
    from transformers import trainer, training_args

    register_training_arguments(training_args)
    register_trainer(trainer)


def register_training_arguments(training_args: Any) -> None:
    """Register with ``transformers.training_args`` (the module ``training_args``; idempotent): every :data:`REGISTRY`
    name an ``OptimizerNames`` member, and :func:`check_optim_args_when_built` on ``TrainingArguments``. Uses no other
    module of transformers: ``import sai_hf`` runs it as soon as this one is loaded, which may be in the middle of
    importing ``transformers.trainer`` or ``transformers.trainer_callback``."""
    check_installed_transformers()
    for entry in REGISTRY.values():
        _add_enum_member(training_args.OptimizerNames, entry.enum_name, entry.name)
    check_optim_args_when_built(training_args.TrainingArguments)


def register_trainer(trainer: Any) -> None:
    """Register with ``transformers.trainer`` (the module ``trainer``, loaded after ``transformers.training_args``, whose
    registration this expects; idempotent): every :data:`REGISTRY` name in the optimizer-handler table, and sai-hf's
    callbacks in ``DEFAULT_CALLBACKS``."""
    from transformers.training_args import OptimizerNames

    from .callback import AutoGSNRCallback

    handlers = optimizer_handlers()
    for entry in REGISTRY.values():
        handlers[OptimizerNames(entry.name)] = _handler
    callbacks = (_trainer_callback("OptimArgsCheck"), _trainer_callback("ImportedSchedulerAlignment"), AutoGSNRCallback)
    for callback_cls in callbacks:
        if callback_cls not in trainer.DEFAULT_CALLBACKS:
            trainer.DEFAULT_CALLBACKS.append(callback_cls)
