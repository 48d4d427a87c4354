"""Tokenizers for the recipes: a byte-level BPE trained (and cached) on the offline corpus, or a hub one.

The trained tokenizer is GPT-2 style (byte-level BPE, one special token ``<|endoftext|>`` that
serves as BOS, EOS, UNK and padding) and is wrapped as a ``PreTrainedTokenizerFast`` so that
``Trainer``, ``save_pretrained`` and ``AutoTokenizer.from_pretrained`` treat it like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .arguments import ModelArguments
from .cache import build_cached_dir, fingerprint, resolve_cache_dir
from .corpus import corpus_id

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FORMAT_VERSION = 1  # bump when the way tokenizers are trained changes


def train_bpe_tokenizer(texts: Dataset | list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for text in texts if text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000,  # documents are packed into blocks later, never truncated here
    )


def corpus_tokenizer(
    train_split: Dataset, vocab_size: int, cache_dir: str | None = None, text_column: str = "text"
) -> PreTrainedTokenizerFast:
    """The BPE tokenizer for a training split, trained on first use and then loaded from the cache.

    The cache entry ``<cache>/tokenizers/bpe-<vocab_size>-<key>`` is keyed by the vocabulary size and
    the corpus (for the stdlib corpus: Python version, file paths and sizes).
    """
    key = fingerprint(
        {"version": TOKENIZER_FORMAT_VERSION, "vocab_size": vocab_size, "corpus": corpus_id(train_split), "column": text_column}
    )
    entry = resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"

    def build(tmp_dir: Path) -> None:
        logger.info("training a %d-token byte-level BPE tokenizer on %d documents", vocab_size, len(train_split))
        train_bpe_tokenizer(train_split[text_column], vocab_size).save_pretrained(tmp_dir)

    return PreTrainedTokenizerFast.from_pretrained(build_cached_dir(entry, build))


def pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer from the hub or a local directory, with a padding token (EOS if it had none)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def recipe_tokenizer(
    model_args: ModelArguments, train_split: Dataset | None = None, text_column: str = "text"
) -> PreTrainedTokenizerBase:
    """``tokenizer_name``'s tokenizer, else ``model_name_or_path``'s, else a BPE trained on ``train_split``."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return pretrained_tokenizer(name)
    if train_split is None:
        raise ValueError("no tokenizer_name or model_name_or_path given and no training text to train a tokenizer on")
    return corpus_tokenizer(train_split, model_args.tokenizer_vocab_size, model_args.recipe_cache_dir, text_column)
