"""DeepSpeed ZeRO-3, ZeRO-2 + optimizer offload and ZeRO-3 + optimizer and parameter offload, exact
(``sai_hf.deepspeed``: ``zero3``; ZeRO-2's fragments: ``zero12``).

Each config runs on 2 CPU processes (``DS_ACCELERATOR=cpu``, gloo, ``torchrun``, the HF Trainer with
``deepspeed=configs/deepspeed/<config>.json`` and ``use_cpu=True``) through
tests/workers/deepspeed_zero3_worker.py, and is compared against one process on the same global batch (4
sequences a step): scales (relative difference <= 1e-6), the first three losses (<= 1e-5 relative),
the final weights, and a resume from the step-2 DeepSpeed checkpoint (bit-exact).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _models import TokenDataset, tiny_gpt2, tiny_llama, training_args
from test_deepspeed import CHECK, SCALE_TOLERANCE, needs_deepspeed, rows
from _launch import free_port, launch_two_ranks, tail
from _launch import launch as launch_command
from test_distributed import max_rel_diff, max_weight_diff
from transformers import Trainer

TESTS = Path(__file__).resolve().parents[1]
WORKERS = TESTS / "workers"
if str(WORKERS) not in sys.path:
    sys.path.append(str(WORKERS))  # the worker's model and constants
CONFIGS = TESTS.parent / "configs" / "deepspeed"
LOSS_TOLERANCE = 1e-5  # the bound on the first three losses, relative
BACKEND = {"zero3": "Zero3Partitions", "zero3_offload": "Zero3Partitions", "zero2_offload": "ZeroFragments"}


def launch(tmp_path_factory, config: str, *extra: str) -> SimpleNamespace:
    out = tmp_path_factory.mktemp(f"ds_{config}_{'_'.join(extra) or 'ab'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           WORKERS / "deepspeed_zero3_worker.py", out, config, *extra]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        return launch_two_ranks(cmd, out, f"[deepspeed {config} {' '.join(extra)}] torchrun, 2 processes")


def single(out: Path, model, **overrides) -> SimpleNamespace:
    """One process on the 2-rank runs' global batch: gsnr.json, losses, final weights."""
    kwargs = dict(per_device_train_batch_size=4, weight_decay=0.01, max_steps=4)
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=training_args(out, **kwargs), train_dataset=TokenDataset())
    trainer.train()
    report = json.loads((out / "gsnr.json").read_text())
    return SimpleNamespace(
        report=report,
        scales={k: v["scale"] for k, v in report.items()},
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    )


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> SimpleNamespace:
    return single(tmp_path_factory.mktemp("single_gpt2"), tiny_gpt2())


@pytest.fixture(scope="module", params=["zero3", "zero3_offload", "zero2_offload"])
def runs(request, tmp_path_factory) -> SimpleNamespace:
    run = launch(tmp_path_factory, request.param)
    run.config = request.param
    return run


# --------------------------------------------------------------------------- exactness, resume, save
@needs_deepspeed
@pytest.mark.slow
def test_scales_losses_and_weights_equal_single_process(runs, reference):
    rank0, rank1 = (rank["a"] for rank in runs.ranks)
    assert rank0["backends"] == [BACKEND[runs.config]] and rank0["steps"] == 4
    assert rank0["scales"] == rank1["scales"]  # every rank reduced to the same statistics
    report = json.loads((runs.out / "a" / "gsnr.json").read_text())
    assert {k: v["numel"] for k, v in report.items()} == {k: v["numel"] for k, v in reference.report.items()}
    assert {k: v["scale"] for k, v in report.items()} == rank0["scales"]  # original names, whole tensors
    diff = max_rel_diff(rank0["scales"], reference.scales)
    losses = max(rel(a, b) for a, b in zip(rank0["losses"][:3], reference.losses[:3]))
    print(f"\n[{runs.config}] scales vs 1 process: {diff:.3e}; first three losses: {losses:.3e}")
    assert diff <= SCALE_TOLERANCE and losses <= LOSS_TOLERANCE and len(rank0["losses"]) == 4
    # Step 1 only. DeepSpeed steps the (sub-)groups one at a time; the first one's call measures every
    # later one too (from DeepSpeed's reduced gradients): one reduction of all 28 blocks.
    assert rank0["all_reduces"] == [CHECK, rows(28)]
    weights = torch.load(runs.out / "weights_a.pt")
    initial = dict(tiny_gpt2().named_parameters())
    assert all(not torch.equal(w, initial[k].detach()) for k, w in weights.items())  # every block trained
    wdiff = max_weight_diff(weights, reference.weights)
    print(f"[{runs.config}] max abs weight difference vs 1 process after 4 steps: {wdiff:.3e}")
    assert wdiff < 1e-5


@needs_deepspeed
@pytest.mark.slow
def test_resume_from_deepspeed_checkpoint_is_bit_exact(runs):
    for rank in runs.ranks:
        assert rank["b"]["scales"] == rank["a"]["scales"]  # restored from the checkpoint
        assert rank["b"]["all_reduces"] == []  # nothing was measured again
        assert rank["b"]["steps"] == 4 and rank["b"]["losses"][2:] == rank["a"]["losses"][2:]
        assert rank["resumed_weights_max_abs_diff"] == 0.0
    assert json.loads((runs.out / "b" / "gsnr.json").read_text()) == json.loads((runs.out / "a" / "gsnr.json").read_text())


@needs_deepspeed
@pytest.mark.slow
def test_resume_at_another_world_size_is_refused_at_load(runs, tmp_path):
    """A 2-rank checkpoint resumed by 1 process: refused while loading, before any step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", free_port(),
           WORKERS / "deepspeed_zero3_worker.py", tmp_path, runs.config, "resume_from", runs.out / "a" / "checkpoint-2"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        rc, _, output = launch_command(cmd)
    assert rc == 0, tail(output)
    error = json.loads((tmp_path / "rank0.json").read_text())["error"]
    assert error is not None and "world size of 2 but the current world size is 1" in error
    assert not (tmp_path / "other_world" / "gsnr.json").exists()


@needs_deepspeed
@pytest.mark.slow
def test_saved_model_is_the_trained_one(runs):
    """ZeRO-3 with ``stage3_gather_16bit_weights_on_model_save`` (the shipped configs): ``save_model``
    gathers the partitions; the file holds the trained weights, not the empty partitioned tensors."""
    from safetensors.torch import load_file

    saved = load_file(runs.out / "a" / "saved" / "model.safetensors")
    trained = torch.load(runs.out / "weights_a.pt")
    assert set(trained) - set(saved) <= {"lm_head.weight"}  # tied to the embedding
    for name, w in trained.items():
        if name in saved:
            assert saved[name].shape == w.shape and torch.equal(saved[name], w), name


# --------------------------------------------------------------------------- LoRA, hostile settings, bf16
@needs_deepspeed
@pytest.mark.slow
def test_zero3_lora_deferred_lora_a_trains_and_matches_single_process(tmp_path_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    run = launch(tmp_path_factory, "zero3", "lora")
    lora = run.ranks[0]["lora"]
    assert run.ranks[1]["lora"]["scales"] == lora["scales"] and lora["backends"] == ["Zero3Partitions"]
    # Step 1: all 8 LoRA blocks reduced, lora_A's zero gradient leaves it deferred; step 2: the 4 lora_A.
    assert lora["all_reduces"] == [CHECK, rows(8), CHECK, rows(4)]
    assert len(lora["moved"]) == 8 and all(moved > 0 for moved in lora["moved"].values())
    # Resumed from step 1 (every lora_A still deferred): lora_A scaled at step 2, bit-exact continuation.
    assert run.ranks[0]["lora_b"]["all_reduces"] == [CHECK, rows(4)]
    assert run.ranks[0]["lora_b"]["scales"] == lora["scales"]
    assert run.ranks[0]["lora_resumed_weights_max_abs_diff"] == 0.0
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    reference = single(tmp_path, model, max_steps=3, weight_decay=0.0)
    diff = max_rel_diff(lora["scales"], reference.scales)
    print(f"\n[zero3 lora] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= SCALE_TOLERANCE


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3", "zero3_offload"])
def test_accumulation_clipping_weight_decay_bf16_momentum(config, tmp_path_factory, tmp_path):
    """1 sequence per rank x 2 accumulation steps, every step clipped (max_grad_norm 0.05), weight
    decay 0.1, bf16 momentum, normalize="max" over the Trainer's two groups (two sub-groups), eps 1e-4
    (of the order of the clipped gradients' spread, so the g-SNR depends on the clipping factor):
    scales, losses and weights equal one process on the same global batch."""
    from deepspeed_zero3_worker import HOSTILE_OPTIM_ARGS

    run = launch(tmp_path_factory, config, "hostile")
    rank0 = run.ranks[0]["hostile"]
    assert rank0["scales"] == run.ranks[1]["hostile"]["scales"] and rank0["momentum_dtypes"] == ["torch.bfloat16"]
    assert rank0["sub_groups"] == 2 and rank0["all_reduces"] == [CHECK, rows(28)] and max(rank0["scales"].values()) == 1.0
    reference = single(tmp_path, tiny_gpt2(), max_grad_norm=0.05, weight_decay=0.1, optim_args=HOSTILE_OPTIM_ARGS)
    diff = max_rel_diff(rank0["scales"], reference.scales)
    losses = max(rel(a, b) for a, b in zip(rank0["losses"][:3], reference.losses[:3]))
    wdiff = max_weight_diff(torch.load(run.out / "weights_hostile.pt"), reference.weights)
    print(f"\n[{config} hostile] scales vs 1 process: {diff:.3e}; first three losses: {losses:.3e}; weights: {wdiff:.3e}")
    assert diff <= SCALE_TOLERANCE and losses <= LOSS_TOLERANCE
    # bf16 momentum: stochastic rounding of the buffer, seeded per element position, differs between a
    # partition and a whole tensor; the update itself is computed in fp32 (measured: 1.9e-8).
    assert wdiff < 1e-5
    # Resumed from the step-2 checkpoint: bf16 momentum restored as saved, bit-exact continuation.
    assert run.ranks[0]["hostile_b"]["scales"] == rank0["scales"] and run.ranks[0]["hostile_b"]["all_reduces"] == []
    assert run.ranks[0]["hostile_b"]["momentum_dtypes"] == ["torch.bfloat16"]
    assert run.ranks[0]["hostile_resumed_weights_max_abs_diff"] == 0.0


@needs_deepspeed
@pytest.mark.slow
def test_zero3_bf16_from_deepspeed_config(tmp_path_factory, reference):
    from test_deepspeed import BF16_SCALE_TOLERANCE

    run = launch(tmp_path_factory, "zero3", "bf16")
    rank0 = run.ranks[0]["bf16"]
    assert rank0["scales"] == run.ranks[1]["bf16"]["scales"] and len(rank0["scales"]) == 28
    assert rank0["all_reduces"] == [CHECK, rows(28)]  # as in fp32: every sub-group at once, at step 1 only
    assert all(math.isfinite(x) for x in rank0["losses"]) and rank0["steps"] == 4
    diff = max_rel_diff(rank0["scales"], reference.scales)
    print(f"\n[zero3 bf16] max relative scale difference vs 1 fp32 process: {diff:.3e}")
    assert diff <= BF16_SCALE_TOLERANCE
    master = torch.load(run.out / "weights_bf16.pt")
    initial = dict(tiny_gpt2().named_parameters())
    assert all(torch.isfinite(w).all() and (w - initial[k].detach().to(torch.bfloat16).float()).abs().max() > 0 for k, w in master.items())


# --------------------------------------------------------------------------- plain deepspeed.initialize, odd layouts
@needs_deepspeed
@pytest.mark.slow
def test_plain_zero3_odd_sizes_sub_groups_offload_and_normalize_max(tmp_path_factory):
    """``deepspeed.initialize(model, optimizer=SGDSaI(...))``: odd sizes (padded pieces), a one-element
    parameter (rank 1 holds none of it), 3 sub-groups (sub_group_size 10), with and without optimizer +
    parameter offload and with parameter offload alone, every step clipped with an eps that makes the g-SNR depend on the clipping factor;
    ``normalize="max"`` with one sub-group and with several; a model built under ``deepspeed.zero.Init``
    (SGD-SaI constructed over already partitioned parameters); fp16 with a loss scale. The one-element block is degenerate: it
    gets the largest g-SNR of all blocks, b.weight's, which is in a later sub-group."""
    import warnings

    from deepspeed_zero3_worker import PLAIN_CLIP, PLAIN_EPS, OddModule, odd_batches

    from sai_hf import SGDSaI

    run = launch(tmp_path_factory, "plain")
    ranks = run.ranks
    reference = {}
    for normalize in ("none", "max"):
        model = OddModule()
        optimizer = SGDSaI(model.parameters(), lr=1e-2, weight_decay=0.1, normalize=normalize, eps=PLAIN_EPS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-element block is degenerate
            for x in odd_batches():
                model(x).backward()
                assert torch.nn.utils.clip_grad_norm_(model.parameters(), PLAIN_CLIP) > PLAIN_CLIP  # clipped
                optimizer.step()
                optimizer.zero_grad()
        names = {id(p): n for n, p in model.named_parameters()}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        reference[normalize] = ({names[id(p)]: s for p, s in optimizer.scales().items()}, weights)
    runs = (
        ("plain", "none"), ("plain_offload", "none"), ("param_offload_only", "none"), ("max_one_sub_group", "max"),
        ("max_sub_groups", "max"), ("zero_init", "none"),
    )  # fmt: skip
    for run_name, normalize in runs:
        got = ranks[0][run_name]
        assert "error" not in got, got
        assert got["scales"] == ranks[1][run_name]["scales"]
        diff = max_rel_diff(got["scales"], reference[normalize][0])
        weights = {n: torch.tensor(w) for n, w in got["weights"].items()}
        wdiff = max_weight_diff(weights, reference[normalize][1])
        print(f"\n[plain {run_name}] scales vs 1 process: {diff:.3e}; weights after 3 steps: {wdiff:.3e}")
        assert diff <= SCALE_TOLERANCE and wdiff < 1e-6
        initial = dict(OddModule().named_parameters())
        assert all((w - initial[n].detach()).abs().max() > 1e-4 for n, w in weights.items())  # all trained
        # Every sub-group is measured in the first one's call: one reduction of the 5 blocks.
        assert got["all_reduces"] == [CHECK, rows(5)]
    assert ranks[0]["plain"]["sub_groups"] == 3 and ranks[0]["max_one_sub_group"]["sub_groups"] == 1
    scales = ranks[0]["plain"]["scales"]
    assert scales["t"] == max(scales.values()) == scales["b.weight"]  # the degenerate block: the largest g-SNR
    # fp16: DeepSpeed's factor includes the loss scale (256): the later sub-groups measured at the first
    # one's call match the one-sub-group run (where each is measured on the gradient DeepSpeed hands over).
    many, one = ranks[0]["fp16_sub_groups"], ranks[0]["fp16_one_sub_group"]
    assert many["loss_scale"] == one["loss_scale"] == 256.0 and many["sub_groups"] == 3
    fp16_diff = max_rel_diff(many["scales"], one["scales"])
    print(f"[plain fp16] scales, 3 sub-groups vs one: {fp16_diff:.3e}; vs 1 fp32 process: {max_rel_diff(many['scales'], reference['none'][0]):.3e}")
    assert fp16_diff <= SCALE_TOLERANCE and max_rel_diff(many["scales"], reference["none"][0]) < 1e-2


# --------------------------------------------------------------------------- the shipped configs under each launcher
LAUNCH_ARGS = [
    "--optim", "sgd_sai", "--use_cpu", "true", "--per_device_train_batch_size", "2", "--max_steps", "4",
    "--learning_rate", "1e-3", "--weight_decay", "0.01", "--seed", "0", "--data_seed", "0",
    "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_shipped_configs_under_accelerate_launch_and_the_deepspeed_launcher(launcher, tmp_path, reference):
    """``accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`` (zero3.json,
    zero3_init_flag) and ``deepspeed --num_gpus 2 ... --deepspeed configs/deepspeed/zero3_offload.json``
    with the Trainer's "auto" values: 2 processes, scales and losses of one process."""
    binary = str(Path(sys.executable).parent / launcher)
    script = WORKERS / "deepspeed_launch_script.py"
    if launcher == "accelerate":
        cmd = [binary, "launch", "--config_file", TESTS.parent / "configs" / "accelerate" / "deepspeed_zero3.yaml",
               "--num_processes", "2", "--main_process_port", free_port(), script, "--output_dir", tmp_path, *LAUNCH_ARGS]  # fmt: skip
    else:
        cmd = [binary, "--num_gpus", "2", "--master_port", free_port(), script,
               "--deepspeed", CONFIGS / "zero3_offload.json", "--output_dir", tmp_path, *LAUNCH_ARGS]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        rc, seconds, output = launch_command(cmd)
    print(f"\n[{launcher} launcher] {seconds:.1f} s")
    assert rc == 0, tail(output)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 2 and run["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    scales = {k: v["scale"] for k, v in json.loads((tmp_path / "gsnr.json").read_text()).items()}
    assert max_rel_diff(scales, reference.scales) <= SCALE_TOLERANCE
    assert max(rel(a, b) for a, b in zip(run["losses"][:3], reference.losses[:3])) <= LOSS_TOLERANCE


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("use_cpu", [True, False], ids=["use_cpu", "use_cpu_not_given"])
def test_zero3_from_pretrained_after_the_arguments_on_cpu(use_cpu, tmp_path, reference):
    """What every real script does (run_clm.py): parse the arguments, then ``from_pretrained`` under the
    ZeRO-3 config. On CPU (``--use_cpu``) transformers started the process group without DeepSpeed, and
    ``deepspeed.zero.Init`` counted a world size of 1: both ranks failed in ``from_pretrained`` with
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 2 * 1 * 1"
    (any optimizer). Guards ``sai_hf.integration.connect_deepspeed_to_process_group``: an unmodified script
    under ``python -m sai_hf.run`` loads partitioned weights and trains as one process does; without
    ``--use_cpu`` too (``train_together_on_cpu`` sets it, and says so once)."""
    tiny_gpt2().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    at = LAUNCH_ARGS.index("--use_cpu")
    args = LAUNCH_ARGS if use_cpu else [*LAUNCH_ARGS[:at], *LAUNCH_ARGS[at + 2:]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "sai_hf.run", WORKERS / "deepspeed_from_pretrained_script.py", "--model_name_or_path", tmp_path / "model",
           "--deepspeed", CONFIGS / "zero3.json", "--output_dir", out, *args]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        rc, seconds, output = launch_command(cmd)
    print(f"\n[zero3 from_pretrained] {seconds:.1f} s")
    (tmp_path / "launch.log").write_text(output)
    assert rc == 0, f"{tail(output)}\n--- whole output: {tmp_path / 'launch.log'}"
    assert output.count("use_cpu set to True") == (0 if use_cpu else 1)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["partitioned_at_load"] and run["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    scales = {k: v["scale"] for k, v in json.loads((out / "gsnr.json").read_text()).items()}
    diff = max_rel_diff(scales, reference.scales)
    losses = max(rel(a, b) for a, b in zip(run["losses"][:3], reference.losses[:3]))
    print(f"[zero3 from_pretrained] scales vs 1 process: {diff:.3e}; first three losses: {losses:.3e}")
    assert diff <= SCALE_TOLERANCE and losses <= LOSS_TOLERANCE


# --------------------------------------------------------------------------- in one process
def test_grad_factor_scales_statistics_as_the_scaled_gradient():
    """``sai_hf.gsnr.scaled_statistics``: ZeRO-3's later sub-groups are measured at the first step before DeepSpeed
    multiplies their gradients by the loss-scale and clipping factor; the rows must be those of the
    multiplied gradient, without making it."""
    from sai_hf.gsnr import gradient_statistics, scaled_statistics

    torch.manual_seed(0)
    grads = [torch.randn(1000) * 1e-3 + 2e-4, torch.randn(7, 3), torch.zeros(5), torch.randn(1)]
    factors = [0.0123, None, 0.5, 3.0]
    got = torch.cat([scaled_statistics(gradient_statistics([g]), f) for g, f in zip(grads, factors)])
    want = gradient_statistics([g * (1.0 if f is None else f) for g, f in zip(grads, factors)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # fp32 products vs exact scaling
    assert torch.equal(got[1], gradient_statistics([grads[1]])[0])  # no factor: untouched
    assert got[2].tolist() == [5.0, 0.0, 0.0, 0.0, 0.0]  # a zero gradient stays zero (deferred)


def test_drift_history_is_written_by_the_main_process_only(tmp_path):
    """Found under ZeRO-3 + offload with SAI_HF_GSNR_TRACK_EVERY (both ranks wrote gsnr_history.json
    into the same temporary file: FileNotFoundError): ``track_drift`` must read the TrainerState's
    ``is_world_process_zero``, not a block's state."""
    from sai_hf import GSNRCallback, SGDSaI

    model = torch.nn.Linear(4, 3)
    sai = SGDSaI(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().mean().backward()
    sai.step()
    model(torch.randn(5, 4)).square().mean().backward()
    callback = GSNRCallback(track_every=2)
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.track_drift(args, SimpleNamespace(global_step=1, is_world_process_zero=False), model, sai)
    assert not (tmp_path / "gsnr_history.json").exists()  # another rank: nothing written
    callback.track_drift(args, SimpleNamespace(global_step=1, is_world_process_zero=True), model, sai)
    assert (tmp_path / "gsnr_history.json").exists()  # the main process: written
