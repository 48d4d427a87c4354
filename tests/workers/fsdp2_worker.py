"""FSDP2 Trainer worker for test_distributed (2 CPU processes, gloo)::

    accelerate launch --config_file tests/workers/accelerate_fsdp2_cpu.yaml -m sai_hf.run tests/workers/fsdp2_worker.py OUT

1. Run "a": 4 steps, checkpoints at steps 2 and 4; at the first optimizer step, also compares the
   reducer's sums with the statistics of the gathered whole gradients, and counts the all_reduce
   calls sai_hf makes.
2. Run "b": a differently initialised model resumed from run a's checkpoint-2 to step 4.

Writes ``OUT/rank{r}.json`` (scales of both runs, checks) and, from rank 0, ``OUT/a/gsnr.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from cpu_fsdp import enable_fsdp_on_cpu  # tests/workers, the script's directory
from transformers import Trainer, TrainerCallback

import sai_hf.sharding
from sai_hf import GSNRCallback, find_sgd_sai, gradient_statistics, gsnr_from_statistics, statistics_reducer
from sai_hf.parameter_names import parameter_names

sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models
from _models import TokenDataset, tiny_gpt2, training_args  # noqa: E402
from _processes import SAI_ALL_REDUCES, count_sai_all_reduces, end_process_group  # noqa: E402

#: Same data, hyperparameters and global batch (2 x 2) as the single-process reference in the test.
ARGS = dict(per_device_train_batch_size=2, weight_decay=0.01, max_steps=4, save_strategy="steps", save_steps=2)

WRITES: list[str] = []


def count_report_writes() -> None:
    original = GSNRCallback.write_report

    def write_report(self, path, sai, names):
        WRITES.append(str(path))
        return original(self, path, sai, names)

    GSNRCallback.write_report = write_report


def gsnr(stats: torch.Tensor) -> torch.Tensor:
    return gsnr_from_statistics(stats, 1e-8)[0]


class ReducerCheck(TrainerCallback):
    """At the first optimizer step (after GSNRCallback): reduced per-shard statistics vs whole-tensor ones."""

    def __init__(self) -> None:
        self.result: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.result is not None:
            return
        sai = find_sgd_sai(optimizer)
        blocks = [p for group in sai.param_groups for p in group["params"] if p.grad is not None]
        before = len(SAI_ALL_REDUCES)
        reduced = statistics_reducer(blocks)(sai_hf.sharding.local_statistics(blocks))
        whole = gradient_statistics([p.grad.full_tensor() for p in blocks])
        local_n = gradient_statistics([p.grad for p in blocks])[:, 0]
        self.result = {
            "blocks": len(blocks),
            "dtensor_grads": sum(type(p.grad).__name__ == "DTensor" for p in blocks),
            "sharded_blocks": int((local_n < whole[:, 0]).sum()),
            "count_equal": bool(torch.equal(reduced[:, 0], whole[:, 0])),
            "max_rel_diff": float(((gsnr(reduced) - gsnr(whole)).abs() / gsnr(whole).clamp_min(1e-300)).max()),
            "check_all_reduces": len(SAI_ALL_REDUCES) - before,
        }
        del SAI_ALL_REDUCES[before:]


def scales_by_name(trainer: Trainer) -> dict[str, float]:
    sai = find_sgd_sai(trainer.optimizer)
    names = parameter_names(trainer.model)
    return {names[id(p)]: sai.state[p]["scale"] for g in sai.param_groups for p in g["params"] if sai.has_scale(p)}


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    names = parameter_names(trainer.model)
    return {names[id(p)]: p.full_tensor().detach().clone() for p in trainer.model.parameters()}


def main(out: Path) -> None:
    enable_fsdp_on_cpu()
    count_sai_all_reduces()
    count_report_writes()

    check = ReducerCheck()
    args = training_args(out / "a", **ARGS)
    a = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[check])
    a.train()
    rank = dist.get_rank()
    result = {
        "rank": rank,
        "world": dist.get_world_size(),
        "fsdp_version": a.accelerator.state.fsdp_plugin.fsdp_version,
        "scales_a": scales_by_name(a),
        "all_reduces_a": list(SAI_ALL_REDUCES),
        "writes_a": list(WRITES),
        "reducer": check.result,
    }
    weights_a = full_weights(a)
    if rank == 0:
        torch.save(weights_a, out / "weights_a.pt")
    del SAI_ALL_REDUCES[:], WRITES[:]

    b = Trainer(model=tiny_gpt2(seed=123), args=training_args(out / "a", **ARGS), train_dataset=TokenDataset())
    b.train(resume_from_checkpoint=str(out / "a" / "checkpoint-2"))
    weights_b = full_weights(b)
    result.update(
        scales_b=scales_by_name(b),
        writes_b=list(WRITES),
        resumed_weights_max_abs_diff=max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a),
    )
    del WRITES[:]

    # The same round trip with full (gathered) state dicts, as configs/accelerate/fsdp.yaml saves them
    # (accelerate launch passes the config as FSDP_* variables; TrainingArguments rebuilds the state).
    os.environ["FSDP_STATE_DICT_TYPE"] = "FULL_STATE_DICT"
    c = Trainer(model=tiny_gpt2(), args=training_args(out / "c", **ARGS), train_dataset=TokenDataset())
    c.train()
    weights_c = full_weights(c)
    result["writes_c"] = list(WRITES)
    del WRITES[:]
    d = Trainer(model=tiny_gpt2(seed=123), args=training_args(out / "c", **ARGS), train_dataset=TokenDataset())
    d.train(resume_from_checkpoint=str(out / "c" / "checkpoint-2"))
    weights_d = full_weights(d)
    result.update(
        full_state_dict_type=str(d.accelerator.state.fsdp_plugin.state_dict_type),
        scales_c=scales_by_name(c),
        scales_d=scales_by_name(d),
        writes_d=list(WRITES),
        resumed_full_weights_max_abs_diff=max(float((weights_c[k] - weights_d[k]).abs().max()) for k in weights_c),
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process_group()
