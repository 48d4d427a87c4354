"""``GSNRCallback``: registers the Trainer's model with :class:`sai_hf.SGDSaI` and reports the scales it fixed.

The optimizer scales each block in its own ``step()`` (a block deferred at the first step gets its scale at its first
usable gradient; one that never gets a gradient never gets a scale); the callback knows no sharding backend. After each
optimizer step in which blocks received their scale it adds ``gsnr/scale_{min,median,max}``, ``gsnr/scaled`` and
``gsnr/deferred`` to the Trainer's next log and (world process zero) rewrites ``<output_dir>/gsnr.json`` atomically,
logging where (``logging.INFO`` on the ``sai_hf.callback`` logger)::

    {"<name in model.named_parameters()>": {"gsnr": float, "scale": float, "numel": int, "gsnr_over_sqrt_numel": float}}

for every parameter with a scale, under its original name (wrapper components removed: :func:`parameter_names`) and
with the whole tensor's ``numel``. A resumed run restores the scales with the optimizer state, rewrites a missing or
different report when it starts, and adds the restored scales' ``gsnr/*`` summary to its first log.

Unless the ``sai_hf`` logger has a level of its own (the recipes set one; so may you), a run whose log level for the
process (``TrainingArguments.get_process_log_level()``) is more verbose than the logger's sets it to that level, as the
Trainer does for ``transformers``: the report's line shows where the Trainer's INFO lines do (``run_clm.py``: the main
process), and never fewer lines than the logging configuration already showed.

``import sai_hf`` adds an :class:`AutoGSNRCallback` to every Trainer (it does nothing unless the optimizer is SGD-SaI).
A hand-added ``GSNRCallback`` takes over: the automatic one stands down for that run. With several hand-added ones,
every one writes its own report, logs the summary and keeps its own drift history; two that track drift into the same
history file are refused when training starts (``ValueError`` naming the file).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import statistics
import warnings
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from .drift import drift_summary
from .optimizer import SGDSaI, StatisticsReducer, find_sgd_sai

__all__ = [
    "GSNRCallback", "AutoGSNRCallback", "find_sgd_sai", "GSNR_FILENAME", "HISTORY_FILENAME", "TRACK_EVERY_ENV",
    "checked_track_every", "track_every_from_env", "clean_parameter_name", "parameter_names", "unwrap_model",
]

#: File name of the per-block report in ``output_dir``.
GSNR_FILENAME = "gsnr.json"
#: File name of the drift history in ``output_dir`` (``track_every > 0``) for the default report name.
HISTORY_FILENAME = "gsnr_history.json"
#: Environment variable giving ``track_every`` to callbacks created without one (the automatic one).
TRACK_EVERY_ENV = "SAI_HF_GSNR_TRACK_EVERY"
#: Prefix of the Trainer's checkpoint folders (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``).
CHECKPOINT_PREFIX = "checkpoint"

logger = logging.getLogger(__name__)


def _follow_trainer_log_level(args: Any) -> None:
    """Lower the ``sai_hf`` logger's level to the Trainer's log level for this process, if that is more verbose than
    what it has now and nobody gave it a level of its own."""
    process_log_level = getattr(args, "get_process_log_level", None)
    if process_log_level is None:  # not TrainingArguments (the callback driven by hand): nothing to follow
        return
    package_logger = logging.getLogger(__name__.partition(".")[0])
    level = process_log_level()
    if package_logger.level == logging.NOTSET and level < package_logger.getEffectiveLevel():
        package_logger.setLevel(level)


def checked_track_every(value: Any, name: str = "track_every") -> int:
    """``value`` if it is a valid drift-tracking interval (a whole number >= 0; 0 is off), else ``ValueError`` naming ``name``."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(f"Invalid {name}={value!r}: must be a whole number of optimizer steps >= 0 (0 disables drift tracking)")
    if index < 0:
        raise ValueError(f"Invalid {name}={index}: must be >= 0 (0 disables drift tracking)")
    return index


def track_every_from_env() -> int:
    """``$SAI_HF_GSNR_TRACK_EVERY`` as a drift-tracking interval (unset or blank: 0, off); ``ValueError`` naming the
    variable and its value unless it is a whole number >= 0. Only read for a Trainer whose optimizer is SGD-SaI."""
    text = os.environ.get(TRACK_EVERY_ENV, "").strip()
    try:
        value = int(text) if text else 0
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"Invalid environment variable {TRACK_EVERY_ENV}={os.environ[TRACK_EVERY_ENV]!r}: expected a whole number of "
            "optimizer steps >= 0 (0 or unset: no g-SNR drift tracking)"
        )
    return value


def _checked_filename(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ValueError(f"Invalid {name}={value!r}: expected a non-empty file name (relative to output_dir)")
    value = os.fspath(value)
    if value.endswith(("/", os.sep)):
        raise ValueError(f"Invalid {name}={value!r}: expected a file name, not a directory")
    return value


#: Every live GSNRCallback, so that the automatic one can see whether a run also has hand-added ones.
_INSTANCES: weakref.WeakSet[GSNRCallback] = weakref.WeakSet()


class GSNRCallback(TrainerCallback):
    """Reports SGD-SaI's scales (log summary, ``gsnr.json``) and optionally their g-SNR drift.

    Args:
        filename: name of the report written into ``args.output_dir``.
        reduce_statistics: your own sum of per-shard gradient statistics across ranks; ``None`` (default): the
            optimizer's own. When given, pending blocks are scaled with it just before ``optimizer.step()`` (and drift
            is measured with it).
        track_every: every this many optimizer steps, recompute the g-SNR of all scaled blocks *without changing the
            scales*, log ``gsnr_drift/spearman``, ``gsnr_drift/max_ratio``, ``gsnr_drift/median_ratio`` (against the
            g-SNR each scale came from, :mod:`sai_hf.drift`) and ``gsnr_drift/skipped`` (scaled blocks without a
            usable gradient at that step: left out, ``NaN`` in the history), and append to the history file.
            ``None``: read ``$SAI_HF_GSNR_TRACK_EVERY`` when the Trainer turns out to use SGD-SaI (a bad value raises
            ``ValueError`` naming the variable when the Trainer is built); ``0``: off.
        history_filename: the drift history in ``args.output_dir``; default: ``filename`` with ``_history`` added::

                {"steps": [1, N, 2N, ...], "blocks": {"<name>": [gsnr at scaling, at N, at 2N, ...]}}

            A resumed run drops the entries after the resumed step and appends. The history is copied into every
            checkpoint folder the Trainer saves, so a resume into a new ``output_dir`` continues the checkpoint's
            copy. A missing or unreadable history restarts from the restored g-SNR, with a warning (an unreadable file
            is kept as ``<name>.corrupt``).
    """

    #: ``True`` only for the instance ``import sai_hf`` adds to every Trainer.
    automatic = False

    def __init__(
        self,
        filename: str = GSNR_FILENAME,
        reduce_statistics: StatisticsReducer | None = None,
        track_every: int | None = None,
        history_filename: str | None = None,
    ) -> None:
        filename = _checked_filename(filename, "filename")
        if history_filename is None:
            stem, ext = os.path.splitext(filename)
            history_filename = f"{stem}_history{ext or '.json'}"
        history_filename = _checked_filename(history_filename, "history_filename")
        if os.path.normpath(history_filename) == os.path.normpath(filename):
            raise ValueError(f"Invalid history_filename={history_filename!r}: it is also the report's filename")
        self.filename = filename
        self.history_filename = history_filename
        self.reduce_statistics = reduce_statistics
        self.track_every = None if track_every is None else checked_track_every(track_every)
        self._reset(None)
        _INSTANCES.add(self)

    # -------------------------------------------------------------- run bookkeeping
    def _reset(self, run: Any) -> None:
        self._run = run  # the TrainerState of the run this instance belongs to
        self._started = False
        self._standing_down = False
        self._reported = 0  # blocks with a scale at the last report
        self._pending_summary: dict[str, float] | None = None
        self._log_at_step_end = False  # the pending summary forces a log at the end of this step (else: the next log)
        self._history: dict[str, Any] | None = None
        self._last_tracked = 0

    def _interval(self) -> int:
        if self.track_every is None:
            self.track_every = track_every_from_env()
        return self.track_every

    def _peers(self, state: Any) -> list[GSNRCallback]:
        """The other GSNRCallbacks of the run whose TrainerState is ``state``."""
        return [cb for cb in list(_INSTANCES) if cb is not self and cb._run is state]

    def _history_path(self, args: Any) -> str:
        return os.path.join(args.output_dir or ".", self.history_filename)

    def _begin(self, args: Any, state: Any, model: Any, optimizer: Any) -> SGDSaI | None:
        """The SGD-SaI optimizer to work on, or ``None`` (not SGD-SaI, or standing down). The first call of a run
        (after every callback's ``on_train_begin``) decides whether an automatic instance stands down, and reports
        scales restored from a checkpoint."""
        sai = find_sgd_sai(optimizer)
        if self._started:
            return None if self._standing_down else sai
        if sai is None or model is None:
            return None
        self._started = True
        if self._run is None:
            self._run = state
        if self.automatic and any(not cb.automatic for cb in self._peers(self._run)):
            self._standing_down = True
            return None
        self._interval()
        _follow_trainer_log_level(args)
        sai.register_model(model, optimizer)  # once per run: FSDP1 views, DeepSpeed ZeRO-1/2's optimizer
        self._reported = len(sai.scales())
        if self._reported:  # scales restored from a checkpoint (or a Trainer trained before)
            self._pending_summary = self.summary(sai)  # in the run's first log, at its own logging step
            names = parameter_names(model)
            zero = getattr(state, "is_world_process_zero", True)
            if zero and args.output_dir:
                path = os.path.join(args.output_dir, self.filename)
                try:
                    with open(path, encoding="utf-8") as fh:
                        written = json.load(fh)
                except (OSError, ValueError):
                    written = None
                if written != self.report(sai, names):
                    self.write_report(path, sai, names)
            if self.track_every and getattr(state, "global_step", 0) > 0 and zero:
                self._history = self._resumed_history(args, state, sai, names)
        return sai

    # -------------------------------------------------------------- events
    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        optim = getattr(args, "optim", None)
        if self.track_every is None and (find_sgd_sai(optimizer) is not None or getattr(optim, "value", optim) == "sgd_sai"):
            self._interval()  # a bad $SAI_HF_GSNR_TRACK_EVERY fails here, when the Trainer is built

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._reset(state)
        if self.automatic or find_sgd_sai(optimizer) is None or not self._interval():
            return
        path = os.path.normpath(os.path.abspath(self._history_path(args)))
        for other in self._peers(state):
            if not other.automatic and other.track_every and os.path.normpath(os.path.abspath(other._history_path(args))) == path:
                raise ValueError(
                    f"Two GSNRCallbacks track g-SNR drift into the same file {path}: give one of them another "
                    "filename or history_filename"
                )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._begin(args, state, model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        sai = self._begin(args, state, model, optimizer)
        if sai is None or model is None:
            return
        if self.reduce_statistics is not None and not sai.all_blocks_scaled():
            sai.initialize_scales(reduce_statistics=self.reduce_statistics)
        step = getattr(state, "global_step", 0) + 1
        if self.track_every and step > 1 and step % self.track_every == 0 and step != self._last_tracked:
            self._last_tracked = step  # once per step, even if this instance was added twice
            self.track_drift(args, state, model, sai)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        sai = self._begin(args, state, model, optimizer)
        if sai is None or model is None:
            return
        scaled = len(sai.scales())
        if scaled > self._reported:  # new scales (the optimizer's step, or another instance's reducer)
            self._reported = scaled
            self._pending_summary = {**(self._pending_summary or {}), **self.summary(sai)}
            self._log_at_step_end = True
            if getattr(state, "is_world_process_zero", True) and args.output_dir:
                self.write_report(os.path.join(args.output_dir, self.filename), sai, parameter_names(model))

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending_summary is not None and self._log_at_step_end:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_summary is None or logs is None:
            return
        logs.update(self._pending_summary)
        if state.log_history:
            state.log_history[-1].update(self._pending_summary)
        self._pending_summary = None
        self._log_at_step_end = False

    def on_save(self, args, state, control, **kwargs):
        """Copy the drift history into the checkpoint just saved (so a resume elsewhere continues it)."""
        if self._history is None or self._standing_down or not state.is_world_process_zero or not args.output_dir:
            return
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if os.path.isdir(folder):
            _write_json(os.path.join(folder, os.path.basename(self.history_filename)), self._history)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._begin(args, state, model, optimizer)  # a resumed run with no step left still reports

    # -------------------------------------------------------------- drift
    def track_drift(self, args, state, model: torch.nn.Module, sai: SGDSaI) -> None:
        """Recompute every scaled block's g-SNR (scales unchanged), queue the ``gsnr_drift/*`` summary for the next
        log and append to the history file; blocks without a usable gradient now get ``NaN`` there."""
        current = sai.measure_gsnr(reduce_statistics=self.reduce_statistics)
        names = parameter_names(model)
        scaled = _scaled_blocks(sai, names)
        blocks = [p for p in scaled if p in current]
        if not blocks:
            return
        drift = drift_summary([scaled[p]["gsnr"] for p in blocks], [current[p] for p in blocks])
        drift["skipped"] = float(len(scaled) - len(blocks))
        self._pending_summary = {**(self._pending_summary or {}), **{f"gsnr_drift/{k}": v for k, v in drift.items()}}
        self._log_at_step_end = True
        if self._history is None:
            self._history = self._new_history(sai, names)
        history = self._history
        history["steps"].append(getattr(state, "global_step", 0) + 1)
        width = len(history["steps"])
        for p, block_state in scaled.items():
            history["blocks"].setdefault(names[id(p)], [block_state["gsnr"]])
        measured = {names[id(p)]: current[p] for p in blocks}
        for name, series in history["blocks"].items():
            series.extend([math.nan] * (width - 1 - len(series)))
            del series[width - 1 :]
            series.append(measured.get(name, math.nan))
        if getattr(state, "is_world_process_zero", True) and args.output_dir:
            _write_json(self._history_path(args), history)

    @staticmethod
    def _new_history(sai: SGDSaI, names: dict[int, str]) -> dict[str, Any]:
        """A history holding only the g-SNR every scaled block was scaled with (as step 1)."""
        return {"steps": [1], "blocks": {names[id(p)]: [state["gsnr"]] for p, state in _scaled_blocks(sai, names).items()}}

    def _resumed_history(self, args: Any, state: Any, sai: SGDSaI, names: dict[int, str]) -> dict[str, Any]:
        """The history to append to after resuming at ``state.global_step``: ``output_dir``'s file, else the resumed
        checkpoint's copy, else a new one (with a warning)."""
        step = state.global_step
        path = self._history_path(args)
        problem, corrupt = f"{path} does not exist", False
        if os.path.exists(path):
            try:
                return _load_history(path, step)
            except ValueError as err:
                corrupt, aside = True, f"{path}.corrupt"
                try:
                    os.replace(path, aside)
                    problem = f"{path} is unreadable ({err}; kept as {aside})"
                except OSError:
                    problem = f"{path} is unreadable ({err})"
        name = os.path.basename(self.history_filename)
        checkpoint = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{step}")
        for folder in (getattr(args, "resume_from_checkpoint", None), checkpoint):
            if not isinstance(folder, str) or not os.path.isfile(os.path.join(folder, name)):
                continue
            try:
                history = _load_history(os.path.join(folder, name), step)
            except ValueError:
                continue
            if corrupt:
                warnings.warn(f"GSNRCallback: {problem}; continuing the g-SNR history from {folder}", stacklevel=2)
            return history
        warnings.warn(
            f"GSNRCallback: resuming at step {step} but {problem} and the checkpoint holds no copy: the g-SNR "
            f"drift history restarts from the g-SNR the scales came from; measurements before step {step} are "
            "not in it",
            stacklevel=2,
        )
        return self._new_history(sai, names)

    # -------------------------------------------------------------- reports
    @staticmethod
    def summary(sai: SGDSaI) -> dict[str, float]:
        """``gsnr/scale_{min,median,max}``, ``gsnr/scaled`` and ``gsnr/deferred`` (blocks with a gradient still
        waiting for their scale)."""
        scales = list(sai.scales().values())
        out: dict[str, float] = {"gsnr/scaled": float(len(scales)), "gsnr/deferred": float(len(sai.pending_params()))}
        if scales:
            out.update(
                {"gsnr/scale_min": min(scales), "gsnr/scale_median": statistics.median(scales), "gsnr/scale_max": max(scales)}
            )
        return out

    @staticmethod
    def report(sai: SGDSaI, names: dict[int, str]) -> dict[str, dict[str, float | int]]:
        """``{name: {"gsnr", "scale", "numel", "gsnr_over_sqrt_numel"}}`` for every parameter of ``names`` that has a scale."""
        out: dict[str, dict[str, float | int]] = {}
        for block in sai.blocks():
            if "scale" in block.state and id(block.param) in names:
                gsnr, numel = block.state["gsnr"], block.placement.numel
                out[names[id(block.param)]] = {
                    "gsnr": gsnr, "scale": block.state["scale"], "numel": numel, "gsnr_over_sqrt_numel": gsnr / math.sqrt(numel)
                }
        return out

    def write_report(self, path: str, sai: SGDSaI, names: dict[int, str]) -> None:
        """Write :meth:`report` to ``path`` atomically, and log where (INFO)."""
        report = self.report(sai, names)
        _write_json(path, report)
        logger.info("g-SNR report (the scales of %d blocks) written to %s", len(report), os.path.abspath(path))


def _scaled_blocks(sai: SGDSaI, names: dict[int, str]) -> dict[torch.Tensor, Any]:
    """``{model parameter: its SGD-SaI state}`` of the named blocks that have their scale."""
    return {b.param: b.state for b in sai.blocks() if "scale" in b.state and id(b.param) in names}


class AutoGSNRCallback(GSNRCallback):
    """The :class:`GSNRCallback` that ``import sai_hf`` adds to every Trainer (through ``DEFAULT_CALLBACKS``): default
    file names, ``track_every`` from ``$SAI_HF_GSNR_TRACK_EVERY``; stands down for a run with a hand-added one."""

    automatic = True


def _load_history(path: str, upto_step: int) -> dict[str, Any]:
    """A drift history file, cut to its steps ``<= upto_step``; ``ValueError`` saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as err:
        raise ValueError(f"cannot read it: {err.strerror or err}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not isinstance(data.get("blocks"), dict):
        raise ValueError('expected {"steps": [...], "blocks": {...}}')
    steps = data["steps"]
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps) or steps != sorted(set(steps)):
        raise ValueError("'steps' is not an increasing list of step numbers")
    keep = sum(1 for s in steps if s <= upto_step)
    if keep == 0:
        raise ValueError(f"no entry at or before step {upto_step}")
    blocks: dict[str, list[float]] = {}
    for name, series in data["blocks"].items():
        if not isinstance(series, list) or len(series) > len(steps):
            raise ValueError(f"block {name!r} does not hold one value per step")
        values = [math.nan if v is None else v for v in series[:keep]]
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise ValueError(f"block {name!r} holds a non-number {bad!r}")
        blocks[str(name)] = [float(v) for v in values] + [math.nan] * (keep - len(values))
    return {"steps": steps[:keep], "blocks": blocks}


def _write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (NaN written as ``NaN``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(f"{path}.tmp", path)


#: Module names that wrappers insert into parameter names (FSDP1, activation checkpointing, ``torch.compile``).
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_parameter_name(name: str) -> str:
    """``name`` without wrapper components: ``_fsdp_wrapped_module.h.0._checkpoint_wrapped_module.w`` -> ``h.0.w``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers. FSDP
    wrappers are kept (FSDP1 is where the shard views live; :func:`clean_parameter_name` drops their components)."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    for _ in range(8):
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as in the unwrapped model's ``named_parameters()``, wrapper components removed."""
    return {id(p): clean_parameter_name(name) for name, p in unwrap_model(model).named_parameters()}
