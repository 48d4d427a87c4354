"""A small Llama that has learned something, for the offline LoRA recipe to fine-tune.

LoRA on random weights would show little, so a freshly built Llama is first given
``base_pretrain_steps`` of causal-LM pretraining on the stdlib corpus, with a plain ``Trainer``,
``base_optim`` at ``base_learning_rate`` (default arguments, no weight decay) and ``base_seed``.
The base's own settings are fixed (:data:`FIXED_FIELDS` at ``TrainingArguments``' defaults: the
run's ``max_grad_norm``, Adam betas and epsilon, label smoothing, ... never reach it); the few it
takes from the run (:data:`KEYED_FIELDS`: batch size, LR schedule, mixed precision, which depend on
the machine and launch) are part of the cache key. The result is cached under
``<recipe_cache_dir>/bases/`` keyed by everything that shapes it (model config, tokenizer
vocabulary, corpus, steps, those fields, optimizer, seed), so later runs load it in a second and a
cached base does not depend on which run created it. Under ``accelerate launch`` every process
trains together and the main one saves, through a staging directory of its own (named by a token
the main process broadcasts), so runs building the same base at once never touch each other's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
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

BASE_FORMAT_VERSION = 3  # bump when the way bases are pretrained changes (2: base_optim, base_seed; 3: fixed settings)

#: ``TrainingArguments`` fields that shape the base's weights and are *not* taken from the run: the
#: base is pretrained with their ``TrainingArguments`` defaults, whatever the run says. Both transformers
#: lines' names (5.x ``train_sampling_strategy`` is 4.57's ``group_by_length``); those the installed
#: ``TrainingArguments`` lacks are skipped (:func:`_present`).
FIXED_FIELDS = (
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "neftune_noise_alpha",
    "optim_target_modules", "average_tokens_across_devices", "tf32", "torch_compile", "use_liger_kernel",
    "liger_kernel_config", "auto_find_batch_size", "dataloader_drop_last", "train_sampling_strategy",
    "group_by_length", "full_determinism", "num_train_epochs",
)  # fmt: skip
#: Fields taken from the run (its machine and launch decide them) and therefore in the cache key (4.57 also
#: has ``warmup_ratio``, which 5.x folded into ``warmup_steps``).
KEYED_FIELDS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "warmup_ratio", "bf16", "fp16",
)  # fmt: skip


def _present(names: tuple[str, ...]) -> dict[str, dataclasses.Field]:
    """The fields of the installed ``TrainingArguments`` among ``names``, by name."""
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    return {name: fields[name] for name in names if name in fields}


def _field_default(found: dataclasses.Field) -> object:
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


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
            "run_fields": {name: str(getattr(training_args, name)) for name in _present(KEYED_FIELDS)},
            "world_size": training_args.world_size,
            "split_batches": bool(getattr(training_args.accelerator_config, "split_batches", False)),
            "optim": model_args.base_optim,
            "seed": model_args.base_seed,
        }
    )


def base_training_arguments(training_args: TrainingArguments, output_dir: Path, model_args: LlamaModelArguments) -> TrainingArguments:
    """The run's ``TrainingArguments`` turned into those of the base's pretraining (no eval, no saving,
    :data:`FIXED_FIELDS` at their defaults)."""
    return dataclasses.replace(
        training_args,
        **{name: _field_default(found) for name, found in _present(FIXED_FIELDS).items()},
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
        staging = entry.with_name(f".{entry.name}.staging-{_launch_token(state)}")  # this launch's own
        try:
            _pretrain_into(staging, model_args, data_args, training_args, tokenizer, corpus)
            if state.is_main_process:
                try:
                    os.replace(staging, entry)
                except OSError:  # another run cached the same base meanwhile
                    pass
        finally:
            if state.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
        state.wait_for_everyone()
    return load_pretrained_causal_lm(str(entry), model_args)


def _launch_token(state: PartialState) -> str:
    """A name for this launch's staging directory, the same on every process of it (the main
    process's, broadcast), different from any other run's: a run building the same base at the
    same time must not delete or write into ours."""
    token = [uuid.uuid4().hex[:12]]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def _pretrain_into(
    staging: Path,
    model_args: LlamaModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    corpus: DatasetDict,
) -> None:
    """Pretrain a fresh base and save it into ``staging``."""
    logger.info("pretraining the base Llama for %d steps (staged in %s)", model_args.base_pretrain_steps, staging)
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
