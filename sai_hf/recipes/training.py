"""Running a recipe's ``Trainer``: build it, train, evaluate, save, and say where the results are.

Both scripts end the same way, so it lives here: :func:`build_trainer` wires the metrics
(:mod:`.metrics`) into a plain ``transformers.Trainer``, and :func:`train_and_evaluate` trains,
saves the model (or adapter) and tokenizer, evaluates, writes ``train_results.json``,
``eval_results.json``, ``all_results.json`` (with ``eval_perplexity`` and ``perplexity``),
``trainer_state.json`` and, with matplotlib, ``loss_curve.png`` into ``output_dir``, then ends
the ``Trainer`` (trackers finished, process group destroyed).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import transformers
from datasets import Dataset
from transformers import DataCollator, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..callback import GSNRCallback
from ..drift import checked_track_every
from .metrics import CausalLMMetrics, logits_to_token_ids, perplexity, request_losses_for_metrics
from .plotting import loss_curves, plot_loss_curve
from .quiet import plain_progress, quiet_progress
from .samples import SampleGeneration, prompt_of

logger = logging.getLogger(__name__)


@dataclass
class RecipeResult:
    """What a recipe run leaves behind."""

    trainer: Trainer
    metrics: dict[str, Any]
    output_dir: Path
    metrics_file: Path
    loss_curve: Path | None


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stderr at the level ``TrainingArguments`` asks for (quieter on non-main processes)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr)],
    )
    level = training_args.get_process_log_level()
    if training_args.should_log and level == logging.WARNING:  # transformers' "passive" default: be informative
        level = logging.INFO
    logging.getLogger("sai_hf").setLevel(level)
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    transformers.utils.logging.set_verbosity(max(level, logging.WARNING))


#: Errors that, raised while a recipe reads its config and data and builds its Trainer, are bad
#: input (every sai-hf check raises one of them with a message naming the key, file or value).
INPUT_ERRORS = (ValueError, OSError, ImportError)


def prepare_or_exit(prepare: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None, prog: str) -> Any:
    """``prepare(argv)``, turning bad input into one ``PROG: error: ...`` line and exit status 2.

    For the scripts' command line only: ``prepare`` is everything before training (config, data,
    model, Trainer), so a ``ValueError``/``OSError``/``ImportError`` there is the user's input,
    reported without a traceback. Errors during training keep their traceback. Calling the
    scripts' ``main(argv)`` from Python raises the exceptions themselves."""
    try:
        return prepare(argv)
    except INPUT_ERRORS as err:
        message = str(err) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def announce(training_args: TrainingArguments, message: str) -> None:
    """Print ``message`` once (on the main process)."""
    if training_args.process_index == 0:
        print(message, flush=True)


def build_trainer(
    model: PreTrainedModel,
    training_args: TrainingArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    data_collator: DataCollator | None = None,
    gsnr_track_every: int = 0,
    sample_max_new_tokens: int = 0,
) -> Trainer:
    """A ``Trainer`` that reports ``eval_perplexity`` and ``eval_token_accuracy`` at each evaluation,
    tracks g-SNR drift every ``gsnr_track_every`` optimizer steps (0: off; see
    :class:`sai_hf.GSNRCallback`) and prints a greedy completion of the first evaluation prompt, at most
    ``sample_max_new_tokens`` tokens, before and after training (0: off; :class:`.samples.SampleGeneration`)."""
    checked_track_every(gsnr_track_every, "gsnr_track_every")
    request_losses_for_metrics(training_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=CausalLMMetrics(),
        preprocess_logits_for_metrics=logits_to_token_ids,
    )
    plain_progress(trainer)  # no nested evaluation bar ("\x1b[A" escapes) in logs
    if sample_max_new_tokens:
        trainer.add_callback(SampleGeneration(tokenizer, prompt_of(eval_dataset[0]), sample_max_new_tokens))
    if gsnr_track_every:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, GSNRCallback):
                callback.track_every = gsnr_track_every
    return trainer


def train_and_evaluate(trainer: Trainer, title: str = "training") -> RecipeResult:
    """Train, save, evaluate and report; return the final metrics and where they were written.

    ``title`` names the run in the loss-curve plot (the optimizer's name is added).
    """
    args = trainer.args
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    with quiet_progress():  # no "Writing model shards" bar after the run's own
        trainer.save_model()

    metrics: dict[str, Any] = dict(train_result.metrics)
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = len(trainer.eval_dataset)
    eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    metrics.update(eval_metrics)

    output_dir = Path(args.output_dir)
    loss_curve = None
    if trainer.is_world_process_zero():
        optim = getattr(args.optim, "value", args.optim)
        loss_curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", title=f"{title} ({optim})")
        evals = loss_curves(trainer.state.log_history)["eval"]
        if len(evals) > 1:
            (first_step, first_loss), (last_step, last_loss) = evals[0], evals[-1]
            print(
                f"eval loss {first_loss:.3f} (step {first_step}) -> {last_loss:.3f} (step {last_step}), "
                f"perplexity {eval_metrics['eval_perplexity']:.2f}, token accuracy {eval_metrics['eval_token_accuracy']:.3f}",
                flush=True,
            )
        print(f"results in {output_dir}, metrics in {output_dir / 'all_results.json'}", flush=True)
        if loss_curve is not None:
            print(f"loss curve in {loss_curve}", flush=True)
    trainer.accelerator.end_training()  # finish the report_to trackers and the process group (5.x: trainer.end(); 4.57 lacks it)
    return RecipeResult(trainer, metrics, output_dir, output_dir / "all_results.json", loss_curve)
