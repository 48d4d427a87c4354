"""The recipes' own argument dataclasses (parsed next to ``transformers.TrainingArguments``).

Every field can be set in the YAML config or overridden as ``--field value``. Field names never
clash with ``TrainingArguments`` (``HfArgumentParser`` parses them all into one namespace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..callback import checked_track_every

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


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


@dataclass
class GPT2ModelArguments(ModelArguments):
    """Size of the GPT-2 built from a ``GPT2Config`` when ``model_name_or_path`` is unset."""

    n_layer: int = field(default=4, metadata=_help("Transformer blocks (gpt2: 12, medium: 24, large: 36, xl: 48)."))
    n_embd: int = field(default=256, metadata=_help("Hidden size (gpt2: 768, medium: 1024, large: 1280, xl: 1600)."))
    n_head: int = field(default=4, metadata=_help("Attention heads (gpt2: 12, medium: 16, large: 20, xl: 25)."))
    n_positions: int | None = field(default=None, metadata=_help("Context length (default: block_size)."))
    model_dropout: float = field(default=0.0, metadata=_help("Residual, embedding and attention dropout."))


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

    def __post_init__(self) -> None:
        checked_track_every(self.gsnr_track_every, "gsnr_track_every")


@dataclass
class LoraArguments:
    """The PEFT LoRA adapter."""

    lora_r: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_LORA_TARGETS),
        metadata=_help("Module names that get adapters (Llama attention and MLP projections)."),
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
