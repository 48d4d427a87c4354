"""A small Llama that has learned something, for the offline LoRA recipe to fine-tune.

LoRA on random weights would show little, so a freshly built Llama is first given
``base_pretrain_steps`` of causal-LM pretraining on the stdlib corpus, with a plain ``Trainer``
and the run's own optimizer settings (``learning_rate`` replaced by ``base_learning_rate``). The
result is cached under ``<recipe_cache_dir>/bases/`` keyed by everything that shapes it (model
config, tokenizer vocabulary, corpus, steps, batch size, optimizer, seed), so later runs load it in
a second. Under ``accelerate launch`` every process trains together and the main one saves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from accelerate import PartialState
from datasets import DatasetDict
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .arguments import DataArguments, LlamaModelArguments
from .cache import fingerprint, resolve_cache_dir
from .corpus import corpus_id
from .models import build_llama, llama_config, load_pretrained_causal_lm
from .packing import packed_lm_datasets

logger = logging.getLogger(__name__)

BASE_FORMAT_VERSION = 2  # bump when the way bases are pretrained changes (2: base_optim, base_seed)


def base_cache_key(
    model_args: LlamaModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    corpus: DatasetDict,
) -> str:
    """The cache key of a pretrained base: a digest of everything that changes its weights."""
    config = llama_config(model_args, len(tokenizer), data_args.block_size).to_dict()
    config.pop("transformers_version", None)
    return fingerprint(
        {
            "version": BASE_FORMAT_VERSION,
            "config": config,
            "vocab": fingerprint(sorted(tokenizer.get_vocab().items())),
            "corpus": corpus_id(corpus["train"]),
            "steps": model_args.base_pretrain_steps,
            "learning_rate": model_args.base_learning_rate,
            "batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "optim": model_args.base_optim,
            "scheduler": str(training_args.lr_scheduler_type),
            "warmup_steps": training_args.warmup_steps,
            "seed": model_args.base_seed,
        }
    )


def base_training_arguments(training_args: TrainingArguments, output_dir: Path, model_args: LlamaModelArguments) -> TrainingArguments:
    """The run's ``TrainingArguments`` turned into those of the base's pretraining (no eval, no saving)."""
    return dataclasses.replace(
        training_args,
        output_dir=str(output_dir),
        max_steps=model_args.base_pretrain_steps,
        learning_rate=model_args.base_learning_rate,
        optim=model_args.base_optim,
        optim_args=None,
        weight_decay=0.0,
        seed=model_args.base_seed,
        data_seed=None,
        eval_strategy="no",
        eval_on_start=False,
        do_eval=False,
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        push_to_hub=False,
        resume_from_checkpoint=None,
        run_name=None,
    )


def pretrained_local_llama(
    model_args: LlamaModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    corpus: DatasetDict,
) -> PreTrainedModel:
    """A Llama built from the recipe's size fields and pretrained on ``corpus`` (cached)."""
    if model_args.base_pretrain_steps <= 0:
        return build_llama(model_args, tokenizer, data_args.block_size)
    key = base_cache_key(model_args, data_args, training_args, tokenizer, corpus)
    entry = resolve_cache_dir(model_args.recipe_cache_dir) / "bases" / f"llama-{key}"
    state = PartialState()
    state.wait_for_everyone()  # every process decides on the same cache state
    if not entry.is_dir():
        staging = entry.with_name(f".{entry.name}.staging")
        if state.is_main_process and staging.exists():
            shutil.rmtree(staging)
        logger.info("pretraining the base Llama for %d steps (cached as %s)", model_args.base_pretrain_steps, entry)
        blocks = packed_lm_datasets(
            DatasetDict(train=corpus["train"]), tokenizer, "text", data_args.block_size, data_args.preprocessing_num_workers
        )
        set_seed(model_args.base_seed)
        trainer = Trainer(
            model=build_llama(model_args, tokenizer, data_args.block_size),
            args=base_training_arguments(training_args, staging, model_args),
            train_dataset=blocks["train"],
            data_collator=default_data_collator,
        )
        trainer.train()
        trainer.save_model(str(staging))
        if state.is_main_process:
            try:
                os.replace(staging, entry)
            except OSError:  # another run cached the same base meanwhile
                shutil.rmtree(staging, ignore_errors=True)
        state.wait_for_everyone()
    return load_pretrained_causal_lm(str(entry), model_args)
