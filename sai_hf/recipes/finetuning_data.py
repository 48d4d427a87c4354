"""The fine-tuning recipe's examples, in any of its three data formats.

* ``prompt_completion``: columns ``prompt_column``/``completion_column``, loss on the completion only;
  offline, the docstring -> body pairs of :mod:`.docstring_pairs`. Prompts (also Alpaca's) may get a
  ``prompt_prefix`` and go through the tokenizer's chat template (``chat_template``, instruct models).
* ``alpaca``: ``instruction``, optional ``input``, ``output`` records (e.g. ``yahma/alpaca-cleaned``),
  formatted with the Alpaca template, loss on the response only.
* ``text``: ``text_column`` packed into blocks, loss on every token (LoRA continued pretraining).
"""

from __future__ import annotations

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from .arguments import FinetuneDataArguments
from .docstring_pairs import docstring_pairs
from .packing import packed_lm_datasets
from .prompt_completion import ALPACA_COLUMNS, alpaca_to_prompt_completion, format_prompts, tokenize_prompt_completion
from .text_datasets import dataset_source, load_raw_datasets, require_text_columns


def finetuning_examples(
    data_args: FinetuneDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    offline_corpus: DatasetDict | None = None,
    seed: int = 42,
) -> DatasetDict:
    """Tokenised ``train``/``validation`` examples in ``data_args.data_format`` (columns checked first).

    With ``offline_corpus`` (the stdlib source files) the examples come from it, else from
    ``dataset_name``/``train_file``.
    """
    if offline_corpus is not None and data_args.data_format == "alpaca":
        raise ValueError("data_format 'alpaca' needs dataset_name or train_file (the offline data has no Alpaca columns)")
    raw = load_raw_datasets(data_args, seed) if offline_corpus is None else None
    source = dataset_source(data_args)
    num_proc = data_args.preprocessing_num_workers
    if data_args.data_format == "text":
        raw = offline_corpus if raw is None else raw
        require_text_columns(
            raw, {data_args.text_column: "the text column, set with --text_column"}, source, allow_missing_values=True
        )
        return packed_lm_datasets(raw, tokenizer, data_args.text_column, data_args.block_size, num_proc, source)
    if data_args.data_format == "alpaca":
        require_text_columns(raw, ALPACA_COLUMNS, source)
        raw = alpaca_to_prompt_completion(raw, num_proc)
        prompt_column, completion_column = "prompt", "completion"
    else:
        raw = docstring_pairs(offline_corpus) if raw is None else raw
        prompt_column, completion_column = data_args.prompt_column, data_args.completion_column
        require_text_columns(
            raw,
            {
                prompt_column: "the prompt column, set with --prompt_column",
                completion_column: "the completion column, set with --completion_column",
            },
            source,
        )
    raw = format_prompts(raw, tokenizer, prompt_column, data_args.prompt_prefix, data_args.chat_template, num_proc)
    return tokenize_prompt_completion(
        raw,
        tokenizer,
        data_args.block_size,
        prompt_column,
        completion_column,
        num_proc,
        source,
        add_special_tokens=not data_args.chat_template,
    )
