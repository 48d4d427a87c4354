"""Sharded-statistics worker for test_distributed (2 CPU processes, gloo)::

    torchrun --nproc_per_node 2 tests/workers/shard_worker.py OUT

Part 1, DTensors built by hand (no FSDP): uneven ``Shard(0)`` (one rank's shard empty),
``Shard(1)``, ``Replicate``, plain tensors (one with a NaN gradient on a non-contributing rank), 2-D
meshes with ``(Replicate, Shard)`` placements: the reducer's sums vs the statistics of the whole
gradients, in ONE all_reduce; ``Partial`` gradients are refused; ``SGDSaI.initialize_scales()``
picks the exact reducer by itself and matches a single-process optimizer on the whole tensors.

Part 2, FSDP1 ``use_orig_params=True`` on a tiny GPT-2 (torch's FSDP1 runs on CPU with
``device_id=cpu``; Accelerate's FSDP1 plugin needs an accelerator, so the Trainer cannot drive it
here): GSNRCallback + ``step()`` over two steps with a block whose first gradient is zero and lies
in one rank's shard only (the other rank has ``grad=None``), vs a single-process reference; the
plain lazy path (``register_sharded_model`` + ``step()``); refusal of unregistered FSDP1 views and
of ``use_orig_params=False``.

Writes ``OUT/rank{r}.json``; rank 0 also writes ``OUT/fsdp1/gsnr.json`` through GSNRCallback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))  # tests/support: _models, _processes
from _models import tiny_gpt2, token_batches
from _processes import SAI_ALL_REDUCES, count_sai_all_reduces, end_process_group
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

import sai_hf.sharding
from sai_hf import GSNRCallback, SGDSaI, UnsupportedShardingError, gradient_statistics, gsnr_from_statistics, register_sharded_model
from sai_hf.parameter_names import parameter_names

def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def max_rel_diff_dict(values: dict[str, float], reference: dict[str, float]) -> float:
    return max(abs(values[n] - reference[n]) / reference[n] for n in reference)


def raises_unsupported(fn) -> str:
    try:
        fn()
    except UnsupportedShardingError as err:
        return str(err)
    return ""


# --------------------------------------------------------------------------- part 1: DTensors
def dtensor_checks(rank: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    mesh = init_device_mesh("cpu", (2,))
    mesh_rep = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    mesh_shard = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    specs = [  # (shape, mesh, placements) of DTensor blocks; None: a plain tensor
        ((5, 4), mesh, [Shard(0)]),  # uneven: 3 + 2 rows
        ((1,), mesh, [Shard(0)]),  # rank 1 holds an empty shard
        ((3, 6), mesh, [Shard(1)]),
        ((4, 4), mesh, [Replicate()]),
        ((6,), None, None),
        ((4, 3), mesh_rep, [Replicate(), Shard(0)]),  # 2 replicas of a 1-way sharded tensor
        ((4, 3), mesh_shard, [Replicate(), Shard(0)]),  # 1 replica of a 2-way sharded tensor
        ((2, 2), None, None),  # plain; rank 1 gets a NaN gradient, which must not be counted
    ]
    params, sai_params, whole_grads = [], [], []
    for shape, device_mesh, placements in specs:
        value, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) + 0.3
        whole_grads.append(grad)
        reference = torch.nn.Parameter(value.clone())
        reference.grad = grad.clone()
        sai_params.append(reference)
        if device_mesh is None:
            p = torch.nn.Parameter(value.clone())
            p.grad = grad.clone()
        else:
            p = torch.nn.Parameter(distribute_tensor(value, device_mesh, placements))
            p.grad = distribute_tensor(grad, device_mesh, placements)
        params.append(p)
    if rank == 1:
        params[-1].grad = torch.full_like(params[-1].grad, float("nan"))

    before = len(SAI_ALL_REDUCES)
    reducer = sai_hf.statistics_reducer(params)
    reduced = reducer(sai_hf.sharding.local_statistics(params))
    whole = gradient_statistics(whole_grads)
    out = {
        "reducer_all_reduces": SAI_ALL_REDUCES[before:],
        "local_n": gradient_statistics([p.grad for p in params])[:, 0].tolist(),
        "reduced_n": reduced[:, 0].tolist(),
        "whole_n": whole[:, 0].tolist(),
        "reduced_finite": bool(torch.isfinite(reduced).all()),
        "reduced_vs_whole_max_rel": max_rel_diff(gsnr_from_statistics(reduced, 1e-8)[0], gsnr_from_statistics(whole, 1e-8)[0]),
        "unsharded_only_reducer_is_none": sai_hf.statistics_reducer([params[3], params[4]]) is None,
    }

    partial = torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    out["partial_refused"] = raises_unsupported(lambda: sai_hf.statistics_reducer([params[0], partial]))

    # The automatic default of initialize_scales, vs a single process on the whole tensors.
    sai = SGDSaI(params[:-1], lr=1e-3)
    single = SGDSaI(sai_params[:-1], lr=1e-3)
    before = len(SAI_ALL_REDUCES)
    records = sai.initialize_scales()
    out["auto_all_reduces"] = SAI_ALL_REDUCES[before:]
    out["auto_second_call_in_same_step"] = len(sai.initialize_scales())
    single.initialize_scales()
    out["auto_scales"] = [sai.state[p]["scale"] for p in params[:-1]]
    out["single_scales"] = [single.state[p]["scale"] for p in sai_params[:-1]]
    out["auto_records"] = len(records)
    # Ranks that disagree on the number of blocks fail on the fixed-size check, not inside a
    # collective whose size depends on the count (which would hang or fail obscurely).
    mine = params[:2] if rank == 0 else params[:3]
    reducer = sai_hf.sharding.ExactReducer([sai_hf.sharding.Placement(True, True, p.numel()) for p in mine], 2)
    out["count_mismatch_refused"] = raises_unsupported(lambda: reducer(torch.zeros((len(mine), 5), dtype=torch.float64)))
    return out


# --------------------------------------------------------------------------- part 2: FSDP1
def fsdp1(model: torch.nn.Module, **kwargs) -> FSDP:
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}), device_id=torch.device("cpu"), **kwargs)


def backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()


def fsdp1_checks(rank: int, out_dir: Path) -> dict:
    batches = token_batches(2, batch=4)
    mine = slice(2 * rank, 2 * rank + 2)  # the global batch of 4 sequences, 2 per rank
    model = fsdp1(tiny_gpt2(), use_orig_params=True)
    reference = tiny_gpt2()  # same seed: same initial weights, unsharded, whole batch
    opt = SGDSaI(model.parameters(), lr=1e-2)
    ref_opt = SGDSaI(reference.parameters(), lr=1e-2)
    names = parameter_names(model)
    ref_names = {id(p): n for n, p in reference.named_parameters()}

    # A block held entirely by one rank: its first gradient is made zero (deferred, like lora_A).
    held = torch.tensor([[p.numel() > 0 for p in model.parameters()]], dtype=torch.int64)
    both = [torch.zeros_like(held) for _ in range(2)]
    dist.all_gather(both, held)
    holders = torch.cat(both).sum(0)
    deferred_index = next(i for i, (p, k) in enumerate(zip(model.parameters(), holders)) if k == 1 and p.numel() < 4096)
    deferred_name = list(names.values())[deferred_index]

    callback = GSNRCallback()
    args = SimpleNamespace(output_dir=str(out_dir / "fsdp1"))
    state = SimpleNamespace(is_world_process_zero=rank == 0)
    writes = []
    original_write = callback.write_report
    callback.write_report = lambda *a: (writes.append(a[0]), original_write(*a))
    per_step = []
    for step, ids in enumerate(batches):
        backward(model, ids[mine])
        backward(reference, ids)
        if step == 0:
            for p in model.parameters():
                if names[id(p)] == deferred_name and p.grad is not None:
                    p.grad.zero_()
            dict(reference.named_parameters())[deferred_name].grad.zero_()
        before = len(SAI_ALL_REDUCES)
        callback.on_pre_optimizer_step(args, state, None, model=model, optimizer=opt)
        opt.step()  # every rank reduces the blocks without a scale, the deferred one with a zero row where absent
        callback.on_optimizer_step(args, state, None, model=model, optimizer=opt)
        ref_opt.step()
        per_step.append(
            {
                "all_reduces": SAI_ALL_REDUCES[before:],
                "deferred_has_grad_here": any(
                    names[id(p)] == deferred_name and p.grad is not None for p in model.parameters()
                ),
                "deferred_scaled": any(names[id(p)] == deferred_name and opt.has_scale(p) for p in model.parameters()),
            }
        )
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    scales = {names[id(p)]: opt.state[p]["scale"] for p in model.parameters() if opt.has_scale(p)}
    ref_scales = {ref_names[id(p)]: ref_opt.state[p]["scale"] for p in reference.parameters() if ref_opt.has_scale(p)}

    # The plain lazy path: register once, then step() alone.
    lazy_model = fsdp1(tiny_gpt2(), use_orig_params=True)
    lazy_opt = SGDSaI(lazy_model.parameters(), lr=1e-2)
    register_sharded_model(lazy_model, lazy_opt)
    backward(lazy_model, batches[0][mine])
    lazy_opt.step()
    lazy_names = parameter_names(lazy_model)
    lazy_scales = {lazy_names[id(p)]: lazy_opt.state[p]["scale"] for p in lazy_model.parameters()}
    single = tiny_gpt2()
    single_opt = SGDSaI(single.parameters(), lr=1e-2)
    backward(single, batches[0])
    single_opt.step()
    single_scales = {n: single_opt.state[p]["scale"] for n, p in single.named_parameters()}

    # Refusals: FSDP1 views nobody registered, and use_orig_params=False (FlatParameters).
    unregistered = fsdp1(tiny_gpt2(), use_orig_params=True)
    unregistered_opt = SGDSaI(unregistered.parameters(), lr=1e-2)
    backward(unregistered, batches[0][mine])
    flat = fsdp1(tiny_gpt2(), use_orig_params=False)
    flat_opt = SGDSaI(flat.parameters(), lr=1e-2)
    backward(flat, batches[0][mine])
    return {
        "deferred_name": deferred_name,
        "steps": per_step,
        "scales": scales,
        "reference_scales": ref_scales,
        "scales_vs_reference_max_rel": max_rel_diff_dict(scales, ref_scales),
        "lazy_scales_vs_single_max_rel": max_rel_diff_dict(lazy_scales, single_scales),
        "lazy_scaled": len(lazy_scales),
        "writes": writes,
        "unregistered_refused": raises_unsupported(unregistered_opt.step),
        "flat_param_refused": raises_unsupported(flat_opt.step),
    }


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    count_sai_all_reduces()
    result = {"rank": rank, "dtensor": dtensor_checks(rank), "fsdp1": fsdp1_checks(rank, out_dir)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    end_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
