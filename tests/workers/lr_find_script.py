"""An unmodified Trainer script for the range-test tests (``tests/integration/test_find_lr.py``): a tiny GPT-2 on
a learnable toy language (arithmetic token sequences), trained, saved and evaluated like a recipe.

    python -m sai_hf.find_lr tests/workers/lr_find_script.py --output_dir OUT --use_cpu true [TrainingArguments...]
    [--mode normal|no_trainer|exit_before_train|frozen|lora|two_trainers|catch_all|interrupt] [--marker FILE]

Everything after ``train()`` writes (``save_model``, ``save_metrics``, ``save_state``, a marker
file), so a test can check that none of it happened under the range test.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models
from _models import VOCAB, tiny_gpt2  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments  # noqa: E402


@dataclass
class ScriptArguments:
    mode: str = field(default="normal")
    marker: str = field(default="")


class ProgressionDataset(torch.utils.data.Dataset):
    """Sequences ``a, a+d, a+2d, ... (mod VOCAB)`` with a few strides: the next token is learnable."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=gen)
        strides = torch.randint(1, 4, (n, 1), generator=gen)
        self.ids = (starts + strides * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(args: TrainingArguments, mode: str) -> Trainer:
    model = tiny_gpt2()
    if mode == "frozen":  # nothing that changes the loss trains: it cannot decrease
        for p in model.parameters():
            p.requires_grad_(False)
        model.register_parameter("idle", torch.nn.Parameter(torch.ones(4)))

        def touch(module, inputs, output):  # the loss depends on `idle` only through a zero factor
            output.loss = output.loss + 0.0 * module.idle.sum()
            return output

        model.register_forward_hook(touch)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        with torch.no_grad():  # a random base: its tied 0.02-scale head would keep logits near 0 whatever LoRA does
            model.transformer.wte.weight.mul_(25.0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0))
    trainer = Trainer(model=model, args=args, train_dataset=ProgressionDataset(), eval_dataset=ProgressionDataset(16, seed=1))
    if mode == "interrupt":  # Ctrl-C at the third step
        trainer.add_callback(Interrupt())
    return trainer


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    if script.mode == "no_trainer":
        print("this script does not train")
        return
    if script.mode == "exit_before_train":
        sys.exit(3)
    trainer = build(args, script.mode)
    if script.mode == "two_trainers":  # a first Trainer trains normally (e.g. a base model), then the real one
        first = build(args, "normal")
        first.args.max_steps = 2
        first.train()
    if script.mode == "catch_all":
        try:
            trainer.train()
        except Exception:  # noqa: BLE001 - a script that swallows errors must not swallow the range test's end
            print("caught")
    else:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_metrics("train", {"done": 1.0})
    trainer.save_state()
    trainer.evaluate()
    if script.marker:
        with open(script.marker, "w", encoding="utf-8") as fh:
            fh.write("the script ran past train()\n")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "after_train.txt"), "w", encoding="utf-8") as fh:
        fh.write("ran\n")


if __name__ == "__main__":
    main()
