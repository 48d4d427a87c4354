"""Optimizer memory under DeepSpeed ZeRO, measured from the engine, and the offloaded CPU optimizer
step of SGD-SaI against DeepSpeedCPUAdam on the same partitions.

``memory`` (2 processes)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/zero_memory.py memory --out scripts/results/zero_memory.json

builds a bf16 GPT-2 of the given shapes (default 350M: 24 layers, width 1024) under ZeRO-2, ZeRO-2 +
optimizer offload, ZeRO-3, ZeRO-3 + optimizer offload and ZeRO-3 + optimizer and parameter offload,
with AdamW (torch), SGD-SaI (fp32 momentum) and SGD-SaI (bf16 momentum) as the client optimizer,
takes one training step (optimizer state is created lazily) and sums over both ranks the bytes of
(one process per stage and optimizer keeps the peak low: ``--stages`` and ``--optimizers`` choose)

* the optimizer state (``optimizer.state`` tensors of the wrapped optimizer: AdamW's ``exp_avg`` and
  ``exp_avg_sq``, SGD-SaI's momentum buffer),
* DeepSpeed's fp32 master partitions and their gradient partitions,

each where DeepSpeed placed it (the accelerator, or the CPU with ``offload_optimizer``: read from the
engine's optimizer, ``device`` / ``cpu_offload``), divided by the model's parameter count.

``cpu_step`` (1 process)::

    DS_ACCELERATOR=cpu python scripts/zero_memory.py cpu_step --out scripts/results/zero_cpu_step.json

times one optimizer step on one rank's fp32 partition of the same model (half of it, as with 2
ranks): SGD-SaI stepping a ZeRO flat partition through its fragments (the offloaded path: the
native C loop) against ``deepspeed.ops.adam.DeepSpeedCPUAdam`` (built with DeepSpeed's op builder)
on an identical partition, interleaved, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

STAGES = {
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3},
    "zero3_offload_optimizer": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    "zero3_offload_all": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
}
OPTIMIZERS = ("adamw", "sgd_sai_fp32", "sgd_sai_bf16")


def gpt2(n_layer: int, n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=1024)
    return GPT2LMHeadModel(config).to(torch.bfloat16)


def client_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    from sai_hf import SGDSaI

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=False)
    return SGDSaI(params, lr=1e-4, weight_decay=0.1, momentum_dtype=torch.bfloat16 if name == "sgd_sai_bf16" else None)


def tensor_bytes(value) -> int:
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def measure(stage: str, optimizer_name: str, args) -> dict:
    import deepspeed
    import torch.distributed as dist

    model = gpt2(args.layers, args.width)
    numel = sum(p.numel() for p in model.parameters())
    optimizer = client_optimizer(optimizer_name, model)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": STAGES[stage],
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, 50257, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    zero = engine.optimizer
    offloaded = bool(getattr(zero, "offload_optimizer", False) or getattr(zero, "cpu_offload", False))
    where = "cpu" if offloaded else "accelerator"
    masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups")
    state = sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values())
    master = sum(tensor_bytes(f) for f in masters)
    grads = sum(tensor_bytes(f.grad) for f in masters)
    totals = torch.tensor([state, master, grads], dtype=torch.float64)
    dist.all_reduce(totals)
    state, master, grads = (float(x) / numel for x in totals)
    out = {
        "stage": stage,
        "optimizer": optimizer_name,
        "params": numel,
        "where": where,
        "optimizer_state_bytes_per_param": state,
        "fp32_master_bytes_per_param": master,
        "fp32_grad_partition_bytes_per_param": grads,
    }
    engine.destroy()
    del engine, zero, optimizer, model, masters
    gc.collect()
    return out


def run_memory(args) -> None:
    import torch.distributed as dist

    rows = []
    for stage in args.stages:
        for name in args.optimizers:
            start = time.perf_counter()
            row = measure(stage, name, args)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            if dist.get_rank() == 0:
                print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        write(args.out, {"machine": machine(), "world_size": dist.get_world_size(), "layers": args.layers, "width": args.width, "rows": rows})


# --------------------------------------------------------------------------- the CPU step
def model_shapes(args) -> list[tuple[int, ...]]:
    model = gpt2(args.layers, args.width)
    return [tuple(p.shape) for p in model.parameters()]


def flat_partition(shapes: list[tuple[int, ...]], seed: int) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """One rank's ZeRO flat fp32 partition of a 2-rank run: the first half of the concatenated
    tensors, with each tensor's fragment address (as ``param._hp_mapping`` records it)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    half = (sum(sizes) + 1) // 2
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(half, generator=gen) * 0.02
    flat.grad = torch.randn(half, generator=gen) * 1e-3
    fragments, start = [], 0
    for n in sizes:
        if start >= half:
            break
        numel = min(n, half - start)
        fragments.append(SimpleNamespace(start=start, numel=numel, whole=n))
        start += numel
    return flat, fragments


def sgd_sai_on_partition(flat: torch.Tensor, fragments: list[SimpleNamespace], momentum_dtype) -> torch.optim.Optimizer:
    """SGD-SaI stepping ``flat`` through its fragments: ZeRO-1/2's layout, the offloaded optimizer's path."""
    from sai_hf import SGDSaI

    params = []
    for fragment in fragments:
        p = torch.nn.Parameter(torch.empty(fragment.numel))
        p._hp_mapping = SimpleNamespace(
            hp_fragment=flat.narrow(0, fragment.start, fragment.numel),
            hp_fragment_address=SimpleNamespace(start=fragment.start, numel=fragment.numel),
        )
        params.append(p)
    optimizer = SGDSaI(params, lr=1e-4, weight_decay=0.1, momentum_dtype=momentum_dtype)
    optimizer.param_groups[0]["params"] = [flat]
    return optimizer


def run_cpu_step(args) -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    shapes = model_shapes(args)
    flat_sai, fragments = flat_partition(shapes, 1)
    flat_bf16, _ = flat_partition(shapes, 1)
    flat_adam, _ = flat_partition(shapes, 1)
    contenders = {
        "sgd_sai_fp32": sgd_sai_on_partition(flat_sai, fragments, None),
        "sgd_sai_bf16": sgd_sai_on_partition(flat_bf16, fragments, torch.bfloat16),
        "deepspeed_cpu_adam": DeepSpeedCPUAdam([flat_adam], lr=1e-4, weight_decay=0.1, adamw_mode=True),
    }
    for optimizer in contenders.values():
        optimizer.step()  # SGD-SaI's scaling step; Adam's state allocation
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, optimizer in contenders.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    state = {
        name: sum(tensor_bytes(v) for s in opt.state.values() for v in s.values()) / flat_sai.numel() for name, opt in contenders.items()
    }
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "machine": machine(),
        "partition_entries": flat_sai.numel(),
        "fragments": len(fragments),
        "repeats": args.repeats,
        "median_seconds": medians,
        "all_seconds": times,
        "ratio_to_deepspeed_cpu_adam": {name: m / medians["deepspeed_cpu_adam"] for name, m in medians.items()},
        "optimizer_state_bytes_per_entry": state,
        "cpu_bytes_per_entry_with_fp32_master": {name: 4 + b for name, b in state.items()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=1))
    write(args.out, result)


def machine() -> dict:
    import deepspeed
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "accelerator": os.environ.get("DS_ACCELERATOR", "auto"),
    }


def write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["memory", "cpu_step"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.mode == "memory":
        run_memory(args)
    else:
        run_cpu_step(args)


if __name__ == "__main__":
    sys.exit(main())
