"""The CUDA suite (``make test-gpu``): every test is marked ``cuda`` and skipped without a GPU.

* the fused path (``SGDSaI(fused=True)``; the Triton kernel once wired in) against the for-loop path,
  for float32 and bfloat16 parameters and bfloat16 momentum;
* ``sai_hf.triton_update.triton_sgd_sai_`` called directly, bit for bit against torch float32 ops;
* no host-device sync in the steps after the first (``set_sync_debug_mode("error")``);
* the first step's statistics on the device, against the host's float64 sums;
* blocks on two GPUs (naive model parallelism): each device's launches on that device;
* stochastic rounding unbiased on CUDA (torch path and kernel);
* ``torch.compile`` of a step against eager;
* a one-GPU ``transformers.Trainer`` run with ``bf16=True, optim="sgd_sai"``;
* ``scripts/bench_optimizers.py --device cuda`` at a small shape.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _scripts import load_module

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "support"))  # tests/support/_models.py, _triton_reference.py (as tests/conftest.py does)

from _models import TokenDataset, tiny_gpt2, training_args  # noqa: E402
from _triton_reference import compare_with_loop_path, run_steps  # noqa: E402

from sai_hf import SGDSaI, find_sgd_sai  # noqa: E402
from sai_hf.functional import stochastic_round_to_bf16  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CUDA = "cuda"
SHAPES = [(64, 48), (48,), (1,), (700,), (3, 5, 7)]


def _needs_triton():
    pytest.importorskip("triton", reason="triton is not installed")
    from sai_hf.triton_update import triton_available, triton_sgd_sai_

    if not triton_available(CUDA):
        pytest.skip("sai_hf.triton_update.triton_available('cuda') is False (TRITON_INTERPRET set?)")
    return triton_sgd_sai_


def _run_optimizer(base, grads, **kwargs):
    """Parameters and momentum buffers after ``len(grads)`` steps of a fresh ``SGDSaI`` on copies of ``base``."""
    params = [t.clone().requires_grad_() for t in base]
    opt = SGDSaI(params, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-element block is degenerate
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]


def _fixed_problem(param_dtype, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen).to(CUDA, param_dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(CUDA, param_dtype) for s in SHAPES] for _ in range(steps)]
    return base, grads


# ------------------------------------------------------------------------ fused/Triton vs loop

CASES = {
    "fp32": (torch.float32, None),
    "bf16-params": (torch.bfloat16, None),
    "bf16-momentum": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("path", [dict(fused=True), dict()], ids=["fused", "default"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_and_default_paths_match_loop(case, path):
    param_dtype, momentum_dtype = CASES[case]
    base, grads = _fixed_problem(param_dtype)
    hp = dict(lr=1e-3, weight_decay=0.1, momentum_dtype=momentum_dtype)
    try:
        got_p, got_m = _run_optimizer(base, grads, **hp, **path)
    except ValueError as exc:
        if path.get("fused") and momentum_dtype is not None:
            pytest.skip(f"SGDSaI(fused=True) rejects momentum_dtype={momentum_dtype}: {exc}")
        raise
    want_p, want_m = _run_optimizer(base, grads, **hp, foreach=False, fused=False)
    for a, b, m_a, m_b in zip(got_p, want_p, got_m, want_m):
        assert a.dtype == b.dtype and m_a.dtype == m_b.dtype
        if case == "fp32":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m_a, m_b, rtol=1e-5, atol=1e-6)
        elif case == "bf16-params":  # the loop rounds p twice a step (decay, update), a kernel may once
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(m_a.float(), m_b.float(), rtol=2e-2, atol=1e-2)
        else:  # bf16 momentum: the buffers differ by a few bf16 ulps where fp32 m rounded differently
            torch.testing.assert_close(m_a.float(), m_b.float(), rtol=0, atol=0.05)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-3)


# ------------------------------------------------------------------------ the kernel itself

KERNEL_SHAPES = [(1,), (1023,), (1024,), (8193,), (300, 301), (2, 3, 4)]


@pytest.mark.parametrize(
    "param_dtype,buf_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["fp32", "fp32-bf16m", "bf16", "fp16", "fp16-bf16m", "bf16-fp32m"],
)
def test_kernel_bit_exact_on_cuda(param_dtype, buf_dtype):
    update = _needs_triton()
    run_steps(update, KERNEL_SHAPES, param_dtype=param_dtype, buf_dtype=buf_dtype, device=CUDA, steps=3)


def test_kernel_maximize_momentum_zero_and_small_blocks_on_cuda():
    update = _needs_triton()
    run_steps(update, KERNEL_SHAPES, maximize=True, device=CUDA, steps=2)
    run_steps(update, KERNEL_SHAPES, momentum=0.0, device=CUDA, steps=2)
    run_steps(update, [(1,), (63,), (65,), (1000,)] * 20, device=CUDA, steps=2, block=64, chunk_blocks=2)


def test_kernel_matches_the_loop_path_on_cuda():
    """``triton_sgd_sai_`` against ``sgd_sai(foreach=False, fused=False)`` with the same seeds."""
    compare_with_loop_path(_needs_triton(), CUDA)


def test_kernel_one_launch_for_many_tensors(monkeypatch):
    """499 tensors of one dtype: one launch (and one small table copy), all of them updated."""
    update = _needs_triton()
    from sai_hf import _triton_kernels

    launches = []
    kernel = _triton_kernels.sgd_sai_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(_triton_kernels, "sgd_sai_kernel", CountingKernel())
    params = [torch.randn(n, device=CUDA) for n in range(1, 500)]
    before = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.empty_like(p) for p in params]
    update(params, grads, buffers, [-0.5] * len(params), decay=1.0, momentum=0.9, first=[True] * len(params),
           maximize=False, seeds=None)  # fmt: skip
    assert len(launches) == 1
    for p, p0, g, m in zip(params, before, grads, buffers):
        assert torch.equal(m, g)
        assert torch.equal(p, p0 + torch.tensor(-0.5) * g)


# ------------------------------------------------------------------------ host syncs


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(fused=True), dict(foreach=True), dict(momentum_dtype=torch.bfloat16), dict(weight_decay=0.0)],
    ids=["default", "fused", "foreach", "bf16-momentum", "no-decay"],
)
def test_no_host_sync_after_the_first_step(kwargs):
    model = tiny_gpt2().to(CUDA)
    opt = SGDSaI(model.parameters(), lr=1e-3, **{"weight_decay": 0.1, **kwargs})

    def set_grads():
        for p in model.parameters():
            p.grad = torch.randn_like(p)

    set_grads()
    opt.step()  # the first step computes the scales: one batched device-to-host transfer
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            set_grads()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kernel_has_no_host_sync():
    update = _needs_triton()
    params = [torch.randn(n, device=CUDA) for n in (5, 5000, 70_000)]
    buffers = [torch.empty(p.shape, device=CUDA, dtype=torch.bfloat16) for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]

    def step(t):
        update(params, grads[t], buffers, [-1e-2] * 3, decay=1 - 1e-4, momentum=0.9, first=[t == 0] * 3,
               maximize=False, seeds=[t * 10 + i for i in range(3)])  # fmt: skip

    step(0)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(1, 4):
            step(t)
    finally:  # a failure must not leave "error" mode on for the tests that follow
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ------------------------------------------------------------------------ first-step statistics


def test_first_step_statistics_on_cuda_match_the_host_float64_sums():
    """``gradient_statistics`` on CUDA gradients (float32 and bfloat16, one entry to 2^20): the float64 shifted sums
    on the device give the host's statistics (to ~1e-10), on the device, and no spread for a constant gradient."""
    from sai_hf import gradient_statistics
    from sai_hf.gsnr import _shifted_statistics

    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(n, generator=gen) * 1e-3 + 1e-4 for n in (1, 1000, 70_000, 1 << 20)]
    host += [torch.randn(3000, generator=gen).to(torch.bfloat16), torch.full((5000,), 0.25)]
    stats = gradient_statistics([g.to(CUDA) for g in host])
    assert stats.device.type == "cuda"
    want = torch.stack([_shifted_statistics(g, torch.float64) for g in host])
    torch.testing.assert_close(stats.cpu(), want, rtol=1e-10, atol=1e-14)
    assert stats[-1, 3].item() == 0.0  # a constant gradient: no spread


# ------------------------------------------------------------------------ several GPUs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_blocks_on_two_gpus_update_and_reduce_on_their_own_devices():
    """Naive model parallelism (``device_map="auto"``): one optimizer over blocks on cuda:0 and
    cuda:1, the current device cuda:0. Each device's Triton launches and first-step statistics
    run on that device: the same results as the for-loop path and as float64 sums."""
    update = _needs_triton()
    from sai_hf import gradient_statistics
    from sai_hf.gsnr import _shifted_statistics

    devices = ["cuda:0", "cuda:1"]
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(s, generator=gen) for s in SHAPES]
    base = [t.to(devices[i % 2]) for i, t in enumerate(host)]
    grads = [[torch.randn(s, generator=gen).to(devices[i % 2]) for i, s in enumerate(SHAPES)] for _ in range(4)]
    with torch.cuda.device(0):
        for momentum_dtype in (None, torch.bfloat16):
            hp = dict(lr=1e-3, weight_decay=0.1, momentum_dtype=momentum_dtype)
            got_p, got_m = _run_optimizer(base, grads, **hp)
            want_p, want_m = _run_optimizer(base, grads, **hp, foreach=False, fused=False)
            p_tol, m_tol = (dict(rtol=1e-5, atol=1e-6),) * 2 if momentum_dtype is None else (dict(rtol=1e-4, atol=5e-3), dict(rtol=0, atol=0.05))
            for a, b, m_a, m_b in zip(got_p, want_p, got_m, want_m):
                assert a.device == b.device == m_a.device
                torch.testing.assert_close(m_a.float(), m_b.float(), **m_tol)  # as test_fused_and_default_paths_match_loop
                torch.testing.assert_close(a, b, **p_tol)
        run_steps(update, KERNEL_SHAPES, device="cuda:1", steps=2)  # the kernel alone, bit for bit
        stats = gradient_statistics([g.contiguous() for g in grads[0]])
        torch.cuda.synchronize(1)
    want = torch.stack([_shifted_statistics(g.cpu().contiguous(), torch.float64) for g in grads[0]])
    torch.testing.assert_close(stats.cpu(), want, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------ stochastic rounding

VALUES = [1.0 + 2**-9, -3.0 - 2**-8, 1e-3 + 1e-6, 7.0, 0.1, -1e-20]


def test_stochastic_rounding_unbiased_on_cuda():
    x = torch.tensor(VALUES, device=CUDA)
    draws = torch.stack([stochastic_round_to_bf16(x, seed=s).double() for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), x.double(), rtol=2e-4, atol=0)
    assert torch.equal(stochastic_round_to_bf16(x, seed=3).cpu(), stochastic_round_to_bf16(x.cpu(), seed=3))


def test_kernel_stochastic_rounding_unbiased_and_equal_to_the_torch_rounding():
    """4000 seeds as 4000 tensors of one launch: each buffer is the first update ``m = g``."""
    update = _needs_triton()
    x = torch.tensor(VALUES, device=CUDA)
    n = 4000
    params = [torch.zeros_like(x) for _ in range(n)]
    buffers = [torch.empty_like(x, dtype=torch.bfloat16) for _ in range(n)]
    update(params, [x] * n, buffers, [-1.0] * n, decay=1.0, momentum=0.9, first=[True] * n, maximize=False,
           seeds=list(range(n)))  # fmt: skip
    draws = torch.stack(buffers).double()
    torch.testing.assert_close(draws.mean(0), x.double(), rtol=2e-4, atol=0)
    for s in (0, 1, 2, 1234, n - 1):
        assert torch.equal(buffers[s], stochastic_round_to_bf16(x, seed=s))
    assert all(torch.equal(p, -x) for p in params[:10])


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16], ids=["fp32-momentum", "bf16-momentum"])
def test_compiled_step_matches_eager_on_cuda(momentum_dtype):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(CUDA) for s in [(16, 8), (8,), (1,)]]
    grads = [[torch.randn(t.shape, generator=gen).to(CUDA) for t in base] for _ in range(3)]
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = [t.clone().requires_grad_() for t in base]
        opt = SGDSaI(params, lr=1e-2, weight_decay=0.01, momentum_dtype=momentum_dtype)
        step = torch.compile(opt.step) if compiled else opt.step
        with pytest.warns(UserWarning, match="no usable"):  # the one-element block
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                step()
        results.append([p.detach().clone() for p in params])
    atol = 1e-6 if momentum_dtype is None else 2e-3  # bf16: the rounding hash takes m's float32 bits
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------ Trainer


def test_trainer_bf16_sgd_sai_on_one_gpu(tmp_path):
    """8 examples seen 8 times each: the loss must fall (measured on CPU: 4.54 -> ~3.8 over 16 steps)."""
    from transformers import Trainer

    model = tiny_gpt2()
    args = training_args(tmp_path, use_cpu=False, bf16=True, max_steps=16, learning_rate=5e-3, weight_decay=0.1,
                         lr_scheduler_type="constant")  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=8))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    opt = find_sgd_sai(trainer.optimizer)
    assert opt is not None
    assert all(p.device.type == "cuda" for group in opt.param_groups for p in group["params"])
    assert all(opt.has_scale(p) for group in opt.param_groups for p in group["params"])
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.1, losses


# ------------------------------------------------------------------------ benchmark


def test_bench_cuda_mode_smoke(tmp_path):
    script = TESTS.parent / "scripts" / "bench_optimizers.py"
    bench = load_module(script)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = bench.main(["--device", "cuda", "--sizes", "tiny", "--repeats", "2", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert rows and report["results"]
    for row in rows:
        assert math.isfinite(row["step_ms_median"]) and row["step_ms_median"] > 0, row
        if row["optimizer"] in ("sgdsai", "sgdsai-fused", "sgdsai-bf16m", "sgdsai-loop", "sgd-fused", "adamw-fused"):
            assert row["host_syncs"] == "pass", row
