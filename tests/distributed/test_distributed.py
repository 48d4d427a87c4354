"""Multi-process SGD-SaI: DDP, FSDP2, FSDP1 and the ``sai_hf.run`` launcher (DeepSpeed: test_deepspeed.py).

The multi-process tests run 2 CPU processes with gloo (``torchrun`` / ``accelerate launch``), one
launch per test module fixture; each compares against a single process on the same global batch
(4 sequences: 2 per rank vs 4 in one process). Also here: several processes without an accelerator get
``use_cpu`` (``configs/accelerate/cpu-ddp.yaml`` as documented), and the launches' deadlines and timeout reports
(tests/support/_launch.py).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import _launch
from _launch import Deadline, child_env, free_port, launch, launch_two_ranks, tail
from _models import TokenDataset, tiny_gpt2, training_args
from transformers import Trainer

import sai_hf
from sai_hf import SGDSaI, UnsupportedShardingError, statistics_reducer
from sai_hf.parameter_names import clean_parameter_name, parameter_names

TESTS = Path(__file__).resolve().parents[1]
WORKERS = TESTS / "workers"
WRAPPER_PARTS = ("module.", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


# --------------------------------------------------------------------------- helpers
def max_rel_diff(scales: dict[str, float], reference: dict[str, float]) -> float:
    assert set(scales) == set(reference)
    return max(abs(scales[k] - reference[k]) / abs(reference[k]) for k in reference)


def gsnr_scales(path: Path) -> dict[str, float]:
    return {name: entry["scale"] for name, entry in json.loads(path.read_text()).items()}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, dict]:
    """gsnr.json of one process on the global batch of the 2-process runs (4 sequences per step, 4
    steps), and its final weights under ``"_weights"``."""
    out = tmp_path_factory.mktemp("single")
    args = training_args(out, per_device_train_batch_size=4, weight_decay=0.01, max_steps=4)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    trainer.train()
    report = json.loads((out / "gsnr.json").read_text())
    return {**report, "_weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


def reference_scales(single_process: dict) -> dict[str, float]:
    return {k: v["scale"] for k, v in single_process.items() if k != "_weights"}


def max_weight_diff(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((weights[k] - reference[k]).abs().max()) for k in weights)


# --------------------------------------------------------------------------- DDP + torchrun + launcher
DDP_SCRIPT_ARGS = [
    "--optim", "sgd_sai", "--use_cpu", "true", "--per_device_train_batch_size", "2", "--max_steps", "4",
    "--learning_rate", "1e-3", "--weight_decay", "0.01", "--seed", "0", "--data_seed", "0",
    "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("ddp")
    script = WORKERS / "ddp_script.py"
    args = ["--output_dir", str(out), *DDP_SCRIPT_ARGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "sai_hf.run", script, *args]  # fmt: skip
    run = launch_two_ranks(cmd, out, "[ddp] torchrun, 2 processes")
    return SimpleNamespace(**vars(run), script=script, args=args)


@pytest.mark.slow
def test_ddp_unmodified_script_through_torchrun_and_sai_hf_run(ddp_run):
    for rank in ddp_run.ranks:
        assert rank["argv"] == [str(ddp_run.script), *ddp_run.args]
        assert rank["name"] == "__main__"
        assert rank["file"] == str(ddp_run.script)
        assert rank["path0"] == str(WORKERS)
        assert rank["world"] == 2 and rank["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert rank["optimizer"] == "SGDSaI"


@pytest.mark.slow
def test_ddp_scales_equal_across_ranks_and_to_single_process(ddp_run, single_process):
    rank0, rank1 = (rank["scales"] for rank in ddp_run.ranks)
    assert rank0 == rank1  # bit-identical: every rank reduced the same all-reduced gradients
    report = json.loads((ddp_run.out / "gsnr.json").read_text())
    assert not [name for name in report if any(part in name for part in WRAPPER_PARTS)]
    assert gsnr_scales(ddp_run.out / "gsnr.json") == rank0
    assert [entry["numel"] for entry in report.values()] == [single_process[k]["numel"] for k in report]
    diff = max_rel_diff(rank0, reference_scales(single_process))
    print(f"\n[ddp] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= 1e-3


@pytest.mark.slow
def test_ddp_weights_identical_across_ranks_and_close_to_single_process(ddp_run, single_process):
    w0, w1 = (torch.load(ddp_run.out / f"weights_rank{r}.pt") for r in range(2))
    assert w0.keys() == w1.keys()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    initial = tiny_gpt2().state_dict()
    assert not torch.equal(w0["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])  # trained
    diff = max_weight_diff(w0, single_process["_weights"])
    print(f"\n[ddp] max abs weight difference vs 1 process after 4 steps: {diff:.3e}")
    assert diff < 1e-5


@pytest.mark.slow
def test_cpu_ddp_yaml_as_documented_is_one_ddp_run(tmp_path, ddp_run):
    """``accelerate launch --config_file configs/accelerate/cpu-ddp.yaml -m sai_hf.run SCRIPT ...`` as its header
    gives it, without ``--use_cpu``: accelerate 1.16 does not pass the YAML's ``use_cpu: true`` on to the processes,
    and transformers counted a world size of 1 in each: two one-process trainings writing one ``output_dir``, exit 0.
    Guards ``sai_hf.integration.train_together_on_cpu``: one DDP run (the torchrun run's scales), said once."""
    at = DDP_SCRIPT_ARGS.index("--use_cpu")
    args = ["--output_dir", str(tmp_path), *DDP_SCRIPT_ARGS[:at], *DDP_SCRIPT_ARGS[at + 2:]]  # without "--use_cpu true"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", TESTS.parent / "configs" / "accelerate" / "cpu-ddp.yaml", "--main_process_port", free_port(),
           "-m", "sai_hf.run", WORKERS / "ddp_script.py", *args]  # fmt: skip
    run = launch_two_ranks(cmd, tmp_path, "[cpu-ddp.yaml] accelerate launch, 2 processes")
    for rank in run.ranks:
        assert rank["world_size"] == 2 and rank["parallel_mode"] == "ParallelMode.DISTRIBUTED" and rank["use_cpu"]
    assert run.ranks[0]["scales"] == run.ranks[1]["scales"] == ddp_run.ranks[0]["scales"]
    assert run.output.count("use_cpu set to True") == 1  # the main process says so, once


@pytest.mark.parametrize(
    "env, use_cpu, accelerator, set_it",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, False, False, True),  # cpu-ddp.yaml, torchrun, the deepspeed launcher
        ({"WORLD_SIZE": "2", "RANK": "1"}, False, False, True),  # (said by rank 0 only)
        ({"WORLD_SIZE": "1"}, False, False, False),  # one process: nothing to train apart
        ({}, False, False, False),
        ({"WORLD_SIZE": "2"}, False, True, False),  # a GPU: accelerate runs DDP on it
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True"}, False, False, False),  # accelerate launch --cpu passed it on
        ({"WORLD_SIZE": "2"}, True, False, False),  # --use_cpu true: nothing to say
    ],
)
def test_several_processes_without_an_accelerator_get_use_cpu(monkeypatch, caplog, env, use_cpu, accelerator, set_it):
    """The rule of ``sai_hf.integration.train_together_on_cpu`` (run before transformers sets up the devices)."""
    from sai_hf import integration

    for name in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(integration, "_no_distributed_accelerator", lambda: not accelerator)
    args = SimpleNamespace(use_cpu=use_cpu)
    with caplog.at_level("WARNING", logger="sai_hf.integration"):
        integration.train_together_on_cpu(args)
    assert args.use_cpu is (use_cpu or set_it)
    said = [r.getMessage() for r in caplog.records if "use_cpu set to True" in r.getMessage()]
    assert len(said) == (set_it and env.get("RANK") == "0")


def test_this_machine_has_no_distributed_accelerator():
    import torch

    from sai_hf.integration import _no_distributed_accelerator

    assert _no_distributed_accelerator() is (not torch.cuda.is_available())


# --------------------------------------------------------------------------- FSDP2 through accelerate launch
@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", WORKERS / "accelerate_fsdp2_cpu.yaml", "--main_process_port", free_port(),
           "-m", "sai_hf.run", WORKERS / "fsdp2_worker.py", out]  # fmt: skip
    return launch_two_ranks(cmd, out, "[fsdp2] accelerate launch, 2 processes, 4 Trainer runs")


@pytest.mark.slow
def test_fsdp2_reducer_equals_whole_tensor_statistics_after_agreeing_on_the_blocks(fsdp2_run):
    for rank in fsdp2_run.ranks:
        assert rank["world"] == 2 and rank["fsdp_version"] == 2
        check = rank["reducer"]
        assert check["blocks"] == check["dtensor_grads"] == 28  # every gradient is a DTensor shard
        assert check["sharded_blocks"] == 28  # no local shard is the whole tensor
        assert check["count_equal"]  # sum of the shards' n is each tensor's numel
        # g-SNR of the reduced shards vs of the whole tensors; large CPU tensors are reduced in float32
        # rows (gradient_statistics), whose boundaries differ between a shard and the whole tensor.
        assert check["max_rel_diff"] < 1e-7
        assert check["check_all_reduces"] == 2
        # The Trainer run: the ranks agree on the block list, then one all_reduce for all 28 blocks.
        assert rank["all_reduces_a"] == ["(4,) torch.float64", "(28, 5) torch.float64"]


@pytest.mark.slow
def test_fsdp2_scales_equal_across_ranks_and_to_single_process(fsdp2_run, single_process):
    rank0, rank1 = fsdp2_run.ranks
    assert rank0["scales_a"] == rank1["scales_a"]
    report = json.loads((fsdp2_run.out / "a" / "gsnr.json").read_text())
    assert gsnr_scales(fsdp2_run.out / "a" / "gsnr.json") == rank0["scales_a"]
    assert {k: v["numel"] for k, v in report.items()} == {k: single_process[k]["numel"] for k in report}
    assert rank0["writes_a"] == [str(fsdp2_run.out / "a" / "gsnr.json")]  # once, by the main process
    assert rank1["writes_a"] == []
    diff = max_rel_diff(rank0["scales_a"], reference_scales(single_process))
    print(f"\n[fsdp2] max relative scale difference vs 1 process: {diff:.3e}")
    assert diff <= 1e-3


@pytest.mark.slow
def test_fsdp2_training_on_local_shards_matches_single_process(fsdp2_run, single_process):
    weights = torch.load(fsdp2_run.out / "weights_a.pt")
    reference = single_process["_weights"]
    assert set(weights) <= set(reference)
    initial = tiny_gpt2().state_dict()
    assert all(not torch.equal(weights[k], initial[k]) for k in weights)  # every block was updated
    diff = max_weight_diff(weights, reference)
    print(f"\n[fsdp2] max abs weight difference vs 1 process after 4 steps: {diff:.3e}")
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, resumed, key",
    [("a", "b", "resumed_weights_max_abs_diff"), ("c", "d", "resumed_full_weights_max_abs_diff")],
    ids=["sharded_state_dict", "full_state_dict"],
)
def test_fsdp2_resume_keeps_scales(fsdp2_run, run, resumed, key):
    for rank in fsdp2_run.ranks:
        assert rank[f"scales_{resumed}"] == rank[f"scales_{run}"]  # restored, not recomputed after resume
        assert rank[f"writes_{resumed}"] == []  # nothing new to report
        assert rank[key] == 0.0  # the resumed run ends exactly where the uninterrupted one did
    assert fsdp2_run.ranks[0]["scales_c"] == fsdp2_run.ranks[0]["scales_a"]
    assert fsdp2_run.ranks[0]["full_state_dict_type"] == "StateDictType.FULL_STATE_DICT"


# --------------------------------------------------------------------------- FSDP1 and DTensor layouts
@pytest.fixture(scope="module")
def shard_run(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           WORKERS / "shard_worker.py", out]  # fmt: skip
    return launch_two_ranks(cmd, out, "[fsdp1+dtensor] torchrun, 2 processes")


@pytest.mark.slow
def test_dtensor_layouts_reduce_exactly_after_agreeing_on_the_blocks(shard_run):
    for rank in shard_run.ranks:
        d = rank["dtensor"]
        assert d["reducer_all_reduces"] == ["(4,) torch.float64", "(8, 5) torch.float64"]  # block-list check, then 8 blocks' rows
        assert d["reduced_n"] == d["whole_n"]  # replicas counted once, shards summed, empty shard ok
        assert d["reduced_finite"]  # the NaN of a non-contributing replica did not leak
        assert d["reduced_vs_whole_max_rel"] < 1e-12
        assert d["unsharded_only_reducer_is_none"]
        assert "Partial" in d["partial_refused"]
        assert d["auto_all_reduces"] == ["(4,) torch.float64", "(7, 5) torch.float64"]  # initialize_scales() picked the reducer by itself
        assert d["auto_second_call_in_same_step"] == 0
        assert d["auto_records"] == 7
        assert "different lists of parameter blocks" in d["count_mismatch_refused"]
        assert max(abs(a - b) / b for a, b in zip(d["auto_scales"], d["single_scales"])) < 1e-12
    local0, local1 = (rank["dtensor"]["local_n"] for rank in shard_run.ranks)
    assert local0[1] == 1.0 and local1[1] == 0.0  # the (1,) tensor: rank 1's shard is empty


@pytest.mark.slow
def test_fsdp1_use_orig_params_callback_and_lazy_path(shard_run):
    rank0, rank1 = (rank["fsdp1"] for rank in shard_run.ranks)
    # The deferred block lives on one rank only: the other has grad=None for it, yet both reduce.
    has_grad = [[s["deferred_has_grad_here"] for s in f["steps"]] for f in (rank0, rank1)]
    assert has_grad[0] != has_grad[1]
    for f in (rank0, rank1):
        assert f["steps"][0]["all_reduces"] == ["(4,) torch.float64", "(28, 5) torch.float64"]  # step() on every rank, the deferred block too
        assert not f["steps"][0]["deferred_scaled"]
        assert f["steps"][1]["all_reduces"] == ["(4,) torch.float64", "(1, 5) torch.float64"] and f["steps"][1]["deferred_scaled"]
        assert set(f["scales"]) == set(f["reference_scales"]) and len(f["scales"]) == 28
        assert f["scales_vs_reference_max_rel"] < 1e-6
        assert f["lazy_scaled"] == 28 and f["lazy_scales_vs_single_max_rel"] < 1e-6
        assert "register_sharded_model" in f["unregistered_refused"]
        assert "use_orig_params" in f["flat_param_refused"]
    assert rank0["scales"] == rank1["scales"]
    report = json.loads((shard_run.out / "fsdp1" / "gsnr.json").read_text())
    assert sorted(report) == sorted(rank0["reference_scales"])  # original names, no _fsdp_wrapped_module
    assert report["transformer.wte.weight"]["numel"] == 128 * 32  # the whole tensor, not the shard
    assert len(rank0["writes"]) == 2 and rank1["writes"] == []  # main process: step 1, then the deferred block


# --------------------------------------------------------------------------- single process, in-process
def test_reducer_is_none_and_no_collective_in_one_process():
    model = tiny_gpt2()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    assert statistics_reducer(list(model.parameters())) is None
    assert len(SGDSaI(model.parameters()).initialize_scales()) == 28


def test_flat_parameter_refused_even_in_one_process():
    flat = torch.nn.Parameter(torch.zeros(8))
    flat._is_flat_param = True
    flat.grad = torch.ones(8)
    with pytest.raises(UnsupportedShardingError, match="use_orig_params"):
        SGDSaI([flat]).step()


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.weight"),
        ("_fsdp_wrapped_module.transformer.h.0._fsdp_wrapped_module.ln_1.weight", "transformer.h.0.ln_1.weight"),
        ("_orig_mod.transformer.h.1._checkpoint_wrapped_module.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"),
        ("base_model.model.module_list.0.weight", "base_model.model.module_list.0.weight"),
    ],
)
def test_clean_parameter_name(raw, clean):
    assert clean_parameter_name(raw) == clean


def test_parameter_names_unwrap_data_parallel_compile_and_checkpoint_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_gpt2()
    expected = {id(p): n for n, p in model.named_parameters()}
    model.transformer.h[0] = checkpoint_wrapper(model.transformer.h[0])
    wrapped = torch.nn.DataParallel(torch.compile(model))
    raw = [n for n, _ in wrapped.named_parameters()]
    assert raw[0].startswith("module._orig_mod.") and any("_checkpoint_wrapped_module" in n for n in raw)
    assert parameter_names(wrapped) == expected


# --------------------------------------------------------------------------- refusals (DeepSpeed: test_deepspeed.py)
def test_trainer_refuses_fsdp1_without_orig_params(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    args = training_args(tmp_path)
    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=False)  # accelerate's FSDP1 plugin needs a GPU
    original_init = Trainer.create_accelerator_and_postprocess

    def create_accelerator(self):
        original_init(self)
        monkeypatch.setitem(AcceleratorState._shared_state, "fsdp_plugin", plugin)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_accelerator)
    with pytest.raises(UnsupportedShardingError, match="use_orig_params"):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    plugin.use_orig_params = True
    Trainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=TokenDataset())


def test_deepspeed_zero3_parameters_refused():
    pytest.importorskip("deepspeed")  # ZeRO-3 parameters exist where deepspeed is imported, which registers the adapter
    p = torch.nn.Parameter(torch.zeros(0))  # ZeRO-3 leaves an empty placeholder with ds_* attributes
    p.ds_id = 0
    p.grad = torch.zeros(0)
    with pytest.raises(UnsupportedShardingError, match="ZeRO stage 3") as err:
        statistics_reducer([p])
    assert "FSDP2" in str(err.value)


# --------------------------------------------------------------------------- the 2-rank launches' deadlines (tests/support/_launch.py)
#: Like torchrun under a launch: a rank in a session of its own, writing to the launch's output, while a C++ extension
#: builds (DeepSpeed's first use on a fresh machine).
ESCAPING_RANK = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; print('rank up', flush=True); time.sleep(60)"], start_new_session=True)
print("Building extension module deepspeed_shm_comm...", flush=True)
time.sleep(60)
"""


def test_launch_past_its_deadline_kills_every_rank_and_says_what_it_was_doing():
    """A launch's deadline killed only the launch's own session; torchrun starts each rank in a session of its own,
    so the ranks lived on holding the output pipe: the zero1 launch "killed after 240 s" returned after 399.8 s,
    with the ranks' Broken pipe and C++ frames and a guess ("a rank waiting in a collective?"), while DeepSpeed's op
    was still building on a loaded machine. The kill must reach every process the launch started, and the one
    report line say how long, at what load, what was running and what it was doing."""
    rc, seconds, output = launch([sys.executable, "-c", ESCAPING_RANK], timeout=3)
    assert rc == -signal.SIGKILL and seconds < 30, (seconds, output)  # not the escaped rank's 60 s
    report = [line for line in output.splitlines() if line.startswith("[test] timed out after ")]
    assert len(report) == 1 and output.rstrip().endswith(report[0]), output
    assert "of its 3 s deadline counted at a 1-minute load average" in report[0]
    assert "while a C++ extension was being built (DeepSpeed's CPU communication op" in report[0]
    assert report[0].endswith("killed: python (-c) x2") and "collective" not in output
    assert tail(output).splitlines()[0] == report[0]  # what a failing launch_two_ranks shows first


def test_launch_deadline_counts_a_loaded_machines_seconds_at_its_share():
    """A fixed wall-clock deadline failed launches on a machine loaded by other jobs; a second at a 1-minute load
    average of L on C CPUs now counts min(1, C / L), and a hard limit (4x) still ends a launch there."""
    cpus = Deadline(1).cpus
    now, load = [100.0], [2.0 * cpus]
    deadline = Deadline(10, clock=lambda: now[0], load_average=lambda: load[0])
    now[0] += 18
    assert not deadline.passed()  # 9 s counted at twice the CPUs' load
    now[0] += 2
    assert deadline.passed()
    unloaded = Deadline(10, clock=lambda: now[0], load_average=lambda: cpus / 2)
    now[0] += 10
    assert unloaded.passed()  # an idle machine's second counts in full, not more
    overloaded = Deadline(10, clock=lambda: now[0], load_average=lambda: 1000.0 * cpus)
    now[0] += 39
    assert not overloaded.passed()
    now[0] += 1
    assert overloaded.passed() and overloaded.describe().startswith("40 s (0 s of its 10 s deadline")


def test_deepspeed_op_is_made_ready_once_before_the_launches_outside_their_deadline(monkeypatch):
    """DeepSpeed builds its CPU communication op into ~/.cache/torch_extensions on first use, inside the first
    DeepSpeed launch's deadline; on a loaded machine that alone took most of it. Now it is built (or loaded) once per
    session before the first launch with DS_ACCELERATOR=cpu, and a build that fails says what it needs."""
    monkeypatch.setattr(_launch, "_DEEPSPEED_OPS", {})
    monkeypatch.setattr(_launch, "BUILD_DEEPSPEED_CPU_OPS", "import time; time.sleep(4); print('[op] ready 4.0 s', flush=True)")
    env = {**child_env(), "DS_ACCELERATOR": "cpu"}
    for _ in range(2):
        rc, seconds, output = launch([sys.executable, "-c", "print('ok')"], timeout=3, env=env)
        assert rc == 0 and output == "ok\n" and seconds < 3  # the build's 4 s are not the launch's
    assert list(_launch._DEEPSPEED_OPS.values()) == [_launch.prepare_deepspeed_cpu_ops(env)]  # built once
    assert _launch.prepare_deepspeed_cpu_ops(env).startswith("DeepSpeed CPU op: ready 4.0 s (before the launch")
    assert launch([sys.executable, "-c", "print('no DeepSpeed')"], timeout=3, env=child_env())[0] == 0
    monkeypatch.setattr(_launch, "_DEEPSPEED_OPS", {})
    monkeypatch.setattr(_launch, "BUILD_DEEPSPEED_CPU_OPS", "import sys; print('error: command g++ not found'); sys.exit(1)")
    with pytest.raises(RuntimeError, match=r"deepspeed_shm_comm\) did not build or load before the launch \(it needs g\+\+ and ninja"):
        launch([sys.executable, "-c", "print('ok')"], timeout=3, env=env)
