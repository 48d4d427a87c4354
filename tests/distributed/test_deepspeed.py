"""DeepSpeed ZeRO-1/2 with exact per-tensor g-SNR (``sai_hf.deepspeed``), and what is refused.

Multi-process tests run 2 CPU processes (``DS_ACCELERATOR=cpu``, gloo, ``torchrun``) through
tests/workers/deepspeed_worker.py and compare against one process on the same global batch (4 sequences
a step). In-process tests lay a flat partition out by hand, as DeepSpeed does, to check the layout
logic without DeepSpeed; the refusals need only the Trainer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _models import TokenDataset, tiny_gpt2, tiny_llama, token_batches, training_args
from _launch import free_port, launch_two_ranks
from test_distributed import max_rel_diff, max_weight_diff
from transformers import Trainer

from sai_hf import SGDSaI, UnsupportedShardingError, cpu_update, native, register_sharded_model
from sai_hf.gsnr import STATISTICS_WIDTH
from sai_hf.deepspeed import ZeroFragments, deepspeed_in_use, refuse_unsupported_deepspeed

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "workers") not in sys.path:
    sys.path.append(str(TESTS / "workers"))  # deepspeed_worker.plain_groups
CONFIGS = TESTS.parent / "configs"
SCALE_TOLERANCE = 1e-6  # the bound on the relative scale difference vs one process
# bf16 ZeRO-2 vs one fp32 process: scale = g-SNR, and gsnr^2 = (n - 1)(1 + n mu^2 / M2) (sai_hf.gsnr),
# so a gradient error moves the scale only through the mean-to-spread ratio x = n mu^2 / M2, by at
# most ~x/(1+x) times the relative error of mu and M2. bf16 keeps 8 significant bits (unit roundoff
# 2^-8 ~ 3.9e-3) and the bf16 forward/backward/reduce round the gradient a few times: a few units,
# ~1e-2. Measured: 7.2e-4 (transformer.h.0.ln_1.bias; median 6e-7), and one process in bf16
# (autocast: 1.0e-3, a bf16 model: 5.2e-4) is no closer, so fp32 is the reference. A block counted
# from one rank's half only would be off by ~30% (sqrt(n/2) vs sqrt(n)).
BF16_SCALE_TOLERANCE = 1e-2


#: How the worker records the reducer's first all_reduce: the ranks agree on the list of blocks.
CHECK = "(4,) torch.float64"


def rows(blocks: int) -> str:
    """How the worker records an all_reduce of the statistics of ``blocks`` blocks."""
    return f"({blocks}, {STATISTICS_WIDTH}) torch.float64"


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken build
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not has_deepspeed(), reason="deepspeed not installed (pip install 'sai-hf[deepspeed]')")


# --------------------------------------------------------------------------- launches and references
def launch_worker(tmp_path_factory, part: str) -> SimpleNamespace:
    out = tmp_path_factory.mktemp(f"deepspeed_{part}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           TESTS / "workers" / "deepspeed_worker.py", out, part]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: gloo without oneCCL
        return launch_two_ranks(cmd, out, f"[deepspeed {part}] torchrun, 2 processes")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> SimpleNamespace:
    return launch_worker(tmp_path_factory, "trainer")


@pytest.fixture(scope="module")
def zero1_runs(tmp_path_factory) -> SimpleNamespace:
    return launch_worker(tmp_path_factory, "zero1")


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> SimpleNamespace:
    return launch_worker(tmp_path_factory, "bf16")


def single_trainer(out: Path, model, **overrides) -> tuple[dict, dict]:
    """gsnr.json scales and final weights of one process on the 2-rank runs' global batch."""
    kwargs = dict(per_device_train_batch_size=4, weight_decay=0.01, max_steps=4)
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=training_args(out, **kwargs), train_dataset=TokenDataset())
    trainer.train()
    report = json.loads((out / "gsnr.json").read_text())
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {k: v["scale"] for k, v in report.items()}, weights


@pytest.fixture(scope="module")
def single_gpt2(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("single_gpt2")
    scales, weights = single_trainer(out, tiny_gpt2())
    return SimpleNamespace(scales=scales, weights=weights, report=json.loads((out / "gsnr.json").read_text()))


def lora_llama():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


# --------------------------------------------------------------------------- ZeRO-2 under the Trainer
@needs_deepspeed
@pytest.mark.slow
def test_zero2_trainer_scales_equal_single_process(trainer_runs, single_gpt2):
    rank0, rank1 = (rank["a"] for rank in trainer_runs.ranks)
    assert rank0["zero_layout"] and rank0["partition_shapes"] == [[[14848]], [[448]]]  # flat partitions
    assert rank0["scales"] == rank1["scales"]  # every rank reduced to the same statistics
    report = json.loads((trainer_runs.out / "a" / "gsnr.json").read_text())
    assert {k: v["numel"] for k, v in report.items()} == {k: v["numel"] for k, v in single_gpt2.report.items()}
    assert {k: v["scale"] for k, v in report.items()} == rank0["scales"]  # original names, whole tensors
    diff = max_rel_diff(rank0["scales"], single_gpt2.scales)
    print(f"\n[zero2] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE
    # DeepSpeed steps the groups one at a time; the first group's call measures the second group's blocks
    # too (from DeepSpeed's reduced gradients): one all_reduce of every block, at step 1 only.
    assert rank0["all_reduces"] == [CHECK, rows(28)]


@needs_deepspeed
@pytest.mark.slow
def test_zero2_trainer_training_matches_single_process(trainer_runs, single_gpt2):
    weights = torch.load(trainer_runs.out / "weights_a.pt")
    initial = tiny_gpt2().state_dict()
    assert all(not torch.equal(weights[k], initial[k]) for k in weights if k != "lm_head.weight")  # all trained
    diff = max_weight_diff(weights, single_gpt2.weights)
    print(f"\n[zero2] max abs weight difference vs 1 process after 4 steps: {diff:.3e}")
    assert diff < 1e-5  # the DDP test holds DDP to the same bound against the same reference


@needs_deepspeed
@pytest.mark.slow
def test_zero2_trainer_resume_keeps_scales_bit_exact(trainer_runs):
    for rank in trainer_runs.ranks:
        assert rank["b"]["scales"] == rank["a"]["scales"]  # restored from the checkpoint
        assert rank["b"]["all_reduces"] == []  # nothing was measured again
        assert rank["b"]["steps"] == 4
        assert rank["resumed_weights_max_abs_diff"] == 0.0
    # The resume went into a new output_dir: the restored scales are reported there, unchanged.
    report_a = json.loads((trainer_runs.out / "a" / "gsnr.json").read_text())
    assert json.loads((trainer_runs.out / "b" / "gsnr.json").read_text()) == report_a


@needs_deepspeed
@pytest.mark.slow
def test_zero2_lora_deferred_lora_a_trains_and_matches_single_process(trainer_runs, tmp_path):
    lora = trainer_runs.ranks[0]["lora"]
    assert trainer_runs.ranks[1]["lora"]["scales"] == lora["scales"]
    # Step 1: all 8 LoRA blocks reduced (one group: weight_decay=0), lora_A's zero gradient leaves it
    # deferred; step 2: the 4 lora_A.
    assert lora["all_reduces"] == [CHECK, rows(8), CHECK, rows(4)]
    assert all(moved > 0 for moved in lora["moved"].values())
    reference, _ = single_trainer(tmp_path, lora_llama(), max_steps=3, weight_decay=0.0)
    diff = max_rel_diff(lora["scales"], reference)
    print(f"\n[zero2 lora] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE


@needs_deepspeed
@pytest.mark.slow
def test_zero2_trainer_bf16_from_deepspeed_config(bf16_runs, single_gpt2):
    """``"bf16": {"enabled": true}`` in the DeepSpeed config: bf16 model, fp32 partitions; every block
    scaled, same report as fp32, scales within bf16 rounding of one fp32 process, weights trained."""
    rank0, rank1 = (rank["bf16"] for rank in bf16_runs.ranks)
    assert rank0["model_dtypes"] == ["torch.bfloat16"] and rank0["partition_dtypes"] == ["torch.float32"]
    assert rank0["steps"] == 4 and len(rank0["losses"]) == 4 and all(math.isfinite(x) for x in rank0["losses"])
    assert rank0["zero_layout"] and rank0["partition_shapes"] == [[[14848]], [[448]]]
    assert rank0["all_reduces"] == [CHECK, rows(28)]  # as in fp32: both groups at once, at step 1 only
    assert rank0["scales"] == rank1["scales"]
    report = json.loads((bf16_runs.out / "bf16" / "gsnr.json").read_text())
    assert {k: v["numel"] for k, v in report.items()} == {k: v["numel"] for k, v in single_gpt2.report.items()}
    assert {k: v["scale"] for k, v in report.items()} == rank0["scales"]
    assert all(math.isfinite(s) and s > 0 for s in rank0["scales"].values())
    diff = max_rel_diff(rank0["scales"], single_gpt2.scales)
    print(f"\n[zero2 bf16] max relative scale difference vs 1 fp32 process: {diff:.3e}")
    assert diff <= BF16_SCALE_TOLERANCE
    # SGD-SaI steps the fp32 master weights; DeepSpeed copies them, rounded, into the bf16 model.
    master = torch.load(bf16_runs.out / "weights_bf16_master.pt")
    model = torch.load(bf16_runs.out / "weights_bf16.pt")
    assert all(torch.equal(model[k], master[k].to(torch.bfloat16)) for k in master)
    initial = dict(tiny_gpt2().named_parameters())
    worst = 0.0
    for k, w in master.items():
        start = initial[k].detach().to(torch.bfloat16).float()  # the master copy starts from the bf16 model
        moved, moved_fp32 = w - start, single_gpt2.weights[k] - initial[k].detach()
        assert torch.isfinite(w).all() and moved.abs().max() > 0, k
        worst = max(worst, float((moved - moved_fp32).norm() / moved_fp32.norm()))
    print(f"[zero2 bf16] max relative L2 difference of the weight updates vs 1 fp32 process: {worst:.3e}")
    assert worst < 0.1  # bf16 gradients, a bf16 starting point: measured ~2e-2


# --------------------------------------------------------------------------- ZeRO-1, plain DeepSpeed
@needs_deepspeed
@pytest.mark.slow
def test_zero1_with_gradient_accumulation_scales_equal_single_process(zero1_runs, single_gpt2):
    rank0, rank1 = (rank["zero1"] for rank in zero1_runs.ranks)
    assert rank0["zero_layout"] and rank0["scales"] == rank1["scales"]
    diff = max_rel_diff(rank0["scales"], single_gpt2.scales)
    print(f"\n[zero1, 1 sequence x 2 accumulation steps] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE


@needs_deepspeed
@pytest.mark.slow
def test_plain_deepspeed_initialize_with_sgd_sai(zero1_runs):
    """Two groups, ``normalize="max"``: exact once DeepSpeed's optimizer is registered."""
    from deepspeed_worker import plain_groups

    model = tiny_gpt2()
    optimizer = SGDSaI(plain_groups(model), lr=1e-3, normalize="max")
    for ids in token_batches(3, batch=4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = {id(p): n for n, p in model.named_parameters()}
    reference = {names[id(p)]: s for p, s in optimizer.scales().items()}
    plain = zero1_runs.ranks[0]["plain"]
    assert plain["all_reduces"] == [CHECK, rows(28)]  # both groups: one collective for every block
    diff = max_rel_diff(plain["scales"], reference)
    print(f"\n[plain deepspeed.initialize] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE
    assert max_weight_diff(torch.load(zero1_runs.out / "weights_plain.pt"), model.state_dict()) < 1e-5


@needs_deepspeed
@pytest.mark.slow
def test_zero2_offload_normalize_max_over_the_trainers_two_groups(zero1_runs, tmp_path):
    """ZeRO-2 with ``offload_optimizer`` (the shipped zero2_offload.json), ``normalize=max`` over the Trainer's
    two groups and its gradient clipping: the divisor is the largest g-SNR of both groups, as in one process."""
    rank0, rank1 = (rank["offload_max"] for rank in zero1_runs.ranks)
    assert rank0["zero_layout"] and rank0["scales"] == rank1["scales"]
    assert rank0["all_reduces"] == [CHECK, rows(28)]
    scales, weights = single_trainer(tmp_path, tiny_gpt2(), optim_args="normalize=max")
    assert max(scales.values()) == pytest.approx(1.0)  # normalised: the largest scale is 1
    diff = max_rel_diff(rank0["scales"], scales)
    print(f"\n[zero2 offload, normalize=max] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE
    assert max_weight_diff(torch.load(zero1_runs.out / "weights_offload_max.pt"), weights) < 1e-5


# --------------------------------------------------------------------------- the layout, in one process
def partition_by_hand(optimizer: SGDSaI, params: list[torch.Tensor]) -> torch.Tensor:
    """Do to ``optimizer`` what ZeRO-1/2 does on one rank: one flat fp32 partition (with trailing
    padding) holding every parameter, ``_hp_mapping`` fragment addresses on the parameters."""
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes) + 3)  # padding at the end, as on the last rank
    start = 0
    for p, n in zip(params, sizes):
        flat[start : start + n] = p.detach().reshape(-1)
        p._hp_mapping = SimpleNamespace(
            hp_fragment=flat.narrow(0, start, n), hp_fragment_address=SimpleNamespace(start=start, numel=n)
        )
        start += n
    flat.requires_grad_(True)
    optimizer.param_groups[0]["params"] = [flat]
    return flat


@pytest.mark.parametrize(
    "momentum, large", [(0.9, False), (0.0, False), (0.9, True)], ids=["momentum", "no-momentum", "large-fragment"]
)
def test_flat_partition_layout_equals_per_tensor_optimizer(momentum, large, monkeypatch):
    """Every fragment has weight decay, so the native CPU loop updates it (on the fragment's view of the
    flat partition); ``large``: one fragment big enough for the loop's threads to split it."""
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (1,), (3, 5, 2)] + ([(512, 520)] if large else [])
    loop_blocks = []
    real_loop = cpu_update.cpu_sgd_sai_
    monkeypatch.setattr(cpu_update, "cpu_sgd_sai_", lambda ps, *a, **k: loop_blocks.extend(p.numel() for p in ps) or real_loop(ps, *a, **k))
    base = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    grads[0][3] = torch.zeros(shapes[3])  # deferred at step 1, scaled at step 2 (eps dropped)
    reference_params = [torch.nn.Parameter(b.clone()) for b in base]
    reference = SGDSaI(reference_params, lr=1e-2, momentum=momentum, weight_decay=0.1)
    zero_params = [torch.nn.Parameter(b.clone()) for b in base]
    zero = SGDSaI(zero_params, lr=1e-2, momentum=momentum, weight_decay=0.1)
    flat = partition_by_hand(zero, zero_params)
    with pytest.warns(UserWarning, match="no usable"):  # the (1,) block is degenerate
        for step_grads in grads:
            for p, g in zip(reference_params, step_grads):
                p.grad = g.clone()
            reference.step()
            flat.grad = torch.cat([g.reshape(-1) for g in step_grads] + [torch.zeros(3)])
            zero.step()
    assert all(isinstance(b.backend, ZeroFragments) for b in zero.blocks())
    assert list(zero.scales()) == zero_params  # keyed by the model's parameters
    assert list(zero.scales().values()) == list(reference.scales().values())
    got = [flat.detach()[int(p._hp_mapping.hp_fragment_address.start) :][: p.numel()].view(p.shape) for p in zero_params]
    for a, b in zip(got, reference_params):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-7)
    assert torch.equal(flat.detach()[-3:], torch.zeros(3))  # padding untouched
    if native.available():  # 3 steps, the reference and the partition
        assert all(loop_blocks.count(numel) == 6 for numel in (32, 512 * 520 if large else 4))
    state = zero.state[flat]
    assert sorted(state["blocks"]) == list(range(len(shapes))) and state["blocks"][3]["gsnr_eps_free"]
    assert state["blocks"][3]["scaled_at"] == 2 and state["step"] == 3
    # The state dict round-trips through load_state_dict (what DeepSpeed's checkpoint does per rank), into an optimizer
    # built from the same (linked) model parameters, as DeepSpeed's engine builds it on resume.
    restored = SGDSaI(zero_params, lr=1e-2, momentum=momentum, weight_decay=0.1)
    restored.param_groups[0]["params"] = [flat]
    restored.load_state_dict(zero.state_dict())
    assert restored.state[flat]["blocks"] == state["blocks"]


def test_flat_partition_normalize_max_with_two_groups_refused():
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = SGDSaI([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}], normalize="max")
    flats = []
    for k, p in enumerate(params):
        flat = torch.zeros(p.numel())
        p._hp_mapping = SimpleNamespace(hp_fragment=flat.narrow(0, 0, p.numel()), hp_fragment_address=SimpleNamespace(start=0, numel=p.numel()))
        optimizer.param_groups[k]["params"] = [flat]
        flat.grad = torch.randn(p.numel())
        flats.append(flat)
    with pytest.raises(UnsupportedShardingError, match="normalize='max'") as err:
        optimizer.step()
    assert "normalize='none'" in str(err.value) and "register_sharded_model(model, engine.optimizer)" in str(err.value)
    assert not optimizer.scales()


# --------------------------------------------------------------------------- refusals before training
@pytest.mark.parametrize(
    "config, match, advice",
    [
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_force_ds_cpu_optimizer", "zero2_offload.json"),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True},
            "zero_force_ds_cpu_optimizer",
            "zero3_offload.json",
        ),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}, "zero_force_ds_cpu_optimizer": False}, "'nvme'", "device 'cpu'"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param with device 'nvme'", "device 'cpu'"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param", "configs/deepspeed/zero2.json"),
        ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}, "stage 1", "zero2_offload.json"),
        ({"zero_optimization": {"stage": 3, "zenflow": {"topk_ratio": 0.1}}}, "zenflow", "configs/deepspeed"),
        ({"zero_optimization": {"stage": 3}, "checkpoint": {"load_universal": True}}, "load_universal", "world size it was saved with"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}, "'optimizer' section", "configs/deepspeed/zero2.json"),
    ],
    ids=[
        "offload_force_default", "offload_force_true", "offload_nvme", "param_nvme", "offload_param_stage2",
        "offload_stage1", "zenflow", "universal_checkpoint", "optimizer_section",
    ],  # fmt: skip
)
def test_trainer_refuses_unsupported_deepspeed_before_training(tmp_path, config, match, advice):
    args = training_args(tmp_path)
    args.deepspeed = config  # what --deepspeed leaves in the arguments (set afterwards: one process)
    with pytest.raises(UnsupportedShardingError, match=match) as err:
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    assert advice in str(err.value)
    assert not (tmp_path / "gsnr.json").exists()


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"])
def test_trainer_accepts_the_shipped_zero_configs(tmp_path, name):
    args = training_args(tmp_path)
    args.deepspeed = str(CONFIGS / "deepspeed" / name)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())  # no refusal
    config = json.loads((CONFIGS / "deepspeed" / name).read_text())
    assert config["zero_allow_untested_optimizer"] is True
    if "offload_optimizer" in config["zero_optimization"]:
        assert config["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed insists on DeepSpeedCPUAdam
    if config["zero_optimization"]["stage"] == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_zero3_config_from_accelerate_launch_environment(monkeypatch, tmp_path):
    config = tmp_path / "zero3_nvme.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    assert not deepspeed_in_use(SimpleNamespace(deepspeed=None, deepspeed_plugin=None))
    assert deepspeed_in_use(SimpleNamespace(deepspeed=None, deepspeed_plugin=object()))
    refuse_unsupported_deepspeed(SimpleNamespace(deepspeed=str(CONFIGS / "deepspeed" / "zero2.json"), deepspeed_plugin=None))
    refuse_unsupported_deepspeed(SimpleNamespace(deepspeed=str(CONFIGS / "deepspeed" / "zero3_offload.json"), deepspeed_plugin=None))
    with pytest.raises(UnsupportedShardingError, match="nvme"):
        refuse_unsupported_deepspeed(SimpleNamespace(deepspeed=str(config), deepspeed_plugin=None))
    # Under `accelerate launch` with DeepSpeed, a plain PyTorch model is not partitioned: it just trains.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    model = tiny_gpt2()
    opt = SGDSaI(model.parameters())
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    assert len(opt.scales()) == 28 and all(math.isfinite(s) for s in opt.scales().values())


# --------------------------------------------------------------------------- an empty parameter group
# DeepSpeed's engine drops the optimizer's empty groups before wrapping it: the Trainer's no-weight-decay group
# under PEFT LoRA, or with biases and norms frozen. Its group k is then the k-th non-empty group as constructed;
# sai-hf indexed DeepSpeed's partitions by the groups as constructed, hit an IndexError reading the later groups'
# gradients and refused normalize="max" although DeepSpeed's optimizer was registered.
@pytest.fixture(scope="module")
def empty_group_runs(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("deepspeed_empty_group")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           TESTS / "workers" / "deepspeed_empty_group_worker.py", out]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        return launch_two_ranks(cmd, out, "[deepspeed empty group] torchrun, 2 processes")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("run", ["lora", "frozen"])
def test_zero12_normalize_max_with_the_trainers_empty_group_matches_single_process(empty_group_runs, run, tmp_path):
    """``lora``: PEFT LoRA under ZeRO-2; ``frozen``: GPT-2 with biases and LayerNorms frozen under ZeRO-1 (gradient
    accumulation 2): the Trainer's second group is empty, DeepSpeed steps one partition, ``normalize=max`` trains
    and equals one process."""
    from deepspeed_empty_group_worker import frozen_gpt2

    rank0, rank1 = (rank[run] for rank in empty_group_runs.ranks)
    assert rank0["groups_constructed"][1] == 0 and rank0["partitions"] == 1 and rank0["steps"] == 3
    assert rank0["scales"] == rank1["scales"]
    model = lora_llama() if run == "lora" else frozen_gpt2()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=4, optim_args="normalize=max"),
        train_dataset=TokenDataset(),
    )
    trainer.train()
    reference = {k: v["scale"] for k, v in json.loads((tmp_path / "gsnr.json").read_text()).items()}
    first_step = [s for k, s in reference.items() if "lora_A" not in k]  # lora_A: deferred (zero first gradient)
    assert max(first_step) == pytest.approx(1.0)  # normalised by the largest first-step g-SNR
    diff = max_rel_diff(rank0["scales"], reference)
    print(f"\n[{run}, empty group, normalize=max] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE
    weights = torch.load(empty_group_runs.out / f"weights_{run}.pt")
    assert max_weight_diff(weights, _trainable(trainer.model)) < 1e-5


@needs_deepspeed
@pytest.mark.slow
def test_plain_deepspeed_empty_first_group_normalize_max(empty_group_runs):
    """Groups ``[empty, matrices, vectors]``: DeepSpeed's partitions 0 and 1 are the constructed groups 1 and 2;
    both are measured in one collective at step 1, as in one process."""
    from deepspeed_empty_group_worker import empty_first_groups

    plain = empty_group_runs.ranks[0]["plain"]
    assert plain["partitions"] == 2 and plain["all_reduces"] == [CHECK, rows(28)]
    model = tiny_gpt2()
    optimizer = SGDSaI(empty_first_groups(model), lr=1e-3, normalize="max")
    for ids in token_batches(3, batch=4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = {id(p): n for n, p in model.named_parameters()}
    diff = max_rel_diff(plain["scales"], {names[id(p)]: s for p, s in optimizer.scales().items()})
    print(f"\n[plain deepspeed, empty first group] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE
    assert max_weight_diff(torch.load(empty_group_runs.out / "weights_plain.pt"), _trainable(model)) < 1e-5


class _FakeZero:
    """What sai-hf reads from DeepSpeed's ZeRO-1/2 optimizer: one fp32 partition per non-empty group, the
    not yet flattened gradients (``get_lp_grad_fragment``), loss scale 1, no clipping."""

    def __init__(self, optimizer: SGDSaI, partitions: list[torch.Tensor]) -> None:
        self.optimizer, self.single_partition_of_fp32_groups = optimizer, partitions
        self.averaged_gradients: dict = {}
        self.loss_scale, self.clip_grad, self._global_grad_norm = 1.0, 0.0, 0.0


def zero_by_hand(layout: list[str], base: dict[str, torch.Tensor], fragment=None) -> tuple[SGDSaI, dict, list]:
    """An SGD-SaI with ``normalize="max"`` over groups named by ``layout`` ("" an empty group) of ``base``'s tensors,
    wrapped by hand as DeepSpeed's ZeRO-1/2 does on one rank: empty groups dropped in place, one flat partition per
    remaining group, ``_hp_mapping`` (``fragment``: its ``get_lp_grad_fragment``, default the parameter's gradient),
    DeepSpeed's optimizer registered. Returns the optimizer, the model parameters by name, ``[(param, partition)]``."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
    groups = [{"params": [params[k]] if k else [], **({"weight_decay": 0.0} if k == "b" else {})} for k in layout]
    zero = SGDSaI(groups, normalize="max", weight_decay=0.01)
    zero.param_groups[:] = [g for g in zero.param_groups if g["params"]]  # what DeepSpeed's engine does
    flats = []
    for group in zero.param_groups:
        p = group["params"][0]
        flat = p.detach().reshape(-1).clone()
        p._hp_mapping = SimpleNamespace(
            hp_fragment=flat, hp_fragment_address=SimpleNamespace(start=0, numel=p.numel()),
            lp_fragment_address=SimpleNamespace(start=0, numel=p.numel()),
            get_lp_grad_fragment=fragment or (lambda i, p=p: p.grad),
        )  # fmt: skip
        p._index_in_param_group = 0
        group["params"] = [flat]
        flats.append((p, flat))
    register_sharded_model(torch.nn.Module(), _FakeZero(zero, [f for _, f in flats]))
    return zero, params, flats


def step_by_hand(zero: SGDSaI, flats: list, grads: dict[torch.Tensor, torch.Tensor]) -> None:
    """One DeepSpeed ZeRO-1/2 step: the reduced gradients on the parameters, then ``_optimizer_step(i)`` per group."""
    for p, _ in flats:
        p.grad = grads[p].clone()
    every = zero.param_groups
    for i, (p, flat) in enumerate(flats):
        flat.grad = p.grad.reshape(-1).clone()
        zero.param_groups = [every[i]]
        try:
            zero.step()
        finally:
            zero.param_groups = every


@pytest.mark.parametrize("layout", [["a", "", "b"], ["", "a", "b"], ["a", "b", ""]], ids=["middle", "first", "last"])
def test_flat_partitions_skip_empty_groups(layout):
    """In one process, DeepSpeed's handling laid out by hand (:func:`zero_by_hand`); ``normalize="max"`` over both
    groups equals plain SGD-SaI (the in-process version of the 2-process tests above)."""
    torch.manual_seed(0)
    base = {"a": torch.randn(4, 4), "b": torch.randn(6)}
    grads = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    reference_params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
    reference = SGDSaI(
        [{"params": [reference_params["a"]]}, {"params": [reference_params["b"]], "weight_decay": 0.0}], normalize="max", weight_decay=0.01
    )
    zero, params, flats = zero_by_hand(layout, base)
    for step_grads in grads:
        for k, p in reference_params.items():
            p.grad = step_grads[k].clone()
        reference.step()
        step_by_hand(zero, flats, {params[k]: g for k, g in step_grads.items()})
    scales = {k: zero.scales()[params[k]] for k in base}
    assert scales == {k: reference.scales()[reference_params[k]] for k in base}
    assert max(scales.values()) == 1.0
    for k in base:
        flat = next(f for p, f in flats if p is params[k])
        torch.testing.assert_close(flat.view(base[k].shape), reference_params[k].detach(), rtol=0, atol=1e-7)


def test_flat_partitions_later_gradients_errors_are_not_refusals():
    """Reading the later groups' gradients caught IndexError, KeyError, ValueError, TypeError and AttributeError and
    refused ``normalize="max"`` with advice to register DeepSpeed's optimizer (registered already). Now only what
    this DeepSpeed lacks is a refusal, which names it; an error raised while reading propagates."""
    base = {"a": torch.randn(4, 4), "b": torch.randn(6)}
    grads = {k: torch.randn_like(v) for k, v in base.items()}

    def broken(index):
        raise IndexError("fragment index out of range")

    zero, params, flats = zero_by_hand(["a", "b"], base, fragment=broken)
    with pytest.raises(IndexError, match="fragment index out of range"):
        step_by_hand(zero, flats, {params[k]: g for k, g in grads.items()})
    zero, params, flats = zero_by_hand(["a", "b"], base)
    for p, _ in flats:
        del p._hp_mapping.get_lp_grad_fragment  # another DeepSpeed version
    with pytest.raises(UnsupportedShardingError, match="does not expose") as err:
        step_by_hand(zero, flats, {params[k]: g for k, g in grads.items()})
    assert "get_lp_grad_fragment" in str(err.value) and "Register DeepSpeed's optimizer" not in str(err.value)
    zero, params, flats = zero_by_hand(["a", "b"], base)
    zero.sharding.backends[0].zero.use_muon = True
    with pytest.raises(UnsupportedShardingError, match=r"\(Muon\)"):
        step_by_hand(zero, flats, {params[k]: g for k, g in grads.items()})


def test_trainer_refuses_partial_optimizer_offload_before_training(tmp_path):
    """``offload_optimizer.ratio`` below 1 (ZeRO-3 partial offload) passed the Trainer's construction and died in
    ``train()`` in DeepSpeed's "Hybrid Optimizer Only Supports DeepSpeedCPUAdam"; refused when the Trainer is built,
    naming the key. A ratio of 1 (the default) is full offload, which sai-hf covers."""
    config = json.loads((CONFIGS / "deepspeed" / "zero3_offload.json").read_text())
    config["zero_optimization"]["offload_optimizer"]["ratio"] = 0.5
    args = training_args(tmp_path)
    args.deepspeed = config
    with pytest.raises(UnsupportedShardingError, match=r"zero_optimization\.offload_optimizer\.ratio = 0\.5") as err:
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    assert "DeepSpeedCPUAdam" in str(err.value) and "zero3_offload.json" in str(err.value)
    config["zero_optimization"]["offload_optimizer"]["ratio"] = 1.0
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())


ADAPTER_PROBE = """
import json, sys
order = sys.argv[1]
if order == "deepspeed_first":
    import deepspeed
import sai_hf
from sai_hf.optimizer import SGDSaI
import torch
seen = {"adapter_before": "sai_hf.deepspeed" in sys.modules}
optimizer = SGDSaI([torch.nn.Parameter(torch.ones(2, 2))])
seen["first_backends"] = [type(b).__name__ for b in optimizer.sharding.backends][:2]
if order == "deepspeed_after":
    import deepspeed
seen["backends"] = [type(b).__name__ for b in optimizer.sharding.backends]
json.dump(seen, sys.stdout)
"""


@needs_deepspeed
@pytest.mark.parametrize("order", ["deepspeed_after", "deepspeed_first"])
def test_the_adapter_registers_when_deepspeed_is_imported(order):
    """The core never imports the DeepSpeed adapter (issue 29); importing ``deepspeed``, before or after ``sai_hf`` and
    the optimizer, puts the ZeRO backends first, in optimizers built earlier too."""
    done = subprocess.run([sys.executable, "-c", ADAPTER_PROBE, order], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["adapter_before"] == (order == "deepspeed_first")
    assert seen["first_backends"] == (["ZeroFragments", "Zero3Partitions"] if order == "deepspeed_first" else ["Fsdp1Views", "DTensorShards"])
    assert seen["backends"] == ["ZeroFragments", "Zero3Partitions", "Fsdp1Views", "DTensorShards", "WholeTensors"]
