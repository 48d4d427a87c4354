"""LoRA adapters with PEFT."""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from .arguments import LoraArguments
from .models import count_parameters

logger = logging.getLogger(__name__)


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    """The ``LoraConfig`` for a causal LM described by the recipe's LoRA fields."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=list(lora_args.lora_target_modules),
    )


def apply_lora(model: PreTrainedModel, lora_args: LoraArguments) -> PeftModel | PreTrainedModel:
    """Freeze ``model`` and add trainable LoRA adapters to its target modules; ``lora_r=0``: ``model``
    itself, every weight trained (full fine-tuning)."""
    if lora_args.lora_r == 0:
        logger.info("lora_r=0: full fine-tuning, no adapter")
        return model
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora_args.lora_target_modules if target not in names]
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} match no module of {type(model).__name__}; "
            f"Llama's are {['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']}"
        )
    peft_model = get_peft_model(model, lora_config(lora_args))
    logger.info(
        "LoRA: %d trainable of %d parameters",
        count_parameters(peft_model, trainable_only=True),
        count_parameters(peft_model),
    )
    return peft_model
