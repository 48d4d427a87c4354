"""Supervised fine-tuning examples: prompt + completion, with the loss on the completion only.

The prompt is tokenised with the tokenizer's usual special tokens (e.g. Llama's BOS), the
completion without them and followed by EOS; labels are ``-100`` on every prompt token, so the
model is trained (and evaluated) on producing the completion. Examples are truncated to
``max_length`` tokens; those left with no completion token are dropped. Alpaca-style records
(``instruction``, optional ``input``, ``output``) are first turned into prompt/completion pairs.
"""

from __future__ import annotations

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from .quiet import quiet_progress

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_COLUMNS = {"instruction": "the Alpaca instruction", "output": "the Alpaca response"}


def alpaca_to_prompt_completion(raw: DatasetDict, num_proc: int | None = None) -> DatasetDict:
    """Format Alpaca records as ``prompt``/``completion`` columns (``input`` is optional)."""

    def to_pair(record: dict[str, str]) -> dict[str, str]:
        template = ALPACA_PROMPT_WITH_INPUT if (record.get("input") or "").strip() else ALPACA_PROMPT
        return {
            "prompt": template.format(instruction=record["instruction"], input=record.get("input") or ""),
            "completion": record["output"],
        }

    with quiet_progress():
        return DatasetDict(
            {
                split: dataset.map(to_pair, num_proc=num_proc, remove_columns=dataset.column_names, desc=f"Formatting {split}")
                for split, dataset in raw.items()
            }
        )


def format_prompts(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    prompt_column: str = "prompt",
    prefix: str = "",
    chat_template: bool = False,
    num_proc: int | None = None,
) -> DatasetDict:
    """``raw`` with each prompt preceded by ``prefix`` and, with ``chat_template``, sent as a user message
    through the tokenizer's chat template with the assistant's turn opened (the completion is its reply).
    ``ValueError`` if the tokenizer has no chat template."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template is true but the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) has no "
            "chat template; set chat_template: false for a base model"
        )
    if not prefix and not chat_template:
        return raw

    def render(record: dict[str, str]) -> dict[str, str]:
        prompt = prefix + record[prompt_column]
        if chat_template:
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {prompt_column: prompt}

    with quiet_progress():
        return DatasetDict(
            {split: dataset.map(render, num_proc=num_proc, desc=f"Formatting {split} prompts") for split, dataset in raw.items()}
        )


def tokenize_prompt_completion(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    num_proc: int | None = None,
    source: str | None = None,
    add_special_tokens: bool = True,
) -> DatasetDict:
    """Tokenise pairs into ``input_ids``/``attention_mask``/``labels`` with ``-100`` on the prompt
    (``source`` names the data in errors; ``add_special_tokens=False`` for prompts that a chat
    template already gave their special tokens)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every completion")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = tokenizer(batch[prompt_column], add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        completions = tokenizer(batch[completion_column], add_special_tokens=False, verbose=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, completion in zip(prompts, completions):
            input_ids = (prompt + completion + [eos])[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion + [eos])[:max_length]
            out["input_ids"].append(input_ids)
            out["attention_mask"].append([1] * len(input_ids))
            out["labels"].append(labels)
        return out

    with quiet_progress():
        tokenized = DatasetDict(
            {
                split: dataset.map(
                    tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names, desc=f"Tokenizing {split}"
                )
                for split, dataset in raw.items()
            }
        )
    def has_target(example: dict[str, list[int]]) -> bool:
        return any(label != IGNORE_INDEX for label in example["labels"])

    with quiet_progress():
        tokenized = DatasetDict(
            {
                split: dataset.filter(has_target, num_proc=num_proc, desc=f"Dropping {split} examples truncated to no target")
                for split, dataset in tokenized.items()
            }
        )
    for split, dataset in tokenized.items():
        if len(dataset) == 0:
            where = f" of dataset {source}" if source else ""
            raise ValueError(
                f"no '{split}' example{where} keeps a completion token within block_size={max_length} "
                "(prompts too long, or empty splits); raise block_size or shorten the prompts"
            )
    return tokenized
