"""Causal-LM pretraining examples: tokenise documents and pack them into fixed-length blocks.

Documents are tokenised without special tokens, each followed by EOS, concatenated and cut into
``block_size`` blocks (the remainder of each ``datasets.map`` batch is dropped), as in the
Transformers ``run_clm`` example. Labels are a copy of the inputs: the model shifts them itself.
Both steps are ``datasets.map`` calls, so hub datasets get ``datasets``' on-disk caching.
"""

from __future__ import annotations

from itertools import chain

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from .quiet import quiet_progress


def tokenize_documents(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, text_column: str, num_proc: int | None = None
) -> DatasetDict:
    """Replace every split's columns by ``input_ids``: each document's tokens followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which packing needs to separate documents")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [text or "" for text in batch[text_column]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    with quiet_progress():
        return DatasetDict(
            {
                split: dataset.map(
                    tokenize,
                    batched=True,
                    num_proc=num_proc,
                    remove_columns=dataset.column_names,
                    desc=f"Tokenizing {split}",
                )
                for split, dataset in raw.items()
            }
        )


def pack_into_blocks(
    tokenized: DatasetDict, block_size: int, num_proc: int | None = None, source: str | None = None
) -> DatasetDict:
    """Concatenate ``input_ids`` and cut them into ``block_size`` blocks with labels and attention masks.

    ``ValueError`` naming the split and ``source`` (where the data came from) if a split yields no block."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")

    def pack(batch: dict[str, list]) -> dict[str, list]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) - len(stream) % block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [b[:] for b in blocks]}

    with quiet_progress():
        packed = DatasetDict(
            {
                split: dataset.map(pack, batched=True, num_proc=num_proc, desc=f"Packing {split} into blocks of {block_size}")
                for split, dataset in tokenized.items()
            }
        )
    for split, dataset in packed.items():
        if len(dataset) == 0:
            where = f" of dataset {source}" if source else ""
            raise ValueError(
                f"the '{split}' split{where} has fewer than block_size={block_size} tokens; "
                "use more data or a smaller block_size"
            )
    return packed


def packed_lm_datasets(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    block_size: int,
    num_proc: int | None = None,
    source: str | None = None,
) -> DatasetDict:
    """Tokenise ``raw[...][text_column]`` and pack it into ``block_size`` blocks (``source`` names the
    data in errors)."""
    return pack_into_blocks(tokenize_documents(raw, tokenizer, text_column, num_proc), block_size, num_proc, source)

