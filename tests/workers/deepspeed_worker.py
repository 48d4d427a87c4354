"""DeepSpeed ZeRO worker for tests/distributed/test_deepspeed.py (2 CPU processes, gloo)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/deepspeed_worker.py OUT PART

PART ``trainer`` (ZeRO-2 through the HF Trainer, ``deepspeed=<config dict>``):

* ``a``: 4 steps (2 sequences per rank, the global batch of the single-process reference), a
  DeepSpeed checkpoint at step 2; gsnr.json, final weights, every SGD-SaI all_reduce;
* ``b``: resume from ``a``'s checkpoint-2 to step 4 (the scales must come from the checkpoint);
* ``lora``: PEFT LoRA on the tiny Llama under ZeRO-2 (lora_A's first gradient is exactly 0).

PART ``zero1``: ZeRO-1 through the Trainer with 1 sequence per rank and gradient accumulation 2
(same global batch); plain ``deepspeed.initialize(model=..., optimizer=SGDSaI(...))`` under ZeRO-2 with
two parameter groups and ``normalize="max"`` (DeepSpeed's optimizer registered by
``register_sharded_model``); ZeRO-2 with ``offload_optimizer`` (configs/deepspeed/zero2_offload.json)
through the Trainer with ``normalize=max`` over the Trainer's two groups (``offload_max``).

PART ``bf16``: ZeRO-2 through the Trainer as ``a``, with ``"bf16": {"enabled": true}`` set in the
DeepSpeed config itself (``bf16=True`` in the arguments too: the Trainer refuses a mismatch): bf16
model weights, activations and gradients, fp32 partitions; also the training losses and dtypes.

Writes ``OUT/rank{r}.json`` (and per run ``OUT/<run>/gsnr.json`` from rank 0, ``OUT/weights_<run>.pt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models
from _models import TokenDataset, tiny_gpt2, tiny_llama, token_batches, training_args
from _processes import SAI_ALL_REDUCES, count_sai_all_reduces, end_process_group  # noqa: E402
from transformers import Trainer

from sai_hf.deepspeed import ZeroFragments
from sai_hf import SGDSaI, register_sharded_model
from sai_hf.callback import find_sgd_sai
from sai_hf.parameter_names import parameter_names



CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def zero_config(stage: int | str) -> dict:
    """The shipped configs/deepspeed/zero{stage}.json ("auto" values filled in by the Trainer)."""
    return json.loads((CONFIGS / f"zero{stage}.json").read_text())


def trainer_run(out: Path, name: str, stage: int, model=None, dataset=None, resume=None, **overrides) -> dict:
    SAI_ALL_REDUCES.clear()
    kwargs = dict(per_device_train_batch_size=2, weight_decay=0.01, max_steps=4, deepspeed=zero_config(stage))
    kwargs.update(overrides)
    args = training_args(out / name, **kwargs)
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=dataset if dataset is not None else TokenDataset())
    trainer.train(resume_from_checkpoint=resume)
    sai = find_sgd_sai(trainer.optimizer)
    names = parameter_names(trainer.model)
    scales = {names[id(p)]: s for p, s in sai.scales().items()}
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(weights, out / f"weights_{name}.pt")
    return {
        "scales": scales,
        "all_reduces": list(SAI_ALL_REDUCES),
        "partition_shapes": [[tuple(p.shape) for p in g["params"]] for g in sai.param_groups],
        "zero_layout": all(isinstance(b.backend, ZeroFragments) for b in sai.blocks()),
        "steps": trainer.state.global_step,
        "weights": weights,
        "trainer": trainer,
    }


def lora_run(out: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = trainer_run(out, "lora", 2, model=model, max_steps=3, weight_decay=0.0)
    moved = {n: float((p.detach() - initial[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    run.pop("weights")
    run.pop("trainer")
    return {**run, "moved": moved}


def bf16_run(out: Path) -> dict:
    """ZeRO-2 with ``"bf16": {"enabled": true}`` in the DeepSpeed config (part ``bf16``)."""
    from deepspeed.utils import safe_get_full_fp32_param

    config = {**zero_config(2), "bf16": {"enabled": True}}
    run = trainer_run(out, "bf16", 2, bf16=True, deepspeed=config)
    trainer = run.pop("trainer")
    run.pop("weights")  # bf16 model weights: saved as weights_bf16.pt
    sai = find_sgd_sai(trainer.optimizer)
    # The fp32 master weights SGD-SaI updates (the partitions), gathered per parameter (a collective).
    master = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(master, out / "weights_bf16_master.pt")
    return {
        **run,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "model_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "partition_dtypes": sorted({str(p.dtype) for g in sai.param_groups for p in g["params"]}),
    }


def plain_groups(model) -> list[dict]:
    """Two parameter groups (matrices with weight decay, the rest without), as users build them."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def plain_engine_run(groups_of) -> tuple[torch.nn.Module, SGDSaI]:
    """``deepspeed.initialize(model=tiny GPT-2, optimizer=SGDSaI(groups_of(model), normalize="max"))`` under ZeRO-2,
    DeepSpeed's optimizer registered, and 3 steps of the usual engine loop (2 sequences per rank). Returns the model
    and the optimizer; SGD-SaI's all_reduces are counted afresh."""
    import deepspeed

    SAI_ALL_REDUCES.clear()
    model = tiny_gpt2()
    optimizer = SGDSaI(groups_of(model), lr=1e-3, normalize="max")
    config = {
        **zero_config(2),
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    register_sharded_model(model, engine.optimizer)  # DeepSpeed's optimizer: normalize="max" over every group
    rank = dist.get_rank()
    for ids in token_batches(3, batch=4):
        local = ids[2 * rank : 2 * rank + 2]
        engine.backward(engine(input_ids=local, labels=local).loss)
        engine.step()
    return model, optimizer


def plain_deepspeed(out: Path) -> dict:
    """:func:`plain_engine_run` with two parameter groups: scales, all_reduces, the weights saved from rank 0."""
    model, optimizer = plain_engine_run(plain_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)]: s for p, s in optimizer.scales().items()}
    if dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights_plain.pt")
    return {"scales": scales, "all_reduces": list(SAI_ALL_REDUCES)}


def main() -> None:
    out, part = Path(sys.argv[1]), sys.argv[2]
    count_sai_all_reduces()
    result: dict = {}
    if part == "trainer":
        a = trainer_run(out, "a", 2, save_strategy="steps", save_steps=2)
        b = trainer_run(out, "b", 2, resume=str(out / "a" / "checkpoint-2"))
        result["a"] = {k: v for k, v in a.items() if k not in ("weights", "trainer")}
        result["b"] = {k: v for k, v in b.items() if k not in ("weights", "trainer")}
        result["resumed_weights_max_abs_diff"] = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
        result["lora"] = lora_run(out)
    elif part == "zero1":
        run = trainer_run(out, "zero1", 1, per_device_train_batch_size=1, gradient_accumulation_steps=2)
        run.pop("weights")
        run.pop("trainer")
        result["zero1"] = run
        result["plain"] = plain_deepspeed(out)
        offload = trainer_run(out, "offload_max", "2_offload", optim_args="normalize=max")
        offload.pop("trainer")
        offload.pop("weights")  # saved as weights_offload_max.pt
        result["offload_max"] = offload
    elif part == "bf16":
        result["bf16"] = bf16_run(out)
    rank = dist.get_rank()
    result["world"] = dist.get_world_size()
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
    end_process_group()
