"""One sample generation before training and after it: what a fine-tune did, in words.

:class:`SampleGeneration` is a ``TrainerCallback``: at ``on_train_begin`` and ``on_train_end`` it
decodes greedily (``do_sample=False``) from one fixed prompt and prints the completion on the main
process. Every process generates (under DeepSpeed ZeRO-3 each forward needs every rank), with the
model in eval mode and without gradients; the model's training mode is restored after.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from .prompt_completion import IGNORE_INDEX


def prompt_of(example: dict[str, list[int]]) -> list[int]:
    """The prompt tokens of a tokenised example: those whose label is ``-100`` (a prompt/completion
    pair), else the first half of the tokens (a block of text)."""
    ids, labels = example["input_ids"], example.get("labels")
    if labels is not None:
        prompt = [token for token, label in zip(ids, labels) if label == IGNORE_INDEX]
        if prompt:
            return prompt
    return list(ids[: max(1, len(ids) // 2)])


class SampleGeneration(TrainerCallback):
    """Prints the greedy completion of ``prompt_ids`` before training and after it (``self.samples``
    keeps them: ``{"before": text, "after": text}``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.samples: dict[str, str] = {}

    def generate(self, model: torch.nn.Module) -> str:
        """The greedy completion of the prompt (new tokens only, special tokens dropped)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        input_ids = torch.tensor([self.prompt_ids], device=device)
        try:
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
        finally:
            model.train(was_training)
        return self.tokenizer.decode(output[0, len(self.prompt_ids) :], skip_special_tokens=True)

    def _report(self, when: str, state, model) -> None:
        self.samples[when] = self.generate(model)
        if state.is_world_process_zero:
            print(f"sample {when} training (greedy, {self.max_new_tokens} tokens at most):", flush=True)
            print(self.samples[when].rstrip() or "(nothing)", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        prompt = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
        if state.is_world_process_zero:
            print(f"sample prompt:\n{prompt.rstrip()}", flush=True)
        self._report("before", state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._report("after", state, model)
