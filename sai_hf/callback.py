"""``GSNRCallback``: registers the Trainer's model with :class:`sai_hf.SGDSaI` and reports the scales it fixed.

The optimizer scales each block in its own ``step()``; the callback knows no sharding backend. After a step in which
blocks received their scale it adds ``gsnr/scale_{min,median,max}``, ``gsnr/scaled`` and ``gsnr/deferred`` to the next
log and (world process zero) rewrites ``<output_dir>/gsnr.json`` atomically, logging where (INFO, ``sai_hf.callback``)::

    {"<name in model.named_parameters()>": {"gsnr": float, "scale": float, "numel": int, "gsnr_over_sqrt_numel": float}}

keyed by the names the user's model has (:func:`sai_hf.parameter_names.parameter_names`), ``numel`` of the whole tensor.
A resumed run rewrites a missing or different report and logs the restored scales' summary. The ``sai_hf`` logger
follows the Trainer's process log level where that is more verbose and the logger has no level of its own.

``import sai_hf`` adds an :class:`AutoGSNRCallback` to every Trainer; a hand-added ``GSNRCallback`` makes it stand down.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import weakref
from typing import Any, ClassVar

from transformers import TrainerCallback

from .drift import DriftHistory, checked_track_every, drift_summary, track_every_from_env, write_json
from .optimizer import SGDSaI, StatisticsReducer, find_sgd_sai
from .sharded_model import register_sharded_model
from .parameter_names import parameter_names

__all__ = ["GSNRCallback", "AutoGSNRCallback", "find_sgd_sai", "GSNR_FILENAME"]

#: File name of the per-block report in ``output_dir``.
GSNR_FILENAME = "gsnr.json"
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


def _checked_filename(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ValueError(f"Invalid {name}={value!r}: expected a non-empty file name (relative to output_dir)")
    value = os.fspath(value)
    if value.endswith(("/", os.sep)):
        raise ValueError(f"Invalid {name}={value!r}: expected a file name, not a directory")
    return value


class GSNRCallback(TrainerCallback):
    """Reports SGD-SaI's scales (log summary, ``gsnr.json``) and optionally their g-SNR drift.

    Args:
        filename: name of the report written into ``args.output_dir``.
        reduce_statistics: your own sum of per-shard gradient statistics across ranks (``None``: the optimizer's);
            pending blocks are then scaled, and drift measured, with it.
        track_every: every this many optimizer steps, recompute the g-SNR of all scaled blocks (scales unchanged),
            log ``gsnr_drift/{spearman,max_ratio,median_ratio,skipped}`` (:mod:`sai_hf.drift`) and append to the
            history file. ``None``: ``$SAI_HF_GSNR_TRACK_EVERY`` (read where the Trainer uses SGD-SaI); ``0``: off.
        history_filename: the drift history (:class:`sai_hf.drift.DriftHistory`) in ``args.output_dir``, also copied
            into every checkpoint; default: ``filename`` with ``_history`` added. A resumed run continues it.
    """

    #: ``True`` only for the instance ``import sai_hf`` adds to every Trainer.
    automatic = False
    #: Every live GSNRCallback, so that the automatic one can see whether a run also has hand-added ones.
    live: ClassVar[weakref.WeakSet[GSNRCallback]] = weakref.WeakSet()

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
        GSNRCallback.live.add(self)

    # -------------------------------------------------------------- run bookkeeping
    def _reset(self, run: Any) -> None:
        self._run = run  # the TrainerState of the run this instance belongs to
        self._started = False
        self._standing_down = False
        self._reported = 0  # blocks with a scale at the last report
        self._all_scaled: tuple[Any, int, int] | None = None  # (optimizer state, parameters, scaled) once all are scaled
        self._pending_summary: dict[str, float] | None = None
        self._log_at_step_end = False  # the pending summary forces a log at the end of this step (else: the next log)
        self._history: DriftHistory | None = None
        self._last_tracked = 0

    def _interval(self) -> int:
        if self.track_every is None:
            self.track_every = track_every_from_env()
        return self.track_every

    def _peers(self, state: Any) -> list[GSNRCallback]:
        """The other GSNRCallbacks of the run whose TrainerState is ``state``."""
        return [cb for cb in list(GSNRCallback.live) if cb is not self and cb._run is state]

    def _history_path(self, args: Any) -> str:
        return os.path.join(args.output_dir or ".", self.history_filename)

    def _queue(self, summary: dict[str, float]) -> None:
        """Add ``summary`` to the next log, forcing one at the end of this step."""
        self._pending_summary = {**(self._pending_summary or {}), **summary}
        self._log_at_step_end = True

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
        register_sharded_model(model, optimizer)  # once per run: FSDP1 views, DeepSpeed ZeRO-1/2's optimizer
        self._reported = self._scaled_count(sai)
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
                name, step = os.path.basename(self.history_filename), state.global_step
                folders = (getattr(args, "resume_from_checkpoint", None), os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{step}"))
                copies = [os.path.join(folder, name) for folder in folders if isinstance(folder, str)]
                scaled_gsnr = {name: entry["gsnr"] for name, entry in self.report(sai, names).items()}
                self._history = DriftHistory.resumed(self._history_path(args), copies, step, scaled_gsnr)
        return sai

    def _known_all_scaled(self, sai: SGDSaI) -> bool:
        """Whether every block had its scale when last asked, with the optimizer's parameters and state unchanged
        since (a new group or a loaded state dict asks again): scales, once fixed, stay."""
        known = self._all_scaled
        return known is not None and known[0] is sai.state and known[1] == _parameter_count(sai)

    def _scaled_count(self, sai: SGDSaI) -> int:
        """How many blocks have their scale (not asked of the optimizer again once every block has one)."""
        if self._known_all_scaled(sai):
            return self._all_scaled[2]  # type: ignore[index]
        blocks = sai.blocks()
        count = len({id(b.param) for b in blocks if "scale" in b.state})
        if all("scale" in b.state for b in blocks):
            self._all_scaled = (sai.state, _parameter_count(sai), count)
        return count

    # -------------------------------------------------------------- events
    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        optim = getattr(args, "optim", None)
        if self.track_every is None and (find_sgd_sai(optimizer) is not None or getattr(optim, "value", optim) == "sgd_sai"):
            self._interval()  # a bad $SAI_HF_GSNR_TRACK_EVERY fails here, when the Trainer is built

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._reset(state)
        if self.automatic or find_sgd_sai(optimizer) is None or not self._interval():
            return
        path = os.path.abspath(self._history_path(args))  # normalized
        for other in self._peers(state):
            if not other.automatic and other.track_every and os.path.abspath(other._history_path(args)) == path:
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
        if self.reduce_statistics is not None and not self._known_all_scaled(sai) and not sai.all_blocks_scaled():
            sai.initialize_scales(reduce_statistics=self.reduce_statistics)
        step = getattr(state, "global_step", 0) + 1
        if self.track_every and step > 1 and step % self.track_every == 0 and step != self._last_tracked:
            self._last_tracked = step  # once per step, even if this instance was added twice
            self.track_drift(args, state, model, sai)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        sai = self._begin(args, state, model, optimizer)
        if sai is None or model is None:
            return
        scaled = self._scaled_count(sai)
        if scaled > self._reported:  # new scales (the optimizer's step, or another instance's reducer)
            self._reported = scaled
            self._queue(self.summary(sai))
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
            self._history.save(os.path.join(folder, os.path.basename(self.history_filename)))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._begin(args, state, model, optimizer)  # a resumed run with no step left still reports

    # -------------------------------------------------------------- drift
    def track_drift(self, args, state, model, sai: SGDSaI) -> None:
        """Recompute every scaled block's g-SNR (scales unchanged), queue the ``gsnr_drift/*`` summary for the next
        log and append to the history file; blocks without a usable gradient now get ``NaN`` there."""
        current = sai.measure_gsnr(reduce_statistics=self.reduce_statistics)
        names = parameter_names(model)
        scaled = {b.param: b.state["gsnr"] for b in sai.blocks() if "scale" in b.state and id(b.param) in names}
        measured = [p for p in scaled if p in current]
        if not measured:
            return
        drift = drift_summary([scaled[p] for p in measured], [current[p] for p in measured])
        drift["skipped"] = float(len(scaled) - len(measured))
        self._queue({f"gsnr_drift/{k}": v for k, v in drift.items()})
        scaled_gsnr = {names[id(p)]: gsnr for p, gsnr in scaled.items()}
        if self._history is None:
            self._history = DriftHistory.started(scaled_gsnr)
        self._history.append(getattr(state, "global_step", 0) + 1, scaled_gsnr, {names[id(p)]: current[p] for p in measured})
        if getattr(state, "is_world_process_zero", True) and args.output_dir:
            self._history.save(self._history_path(args))

    # -------------------------------------------------------------- reports
    @staticmethod
    def summary(sai: SGDSaI) -> dict[str, float]:
        """``gsnr/scale_{min,median,max}``, ``gsnr/scaled`` and ``gsnr/deferred`` (blocks with a gradient still
        waiting for their scale)."""
        blocks = sai.blocks()
        scales = list({id(b.param): b.state["scale"] for b in blocks if "scale" in b.state}.values())
        deferred = sum(1 for b in blocks if b.grad is not None and "scale" not in b.state)
        out: dict[str, float] = {"gsnr/scaled": float(len(scales)), "gsnr/deferred": float(deferred)}
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
        write_json(path, report)
        logger.info("g-SNR report (the scales of %d blocks) written to %s", len(report), os.path.abspath(path))


def _parameter_count(sai: SGDSaI) -> int:
    return sum(len(group["params"]) for group in sai.sharding.groups.every(sai.param_groups))


class AutoGSNRCallback(GSNRCallback):
    """The :class:`GSNRCallback` that ``import sai_hf`` adds to every Trainer (``DEFAULT_CALLBACKS``); it stands down
    for a run with a hand-added one."""

    automatic = True
