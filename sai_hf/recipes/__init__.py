"""The recipes behind scripts/: configuration, data, models and training loops for the GPT-2 and LoRA recipes."""

from .quiet import default_deepspeed_accelerator_to_cpu

# Before anything imports DeepSpeed (accelerate's unwrap_model does, whenever it is installed).
default_deepspeed_accelerator_to_cpu()
