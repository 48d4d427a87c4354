"""DeepSpeed ZeRO-3 and optimizer / parameter offload worker for tests/distributed/test_deepspeed_zero3.py (2 CPU
processes, gloo)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/deepspeed_zero3_worker.py OUT CONFIG [EXTRA...]

CONFIG is a shipped config name (``zero3``, ``zero3_offload``, ``zero2_offload``): the HF Trainer with
``deepspeed=<that config>`` ("auto" values filled in by the Trainer) runs

* ``a``: 4 steps, 2 sequences per rank (the global batch of the single-process reference), weight
  decay 0.01, a DeepSpeed checkpoint at step 2; gsnr.json, losses, every SGD-SaI all_reduce, the
  fp32 master weights gathered per parameter, the saved model (``trainer.save_model``);
* ``b``: resume from ``a``'s checkpoint-2 to step 4 (the scales come from the checkpoint);

CONFIG ``plain``: ``deepspeed.initialize(model=OddModule(), optimizer=SGDSaI(...))`` under ZeRO-3 with
sub_group_size 10 (3 sub-groups), a one-element parameter and odd sizes (padding, a rank holding no
entry of a block), gradient clipping on every step, with and without optimizer + parameter offload;
``normalize="max"`` with one sub-group and with 3; fp16 (loss scale 256) with 3 sub-groups and with one.

and, with EXTRA ``lora``: PEFT LoRA on the tiny Llama (lora_A's first gradient is exactly 0), and its
resume from step 1 (lora_A not scaled yet); with
``hostile``: 1 sequence per rank x 2 accumulation steps, clipping 0.05 (every step clipped), weight
decay 0.1, bf16 momentum, normalize="max", eps 1e-4 (the g-SNR depends on the clipping factor), and
its resume from step 2; with ``bf16``: ``"bf16": {"enabled": true}`` in the config; with
``resume_from CHECKPOINT`` (run with another number of processes): the resume's error.

Writes ``OUT/rank{r}.json`` (and per run ``OUT/<run>/gsnr.json`` from rank 0, ``OUT/weights_<run>.pt``).
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

from sai_hf.callback import find_sgd_sai
from sai_hf.parameter_names import parameter_names

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
HOSTILE_OPTIM_ARGS = "momentum_dtype=bfloat16,normalize=max,eps=1e-4"


def shipped(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def master_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weights SGD-SaI updates, gathered per parameter (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainer_run(out: Path, name: str, config: dict, model=None, resume=None, save=False, **overrides) -> dict:
    SAI_ALL_REDUCES.clear()
    kwargs = dict(per_device_train_batch_size=2, weight_decay=0.01, max_steps=4, deepspeed=config)
    kwargs.update(overrides)
    args = training_args(out / name, **kwargs)
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=resume)
    sai = find_sgd_sai(trainer.optimizer)
    names = parameter_names(trainer.model)
    blocks = sai.blocks()
    scales = {names[id(b.param)]: b.state["scale"] for b in blocks if "scale" in b.state}
    weights = master_weights(trainer.model)
    if dist.get_rank() == 0:
        torch.save(weights, out / f"weights_{name}.pt")
    if save:
        trainer.save_model(str(out / name / "saved"))
    zero = getattr(blocks[0].backend, "zero_optimizer", lambda: None)()
    return {
        "scales": scales,
        "all_reduces": list(SAI_ALL_REDUCES),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "backends": sorted({type(b.backend).__name__ for b in blocks}),
        "partition_devices": sorted({str(p.device) for g in sai.param_groups for p in g["params"]} | {str(b.local.device) for b in blocks}),
        "momentum_dtypes": sorted({str(s["momentum_buffer"].dtype) for s in sai.state.values() if "momentum_buffer" in s}),
        "sub_groups": None if zero is None else len(zero.fp16_groups),
        "steps": trainer.state.global_step,
        "weights": weights,
    }


class OddModule(torch.nn.Module):
    """Odd sizes (35 and 5 entries: padded pieces), a one-element parameter (rank 1 holds none of it;
    degenerate: it gets the largest g-SNR, which is b.weight's, in a later sub-group)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(7, 5)
        self.t = torch.nn.Parameter(torch.ones(1))
        self.b = torch.nn.Linear(5, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.b(torch.tanh(self.a(x))) * self.t).pow(2).mean()


#: Every step clipped, and an eps of the order of the clipped gradients' spread: the g-SNR then depends
#: on the clipping factor, so a later sub-group measured with another factor than DeepSpeed's is seen.
PLAIN_CLIP, PLAIN_EPS = 0.01, 1e-4


def odd_batches(steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8, 7, generator=gen) for _ in range(steps)]


def plain_run(zero: dict, normalize: str = "none", zero_init: bool = False, fp16: bool = False) -> dict:
    """``deepspeed.initialize`` with an SGD-SaI client optimizer, 4 rows per rank, 3 steps.
    ``zero_init``: the model is built under ``deepspeed.zero.Init`` (partitioned as it is created, as
    ``from_pretrained`` does under a ZeRO-3 config), so SGD-SaI is constructed over empty ZeRO-3
    parameters. ``fp16``: fp16 with a loss scale (the gradients DeepSpeed hands over are unscaled
    by the same factor as the clipping)."""
    import contextlib

    import deepspeed

    from sai_hf import SGDSaI

    SAI_ALL_REDUCES.clear()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "gradient_clipping": PLAIN_CLIP, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}  # fmt: skip
    if fp16:
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
        # DeepSpeed's CPU accelerator reports fp16 as supported only where oneDNN has native fp16 kernels
        # (AVX512-FP16 / AMX CPUs; not e.g. AMD EPYC): its sanity check would refuse the config on those.
        # torch's CPU kernels run fp16 everywhere; what is tested is SGD-SaI under DeepSpeed's loss scale.
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    with deepspeed.zero.Init(config_dict_or_path=config) if zero_init else contextlib.nullcontext():
        model = OddModule()
    optimizer = SGDSaI(model.parameters(), lr=1e-2, weight_decay=0.1, normalize=normalize, eps=PLAIN_EPS)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rank = dist.get_rank()
    try:
        for x in odd_batches():
            engine.backward(engine(x[4 * rank : 4 * rank + 4].to(torch.float16 if fp16 else torch.float32)))
            engine.step()
    except Exception as err:  # noqa: BLE001 - recorded for the test
        return {"error": f"{type(err).__name__}: {err}"}
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "scales": {names[id(p)]: s for p, s in optimizer.scales().items()},
        "all_reduces": list(SAI_ALL_REDUCES),
        "sub_groups": len(engine.optimizer.fp16_groups),
        "loss_scale": float(engine.optimizer.loss_scale),
        "weights": {n: w.tolist() for n, w in master_weights(model).items()},
    }


def strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "weights"}


def main() -> None:
    out, name, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    count_sai_all_reduces()
    result: dict = {}
    if name == "plain":
        offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
        small = {"stage": 3, "sub_group_size": 10, "stage3_param_persistence_threshold": 0}
        result["plain"] = plain_run(small)
        result["plain_offload"] = plain_run({**small, **offload})
        result["param_offload_only"] = plain_run({**small, "offload_param": {"device": "cpu"}})
        result["max_one_sub_group"] = plain_run({"stage": 3}, normalize="max")
        result["max_sub_groups"] = plain_run(small, normalize="max")
        result["zero_init"] = plain_run(small, zero_init=True)
        result["fp16_sub_groups"] = plain_run(small, fp16=True)
        result["fp16_one_sub_group"] = plain_run({"stage": 3}, fp16=True)
        result["world"] = dist.get_world_size()
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1, default=str))
        return
    config = shipped(name)
    if extra and extra[0] == "resume_from":  # another world size than the checkpoint's
        try:
            trainer_run(out, "other_world", config, resume=extra[1], per_device_train_batch_size=4)
            result["error"] = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            result["error"] = f"{type(err).__name__}: {err}"
    elif "lora" in extra:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        run = trainer_run(out, "lora", config, model=model, max_steps=3, weight_decay=0.0, save_strategy="steps", save_steps=1)
        result["lora"] = {**strip(run), "moved": {n: float((w - initial[n]).abs().max()) for n, w in run["weights"].items()}}
        # Interrupted after step 1, while every lora_A still waits for its scale: resumed, lora_A is
        # scaled at step 2 as in the uninterrupted run (eps dropped: scaled after the first scaling step).
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        resumed = trainer_run(out, "lora_b", config, model=model, max_steps=3, weight_decay=0.0, resume=str(out / "lora" / "checkpoint-1"))
        result["lora_b"] = strip(resumed)
        result["lora_resumed_weights_max_abs_diff"] = max(float((run["weights"][k] - resumed["weights"][k]).abs().max()) for k in run["weights"])
    elif "hostile" in extra:
        hostile = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.05, weight_decay=0.1, optim_args=HOSTILE_OPTIM_ARGS)
        run = trainer_run(out, "hostile", config, save_strategy="steps", save_steps=2, **hostile)
        resumed = trainer_run(out, "hostile_b", config, resume=str(out / "hostile" / "checkpoint-2"), **hostile)
        result["hostile"], result["hostile_b"] = strip(run), strip(resumed)
        result["hostile_resumed_weights_max_abs_diff"] = max(float((run["weights"][k] - resumed["weights"][k]).abs().max()) for k in run["weights"])
    elif "bf16" in extra:
        run = trainer_run(out, "bf16", {**config, "bf16": {"enabled": True}}, bf16=True)
        result["bf16"] = strip(run)
    else:
        a = trainer_run(out, "a", config, save_strategy="steps", save_steps=2, save=True)
        b = trainer_run(out, "b", config, resume=str(out / "a" / "checkpoint-2"))
        result["a"], result["b"] = strip(a), strip(b)
        result["resumed_weights_max_abs_diff"] = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
    result["world"] = dist.get_world_size()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
    end_process_group()
