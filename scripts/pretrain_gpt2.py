#!/usr/bin/env python
"""Pretrain GPT-2 (causal LM) with SGD-SaI through ``transformers.Trainer``.

    python scripts/pretrain_gpt2.py configs/gpt2-local.yaml [--field value ...]
    accelerate launch --config_file configs/accelerate/multi-gpu.yaml scripts/pretrain_gpt2.py configs/gpt2-124m.yaml

The config file sets ``TrainingArguments`` fields and the recipe's own (``GPT2ModelArguments``,
``DataArguments``: see ``--help``); ``--field value`` after it overrides them. With no dataset the
text is the Python standard library's sources and the tokenizer a byte-level BPE trained on them;
with ``dataset_name``/``train_file`` and ``tokenizer_name``/``model_name_or_path`` it is the hub's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import sai_hf  # noqa: F401  (registers --optim sgd_sai)
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sai_hf  # noqa: F401

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from sai_hf.recipes.arguments import DataArguments, DiagnosticsArguments, GPT2ModelArguments
from sai_hf.recipes.config import parse_recipe_args
from sai_hf.recipes.corpus import stdlib_corpus
from sai_hf.recipes.gguf import resolve_gguf
from sai_hf.recipes.models import build_gpt2, count_parameters, fit_embeddings_to_tokenizer, load_pretrained_causal_lm
from sai_hf.recipes.packing import packed_lm_datasets
from sai_hf.recipes.text_datasets import (
    dataset_source,
    load_raw_datasets,
    require_text_columns,
    select_first,
    uses_offline_corpus,
)
from sai_hf.recipes.tokenizer import recipe_tokenizer
from sai_hf.recipes.training import (
    RecipeResult,
    announce,
    build_trainer,
    prepare_or_exit,
    setup_logging,
    train_and_evaluate,
)

TITLE = "GPT-2 pretraining"

#: The argument dataclasses of the command line, in the order ``prepare`` unpacks them.
ARGUMENTS = (GPT2ModelArguments, DataArguments, DiagnosticsArguments, TrainingArguments)


def main(argv: Sequence[str] | None = None) -> RecipeResult:
    """Run the recipe on ``argv`` (``CONFIG.yaml [--field value ...]``, default ``sys.argv[1:]``)."""
    return train_and_evaluate(prepare(argv), title=TITLE)


def prepare(argv: Sequence[str] | None = None) -> Trainer:
    """Everything before training: parse ``argv``, load and pack the data, build the model and the
    ``Trainer``. Bad input raises here (``ValueError``/``FileNotFoundError`` naming it)."""
    model_args, data_args, diagnostics, training_args = parse_recipe_args(argv, ARGUMENTS, prog="pretrain_gpt2.py")
    setup_logging(training_args)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="converting gguf_file"):
        model_args = resolve_gguf(model_args)

    with training_args.main_process_first(desc="loading and tokenizing the data"):
        if uses_offline_corpus(data_args):
            raw = stdlib_corpus(data_args.corpus_max_files, data_args.validation_split_percentage)
        else:
            raw = load_raw_datasets(data_args, seed=training_args.seed)
        source = dataset_source(data_args)
        require_text_columns(
            raw, {data_args.text_column: "the text column, set with --text_column"}, source, allow_missing_values=True
        )
        tokenizer = recipe_tokenizer(model_args, raw["train"], data_args.text_column)
        blocks = packed_lm_datasets(
            raw, tokenizer, data_args.text_column, data_args.block_size, data_args.preprocessing_num_workers, source
        )
    train_dataset = select_first(blocks["train"], data_args.max_train_samples)
    eval_dataset = select_first(blocks["validation"], data_args.max_eval_samples)

    if model_args.model_name_or_path:
        model = load_pretrained_causal_lm(model_args.model_name_or_path, model_args)
        fit_embeddings_to_tokenizer(model, tokenizer)
    else:
        model = build_gpt2(model_args, tokenizer, data_args.block_size)
    announce(
        training_args,
        f"{model.config.model_type} with {count_parameters(model) / 1e6:.1f}M parameters; {len(train_dataset)} training and "
        f"{len(eval_dataset)} evaluation blocks of {data_args.block_size} tokens from {dataset_source(data_args)}",
    )

    return build_trainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        tokenizer,
        default_data_collator,
        diagnostics.gsnr_track_every,
        diagnostics.sample_max_new_tokens,
    )


if __name__ == "__main__":
    train_and_evaluate(prepare_or_exit(prepare, None, "pretrain_gpt2.py"), title=TITLE)
