"""Causal LMs for the recipes: a pretrained checkpoint, or a fresh GPT-2 / Llama built from a config."""

from __future__ import annotations

import logging

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .arguments import GPT2ModelArguments, LlamaModelArguments, ModelArguments

logger = logging.getLogger(__name__)


def load_pretrained_causal_lm(name_or_path: str, model_args: ModelArguments) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the recipe's dtype and attention kernel."""
    kwargs: dict[str, object] = {"dtype": model_args.model_dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return _with_causal_lm_loss(AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs))


def _special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def gpt2_config(model_args: GPT2ModelArguments, vocab_size: int, block_size: int, **token_ids: int | None) -> GPT2Config:
    """The ``GPT2Config`` described by the recipe's size fields."""
    if model_args.n_embd % model_args.n_head:
        raise ValueError(f"n_embd={model_args.n_embd} must be divisible by n_head={model_args.n_head}")
    n_positions = model_args.n_positions or block_size
    if block_size > n_positions:
        raise ValueError(f"block_size={block_size} exceeds the model's n_positions={n_positions}")
    dropout = model_args.model_dropout
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=model_args.n_embd,
        n_layer=model_args.n_layer,
        n_head=model_args.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **token_ids,
    )


def llama_config(model_args: LlamaModelArguments, vocab_size: int, block_size: int, **token_ids: int | None) -> LlamaConfig:
    """The ``LlamaConfig`` described by the recipe's size fields (tied embeddings)."""
    if model_args.hidden_size % model_args.num_attention_heads:
        raise ValueError(
            f"hidden_size={model_args.hidden_size} must be divisible by num_attention_heads={model_args.num_attention_heads}"
        )
    if model_args.num_attention_heads % model_args.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={model_args.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={model_args.num_key_value_heads}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        max_position_embeddings=block_size,
        tie_word_embeddings=True,
        **token_ids,
    )


def _with_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the loss of a causal LM whose class name does not say it (``ForCausalLM``).

    transformers derives ``loss_type`` from the class name; ``GPT2LMHeadModel`` matches none. The
    model then falls back to ``ForCausalLMLoss`` with a "``loss_type=None`` ... unrecognized"
    warning, and the ``Trainer``, not knowing the loss shifts the labels, counts every label of a
    block as a target (``num_items_in_batch``): the loss it trains on and reports is the mean token
    cross-entropy times (block_size - 1) / block_size. Named, the loss is the mean over the tokens
    actually predicted, and the warning is gone."""
    if getattr(model, "loss_type", "unset") is None:
        model.loss_type = "ForCausalLM"
    return model


def _from_config(config: GPT2Config | LlamaConfig, model_args: ModelArguments) -> PreTrainedModel:
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    return _with_causal_lm_loss(AutoModelForCausalLM.from_config(config, **kwargs))


def build_gpt2(model_args: GPT2ModelArguments, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    """A randomly initialised GPT-2 sized by ``model_args`` for ``tokenizer``'s vocabulary."""
    config = gpt2_config(model_args, len(tokenizer), block_size, **_special_token_ids(tokenizer))
    return _from_config(config, model_args)


def build_llama(model_args: LlamaModelArguments, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    """A randomly initialised Llama sized by ``model_args`` for ``tokenizer``'s vocabulary."""
    config = llama_config(model_args, len(tokenizer), block_size, **_special_token_ids(tokenizer))
    return _from_config(config, model_args)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding matrix if the tokenizer has more tokens than the model (e.g. an added pad)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        logger.info("resizing token embeddings to %d for the tokenizer", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
