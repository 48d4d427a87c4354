"""The native CPU loop of ``sai_hf.cpu_update`` (``sai_hf/csrc/sgd_sai_cpu.c``): bit for bit the Triton
kernel's float32 operations (``_triton_reference``) and the torch-ops rounding hash, the equations in
float64, chosen for decayed and bfloat16-buffer CPU blocks, and the slab path wherever it cannot run."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from _triton_reference import compare_with_loop_path, float32_expected, float64_expected, run_steps

from sai_hf import SGDSaI, cpu_update, native
from sai_hf.functional import sgd_sai
from sai_hf.rounding import rounding_seed as _seed, stochastic_round_to_bf16

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native CPU kernels here: {native.library().failure}")

# Sizes around the loop's edges: one element, a vector tail (not a multiple of 16), one thread's
# block (below the parallel threshold of 65536), several threads' with odd split points.
SHAPES = [(1,), (700, 1001), (65535,), (3, 65537)]


def update(params, grads, buffers, step_sizes, **kwargs):
    cpu_update.cpu_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)


@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_float32_blocks_are_the_triton_kernels_operations_bit_for_bit(buf_dtype, maximize):
    run_steps(update, SHAPES, buf_dtype=buf_dtype, maximize=maximize, decay=1 - 1e-3)


def test_momentum_zero_and_no_decay():
    run_steps(update, SHAPES[:2], momentum=0.0)
    run_steps(update, SHAPES[:2], decay=1.0)


def test_bf16_buffers_take_the_loop_paths_seeds():
    compare_with_loop_path(update, "cpu")


def test_float64_blocks_are_computed_in_float64():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(SHAPES[1], generator=gen, dtype=torch.float64)
    m = torch.empty_like(p)
    for step in range(3):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        before_p, before_m = p.clone(), m.clone()
        update([p], [g], [m], [-0.02], decay=0.999, momentum=0.9, first=[step == 0], maximize=False, seeds=[0])
        want_p, want_m = float64_expected(before_p, g, before_m, -0.02, 0.999, 0.9, step == 0, False)
        torch.testing.assert_close(p, want_p, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(m, want_m, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_the_torch_ops_bit_for_bit(buf_dtype, maximize):
    """Signed zeros, subnormals, the largest floats (whose rounding may carry to infinity), infinities
    and NaN in the gradient and the momentum: the same bits as the torch ops and the torch hash
    (NaN where they give NaN: its sign and payload follow operand order, not specified by either)."""
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"), 1.0, -2.5])
    g = specials.repeat_interleave(len(specials))
    m = specials.repeat(len(specials)).to(buf_dtype)
    p = torch.linspace(-3, 3, g.numel())
    seed = _seed(4, 2)
    want_p, m32 = float32_expected(p, g, m, -0.25, 0.99, 0.9, False, maximize)
    update([p], [g], [m], [-0.25], decay=0.99, momentum=0.9, first=[False], maximize=maximize, seeds=[seed])
    want_m = stochastic_round_to_bf16(m32, seed) if buf_dtype == torch.bfloat16 else m32
    for got, want in ((p, want_p), (m, want_m)):
        assert torch.equal(got.isnan(), want.isnan())
        bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits)[~got.isnan()], want.view(bits)[~want.isnan()])


def test_fragments_of_one_flat_tensor():
    """Fragments of one flat tensor (DeepSpeed ZeRO partitions, FSDP shards) at different offsets and
    sizes, scalars that change every step: each fragment's own update, the rest untouched."""
    flat_p, flat_g, flat_m = torch.randn(300_007), torch.randn(300_007), torch.zeros(300_007)
    cuts = [(0, 100_000), (100_003, 300_007)]
    for step in range(3):
        untouched = flat_p[100_000:100_003].clone()
        want = [float64_expected(flat_p[a:b].clone(), flat_g[a:b], flat_m[a:b].clone(), -0.01 * (step + 1), 0.99 - step / 100, 0.9, step == 0, False) for a, b in cuts]
        update(
            [flat_p[a:b] for a, b in cuts], [flat_g[a:b] for a, b in cuts], [flat_m[a:b] for a, b in cuts],
            [-0.01 * (step + 1)] * 2, decay=0.99 - step / 100, momentum=0.9, first=[step == 0] * 2, maximize=False,
            seeds=[0, 1],
        )  # fmt: skip
        for (a, b), (want_p, want_m) in zip(cuts, want):
            torch.testing.assert_close(flat_p[a:b].double(), want_p, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(flat_m[a:b].double(), want_m, rtol=1e-6, atol=1e-6)
        assert torch.equal(flat_p[100_000:100_003], untouched)


def test_tensors_without_memory_of_their_own_never_reach_the_loop():
    """FakeTensor (``torch.compile``'s tracing, ``torch._subclasses``) and wrapper subclasses have a
    null data pointer here: the optimizer must not hand them to C (it took the process down)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    with FakeTensorMode():
        p, g = torch.randn(1000), torch.randn(1000)
        assert not cpu_update.takes(p, g, torch.float32)
        sgd_sai([p], [g], [None], [1.0], lr=1e-2, momentum=0.9, weight_decay=0.1, maximize=False)
    a, b = torch.randn(1000), torch.randn(1000)
    assert not cpu_update.takes(TwoTensor(a, a.clone()), TwoTensor(b, b.clone()), torch.float32)
    with pytest.raises(ValueError, match="memory of its own"):
        update([TwoTensor(a, a.clone())], [TwoTensor(b, b.clone())], None, [-0.1], decay=0.9, momentum=0.0, first=[True], maximize=False, seeds=[0])
    from sai_hf import gradient_statistics

    assert gradient_statistics([TwoTensor(b, b.clone())]).shape == (1, 5)


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_update_bumps_autograd_version_counters(momentum_dtype, weight_decay):
    """A backward through a graph that saved the weights, after the step changed them in place,
    must raise (autograd's in-place check), as after any torch in-place op."""
    layer = torch.nn.Linear(64, 64)
    opt = SGDSaI(layer.parameters(), lr=1e-2, weight_decay=weight_decay, momentum_dtype=momentum_dtype)
    loss = layer(torch.randn(8, 64, requires_grad=True)).square().sum()  # saves the weight
    loss.backward(retain_graph=True)
    before = layer.weight._version
    opt.step()
    assert layer.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_contiguous_or_mismatched_tensors_are_refused():
    p, g, m = torch.zeros(8, 8), torch.zeros(8, 8), torch.zeros(8, 8)
    with pytest.raises(ValueError, match="contiguous"):
        update([p.t()], [g], [m], [-0.1], decay=1.0, momentum=0.9, first=[True], maximize=False, seeds=[0])
    with pytest.raises(ValueError, match=r"shapes \(8, 8\), \(64,\)"):
        update([p], [g.view(-1)], [m], [-0.1], decay=1.0, momentum=0.9, first=[True], maximize=False, seeds=[0])


def test_optimizer_sends_decayed_cpu_blocks_to_the_loop(monkeypatch):
    """``SGDSaI`` with weight decay: the decayed blocks (large and small) go through the native loop,
    the undecayed one through torch's fused kernel; all match the for-loop path."""
    calls = []
    real = cpu_update.cpu_sgd_sai_
    gen = torch.Generator().manual_seed(0)
    shapes = [(512, 1024), (64,), (600, 500)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for path in (dict(), dict(foreach=False)):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        groups = [dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], weight_decay=0.0)]
        opt = SGDSaI(groups, lr=1e-3, **path)
        with monkeypatch.context() as patch:
            patch.setattr(cpu_update, "cpu_sgd_sai_", lambda ps, *a, **k: calls.append([p.numel() for p in ps]) or real(ps, *a, **k))
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
        results.append(params)
    assert calls == [[512 * 1024, 64]] * 3
    for a, b in zip(*results):  # steps of ~0.7 (lr 1e-3 x g-SNR ~ sqrt(numel)): a few float32 ulps apart
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _slab_path_result(monkeypatch, kernels: native.NativeLibrary, match: str | None):
    """Three bf16-momentum steps with ``kernels`` in place of the process's loop: the warning
    (``match``, once), the slab path taken, and the result equal to the for-loop path."""
    monkeypatch.setattr(native, "library", lambda: kernels)
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(70_000, generator=gen)
    grads = [torch.randn(p.shape, generator=gen) for _ in range(3)]
    got_p, got_m, want_p, want_m = p.clone(), [None], p.clone(), [None]
    kwargs = dict(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=False, momentum_dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_update, "cpu_sgd_sai_", lambda *a, **k: pytest.fail("the native loop ran"))
    with pytest.warns(RuntimeWarning, match=match) if match else warnings.catch_warnings():
        kernels.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at the build
        for step, g in enumerate(grads):
            sgd_sai([got_p], [g], got_m, [2.0], **kwargs, steps=[step])
    for step, g in enumerate(grads):
        sgd_sai([want_p], [g], want_m, [2.0], **kwargs, foreach=False, steps=[step])
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)  # lerp vs mu m + (1 - mu) g roundings
    torch.testing.assert_close(got_m[0].float(), want_m[0].float(), rtol=0, atol=0.05)


def test_no_compiler_warns_once_and_keeps_the_slab_path(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    kernels = native.NativeLibrary()
    _slab_path_result(monkeypatch, kernels, r"native CPU kernels are not available here \(OSError: no C compiler: set CC")
    assert not kernels.usable()


def test_a_failing_compiler_is_named(monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: out of memory' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native, "_is_gcc", lambda compiler: True)
    kernels = native.NativeLibrary()
    _slab_path_result(monkeypatch, kernels, r"\(OSError: cc failed: cc: fatal error: out of memory\)")


def test_a_single_threaded_build_runs_only_when_torch_does(monkeypatch):
    """Where the loop cannot share torch's thread pool it is built without OpenMP: usable with
    ``torch.set_num_threads(1)``, not with more threads (torch's own kernels would be faster)."""
    monkeypatch.setattr(native, "_torch_threads_are_libgomp", lambda: False)
    kernels = native.NativeLibrary()
    kernels.build()
    assert not kernels.threaded and kernels.failure is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.usable()
        monkeypatch.setattr(native, "library", lambda: kernels)
        run_steps(update, SHAPES, buf_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert kernels.usable() == (threads == 1)


def test_disabled_by_the_environment_variable():
    code = "from sai_hf import cpu_update, native; import torch; print(native.available(), cpu_update.takes(torch.zeros(4), torch.zeros(4), torch.bfloat16))"
    env = {"SAI_HF_CPU_KERNEL": "0", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


def test_construction_under_warnings_as_errors_builds():
    native.library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SGDSaI([torch.nn.Parameter(torch.zeros(10))], lr=1e-3, weight_decay=0.1)
    assert native.available(), native.library().failure
