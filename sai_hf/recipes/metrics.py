"""Evaluation metrics for causal LMs: perplexity and next-token accuracy, through ``evaluate``.

* ``preprocess_logits_for_metrics`` (:func:`logits_to_token_ids`) keeps only the argmax token of
  each position, so evaluation never accumulates full ``[batch, seq, vocab]`` logits.
* :class:`CausalLMMetrics` is the ``compute_metrics`` function. Token accuracy comes from the local
  ``evaluate`` metric module shipped in ``token_accuracy/`` (offline, unlike ``evaluate.load("accuracy")``),
  over the positions whose label is not ``-100``, prediction ``t`` scored against label ``t + 1``.
  Perplexity is ``exp`` of the mean evaluation loss, the same number ``Trainer`` reports as
  ``eval_loss``; it needs the per-batch losses, which :func:`request_losses_for_metrics` asks for.

``Trainer`` prefixes the keys: ``eval_perplexity``, ``eval_token_accuracy`` (logged at every evaluation,
so they reach the progress bar, ``report_to`` integrations and ``eval_results.json``).
"""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction, TrainingArguments

TOKEN_ACCURACY_METRIC_DIR = Path(__file__).with_name("token_accuracy")
IGNORE_INDEX = -100


def load_token_accuracy_metric() -> evaluate.EvaluationModule:
    """The shipped token-accuracy metric, loaded from its local path (no hub access)."""
    return evaluate.load(str(TOKEN_ACCURACY_METRIC_DIR), keep_in_memory=True)


def logits_to_token_ids(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: the predicted token id at each position."""
    if isinstance(logits, tuple):  # models may return extra outputs after the logits
        logits = logits[0]
    return logits.argmax(dim=-1)


def request_losses_for_metrics(training_args: TrainingArguments) -> None:
    """Make ``Trainer`` pass the evaluation losses to ``compute_metrics`` (for perplexity)."""
    if "loss" not in training_args.include_for_metrics:
        training_args.include_for_metrics = [*training_args.include_for_metrics, "loss"]


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)``, ``inf`` when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


class CausalLMMetrics:
    """``compute_metrics`` for causal LMs: ``perplexity`` and ``token_accuracy``."""

    def __init__(self) -> None:
        self.token_accuracy = load_token_accuracy_metric()

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        # Position t predicts token t + 1: compare shifted, where the label is not masked.
        predictions, labels = predictions[:, :-1], labels[:, 1:]
        scored = labels != IGNORE_INDEX
        metrics = {
            "token_accuracy": self.token_accuracy.compute(
                predictions=predictions[scored], references=labels[scored]
            )["accuracy"]
        }
        if eval_pred.losses is not None:
            losses = np.asarray(eval_pred.losses, dtype=np.float64).reshape(-1)
            finite = losses[np.isfinite(losses)]
            metrics["perplexity"] = perplexity(float(finite.mean())) if finite.size else math.inf
        return metrics
