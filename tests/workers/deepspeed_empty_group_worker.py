"""DeepSpeed ZeRO-1/2 with an empty parameter group, for tests/distributed/test_deepspeed.py (2 CPU processes)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/deepspeed_empty_group_worker.py OUT

DeepSpeed's engine drops the optimizer's empty parameter groups before wrapping it, so the optimizer's groups as
constructed and DeepSpeed's partitions no longer have the same indices. Runs, all with ``normalize="max"``:

* ``lora``: PEFT LoRA on the tiny Llama through the Trainer under ZeRO-2: the Trainer's no-weight-decay group is
  empty (no bias, no norm is trainable);
* ``frozen``: the tiny GPT-2 with its biases and LayerNorms frozen through the Trainer under ZeRO-1 (1 sequence per
  rank, gradient accumulation 2): the same empty second group;
* ``plain``: plain ``deepspeed.initialize`` under ZeRO-2 with groups ``[empty, matrices, vectors]`` (the empty
  group first, two groups after it), DeepSpeed's optimizer registered.

Writes ``OUT/rank{r}.json`` (scales by parameter name and SGD-SaI's all_reduces per run) and, from rank 0,
``OUT/weights_<run>.pt`` (the trainable parameters after training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models
from _models import TokenDataset, tiny_gpt2, tiny_llama, training_args  # noqa: E402
from _processes import SAI_ALL_REDUCES, count_sai_all_reduces, end_process_group  # noqa: E402
from transformers import Trainer  # noqa: E402

from deepspeed_worker import plain_engine_run, zero_config  # noqa: E402  (this folder: the engine loop, the configs)
from sai_hf.callback import find_sgd_sai  # noqa: E402
from sai_hf.parameter_names import parameter_names  # noqa: E402


def lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def frozen_gpt2():
    """The tiny GPT-2 with every bias and LayerNorm frozen: only matrices train."""
    model = tiny_gpt2()
    for name, p in model.named_parameters():
        if p.dim() < 2:
            p.requires_grad_(False)
    return model


def trained(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainer_run(out: Path, name: str, stage: int, model, **overrides) -> dict:
    SAI_ALL_REDUCES.clear()
    kwargs = dict(per_device_train_batch_size=2, max_steps=3, deepspeed=zero_config(stage), optim_args="normalize=max")
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=training_args(out / name, **kwargs), train_dataset=TokenDataset())
    trainer.train()
    sai = find_sgd_sai(trainer.optimizer)
    names = parameter_names(trainer.model)
    if dist.get_rank() == 0:
        torch.save(trained(trainer.model), out / f"weights_{name}.pt")
    return {
        "scales": {names[id(p)]: s for p, s in sai.scales().items()},
        "all_reduces": list(SAI_ALL_REDUCES),
        "groups_constructed": [len(g) for g in sai.sharding.groups.added],
        "partitions": len(sai.param_groups),
        "steps": trainer.state.global_step,
    }


def empty_first_groups(model) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def plain_run(out: Path) -> dict:
    model, optimizer = plain_engine_run(empty_first_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(trained(model), out / "weights_plain.pt")
    return {
        "scales": {names[id(p)]: s for p, s in optimizer.scales().items()},
        "all_reduces": list(SAI_ALL_REDUCES),
        "partitions": len(optimizer.param_groups),
    }


def main() -> None:
    out = Path(sys.argv[1])
    count_sai_all_reduces()
    result = {
        "lora": trainer_run(out, "lora", 2, lora_model()),
        "frozen": trainer_run(out, "frozen", 1, frozen_gpt2(), per_device_train_batch_size=1, gradient_accumulation_steps=2),
        "plain": plain_run(out),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
    end_process_group()
