"""The recipes behind scripts/: configuration, data, models and training loops for the GPT-2 and LoRA recipes."""
