"""``GSNRCallback``: fixes SGD-SaI's scales inside ``Trainer`` and reports them.

At ``on_pre_optimizer_step`` (after gradient accumulation and clipping, just before
``optimizer.step()``) of the first optimizer step, the callback has
:meth:`sai_hf.SGDSaI.initialize_scales` compute every block's g-SNR from the full accumulated
gradient of the model's named parameters; blocks deferred then (zero or non-finite gradient) are
picked up at the first later step where they have a usable gradient. After each such step it

* adds a summary to the Trainer's next log (``gsnr/scale_min``, ``gsnr/scale_median``,
  ``gsnr/scale_max``, ``gsnr/scaled``, ``gsnr/deferred``), so every ``report_to`` backend gets it;
* writes ``<output_dir>/gsnr.json`` (world process zero only; rewritten, atomically, whenever
  further blocks receive their scale)::

      {"<name in model.named_parameters()>": {"gsnr": float, "scale": float, "numel": int}, ...}

  listing every parameter that has a scale, under its original name (wrapper components such as
  DDP's ``module.``, FSDP1's ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` and
  ``torch.compile``'s ``_orig_mod.`` removed) and with the whole tensor's ``numel``.

Multi-process: every rank calls :meth:`sai_hf.SGDSaI.initialize_scales` for all blocks without a
scale (the same list on every rank); sharded gradients (FSDP2, FSDP1 ``use_orig_params=True``, whose
modules the callback tells the optimizer about with :meth:`sai_hf.SGDSaI.register_model`) are
reduced exactly across ranks by the optimizer's layout (:mod:`sai_hf.sharding`), so every rank
stores the same scales. Under DeepSpeed ZeRO-1/2 the engine steps inside ``backward``, before this
hook: the scales come from ``optimizer.step()`` itself (:mod:`sai_hf.sharding.deepspeed_zero`), and
the callback only reports them (whenever the number of scaled blocks grew since its last report).
The callback knows no backend: it only talks to :class:`sai_hf.SGDSaI`.

``import sai_hf`` adds the callback to every Trainer; it does nothing unless the Trainer's optimizer
is an :class:`sai_hf.SGDSaI`. Adding it by hand as well is harmless: whichever instance runs
first computes the scales, the others find nothing left to do.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch
from transformers import TrainerCallback

from .drift import drift_summary
from .optimizer import SGDSaI, StatisticsReducer

__all__ = ["GSNRCallback", "find_sgd_sai", "GSNR_FILENAME", "clean_parameter_name", "parameter_names", "unwrap_model"]

#: File name of the per-block report in ``output_dir``.
GSNR_FILENAME = "gsnr.json"
#: File name of the drift history in ``output_dir`` (``track_every > 0``).
HISTORY_FILENAME = "gsnr_history.json"
#: Environment variable giving ``track_every`` to the automatically added callback.
TRACK_EVERY_ENV = "SAI_HF_GSNR_TRACK_EVERY"


def checked_track_every(value: int, name: str = "track_every") -> int:
    """``value`` if it is a valid drift-tracking interval (>= 0; 0 is off), else ``ValueError`` naming ``name``."""
    if value < 0:
        raise ValueError(f"Invalid {name}={value}: must be >= 0 (0 disables drift tracking)")
    return value


def find_sgd_sai(optimizer: Any) -> SGDSaI | None:
    """The :class:`SGDSaI` inside ``optimizer`` (unwrapping e.g. accelerate's ``AcceleratedOptimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, SGDSaI):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class GSNRCallback(TrainerCallback):
    """Computes SGD-SaI scales from the accumulated gradient, logs a summary, writes ``gsnr.json``.

    Args:
        filename: name of the report written into ``args.output_dir``.
        reduce_statistics: sums per-shard gradient statistics across ranks; ``None`` (default)
            picks it automatically (the optimizer's layout, :mod:`sai_hf.sharding`: exact for FSDP2
            and FSDP1 ``use_orig_params=True``, nothing to do for one process or DDP).
        track_every: every this many optimizer steps, recompute the g-SNR of all blocks *without
            changing the scales* and log how far it drifted from the g-SNR the scales came from
            (:mod:`sai_hf.drift`), appending to ``gsnr_history.json``. ``None``: read
            ``$SAI_HF_GSNR_TRACK_EVERY`` (how the automatically added callback is configured);
            ``0``: off.
    """

    def __init__(
        self,
        filename: str = GSNR_FILENAME,
        reduce_statistics: StatisticsReducer | None = None,
        track_every: int | None = None,
    ) -> None:
        if track_every is None:
            track_every = int(os.environ.get(TRACK_EVERY_ENV, "0") or 0)
        checked_track_every(track_every)
        self.filename = filename
        self.reduce_statistics = reduce_statistics
        self.track_every = track_every
        self._pending_summary: dict[str, float] | None = None
        self._history: dict[str, Any] | None = None
        self._reported_blocks = 0  # scaled blocks in the last report

    # -------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # Scales restored from a checkpoint were reported by the run that computed them.
        sai = find_sgd_sai(optimizer)
        self._reported_blocks = len(sai.scales()) if sai is not None else 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        sai = find_sgd_sai(optimizer)
        if sai is None or model is None:
            return
        # Whether blocks lack a scale is the same on every rank (unlike which local gradients are
        # present: FSDP1 leaves grad=None outside the local shard), so all ranks take part in the
        # reduction together. Under DeepSpeed ZeRO the step already ran (inside backward) and set
        # the scales; initialize_scales() has nothing to do there.
        if sai.all_blocks_scaled():
            if self.track_every and (state.global_step + 1) % self.track_every == 0:
                self.track_drift(args, state, model, sai)
        else:
            sai.register_model(model)
            sai.initialize_scales(reduce_statistics=self.reduce_statistics)
        scaled = len(sai.scales())
        if scaled <= self._reported_blocks:
            return
        self._reported_blocks = scaled
        names = parameter_names(model)
        self._pending_summary = self.summary(sai)
        if state.is_world_process_zero and args.output_dir:
            self.write_report(os.path.join(args.output_dir, self.filename), sai, names)

    def track_drift(self, args, state, model: torch.nn.Module, sai: SGDSaI) -> None:
        """Recompute every scaled block's g-SNR (scales unchanged), queue ``gsnr_drift/spearman``,
        ``gsnr_drift/max_ratio`` and ``gsnr_drift/median_ratio`` (against the g-SNR each block was
        scaled with) for the next log, and append to ``<output_dir>/gsnr_history.json``::

            {"steps": [1, N, 2N, ...], "blocks": {"<name>": [gsnr at scaling, at N, at 2N, ...]}}
        """
        sai.register_model(model)
        current = sai.measure_gsnr(reduce_statistics=self.reduce_statistics)
        if not current:
            return
        names = parameter_names(model)
        blocks = [p for p in current if id(p) in names]
        drift = drift_summary([sai.state[p]["gsnr"] for p in blocks], [current[p] for p in blocks])
        self._pending_summary = {**(self._pending_summary or {}), **{f"gsnr_drift/{k}": v for k, v in drift.items()}}
        if self._history is None:
            self._history = {"steps": [1], "blocks": {names[id(p)]: [sai.state[p]["gsnr"]] for p in blocks}}
        step = state.global_step + 1
        self._history["steps"].append(step)
        for p in blocks:
            series = self._history["blocks"].setdefault(names[id(p)], [sai.state[p]["gsnr"]])
            series.extend([float("nan")] * (len(self._history["steps"]) - 1 - len(series)))
            series.append(current[p])
        if state.is_world_process_zero and args.output_dir:
            path = os.path.join(args.output_dir, HISTORY_FILENAME)
            _write_json(path, self._history)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending_summary is not None:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_summary is None or logs is None:
            return
        logs.update(self._pending_summary)
        if state.log_history:
            state.log_history[-1].update(self._pending_summary)
        self._pending_summary = None

    # -------------------------------------------------------------- reports
    @staticmethod
    def summary(sai: SGDSaI) -> dict[str, float]:
        """``gsnr/scale_{min,median,max}``, ``gsnr/scaled`` and ``gsnr/deferred`` (blocks with a
        gradient still waiting for their scale)."""
        scales = list(sai.scales().values())
        out: dict[str, float] = {"gsnr/scaled": float(len(scales)), "gsnr/deferred": float(len(sai.pending_params()))}
        if scales:
            out.update(
                {
                    "gsnr/scale_min": min(scales),
                    "gsnr/scale_median": statistics.median(scales),
                    "gsnr/scale_max": max(scales),
                }
            )
        return out

    @staticmethod
    def report(sai: SGDSaI, names: dict[int, str]) -> dict[str, dict[str, float | int]]:
        """``{name: {"gsnr", "scale", "numel"}}`` for every parameter of ``names`` that has a scale."""
        return {
            names[id(p)]: {"gsnr": state["gsnr"], "scale": state["scale"], "numel": sai.block_numel(p)}
            for p, state in sai.block_states()
            if "scale" in state and id(p) in names
        }

    def write_report(self, path: str, sai: SGDSaI, names: dict[int, str]) -> None:
        """Write :meth:`report` to ``path`` atomically."""
        _write_json(path, self.report(sai, names))


def _write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (NaN written as ``NaN``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


#: Module names that wrappers insert into parameter names (FSDP1, activation checkpointing,
#: ``torch.compile``); they are dropped wherever they occur.
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_parameter_name(name: str) -> str:
    """``name`` without wrapper components: ``_fsdp_wrapped_module.h.0._checkpoint_wrapped_module.w``
    becomes ``h.0.w``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, so that names do not start with ``module.``. FSDP wrappers are kept (FSDP1 is where the
    shard views live; its name components are removed by :func:`clean_parameter_name`)."""
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
    """``id(parameter) -> name`` as in the unwrapped model's ``named_parameters()``, with wrapper
    components removed (:func:`unwrap_model`, :func:`clean_parameter_name`)."""
    return {id(p): clean_parameter_name(name) for name, p in unwrap_model(model).named_parameters()}
