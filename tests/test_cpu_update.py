"""The compiled CPU loops of ``sai_hf.cpu_update``: bit for bit the Triton kernel's float32 operations
(``_triton_reference``), the slab path's equations, chosen for large decayed CPU blocks, compiled once."""

from __future__ import annotations

import warnings

import pytest
import torch
from _triton_reference import compare_with_loop_path, float64_expected, run_steps

from sai_hf import SGDSaI, cpu_update
from sai_hf.functional import sgd_sai

pytestmark = pytest.mark.skipif(
    not cpu_update.compiled_update_available(), reason="torch.compile does not work on this machine"
)

# Sizes around the loops' edges: the smallest block they take, a vector tail (not a multiple of 16),
# and more than one bfloat16 slab with a short last slab.
SHAPES = [(cpu_update.MIN_NUMEL,), (700, 1001), (cpu_update.SLAB + 12345,)]


def update(params, grads, buffers, step_sizes, **kwargs):
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cpu_update.cpu_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)
    assert cpu_update.compiled_update_available(), cpu_update._loops().failure
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


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


def test_views_with_storage_offsets_compile_once():
    """Fragments of one flat tensor (DeepSpeed ZeRO partitions, FSDP shards) at different offsets and
    sizes, scalars that change every step: no new compilation after :func:`cpu_update.prepare`."""
    cpu_update.prepare({(torch.float32, torch.float32)})
    flat_p, flat_g, flat_m = torch.randn(3 * cpu_update.MIN_NUMEL + 7), torch.randn(3 * cpu_update.MIN_NUMEL + 7), torch.zeros(3 * cpu_update.MIN_NUMEL + 7)
    cuts = [(0, cpu_update.MIN_NUMEL), (cpu_update.MIN_NUMEL + 3, 3 * cpu_update.MIN_NUMEL + 7)]
    new_graphs = 0
    for step in range(3):
        want = [float64_expected(flat_p[a:b].clone(), flat_g[a:b], flat_m[a:b].clone(), -0.01 * (step + 1), 0.99 - step / 100, 0.9, step == 0, False) for a, b in cuts]
        new_graphs += update(
            [flat_p[a:b] for a, b in cuts], [flat_g[a:b] for a, b in cuts], [flat_m[a:b] for a, b in cuts],
            [-0.01 * (step + 1)] * 2, decay=0.99 - step / 100, momentum=0.9, first=[step == 0] * 2, maximize=False,
            seeds=[0, 1],
        )  # fmt: skip
        for (a, b), (want_p, want_m) in zip(cuts, want):
            torch.testing.assert_close(flat_p[a:b].double(), want_p, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(flat_m[a:b].double(), want_m, rtol=1e-6, atol=1e-6)
    assert new_graphs == 0


def test_optimizer_sends_large_decayed_cpu_blocks_to_the_loops(monkeypatch):
    """``SGDSaI`` with weight decay: the large block goes through the compiled loop, the small one and
    the undecayed large one through torch's fused kernel; all match the for-loop path."""
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
        opt = SGDSaI(groups, lr=1e-3, **path)  # compiles the loops the large decayed block will run
        with monkeypatch.context() as patch:
            patch.setattr(cpu_update, "cpu_sgd_sai_", lambda ps, *a, **k: calls.append([p.numel() for p in ps]) or real(ps, *a, **k))
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
        results.append(params)
    assert calls == [[512 * 1024]] * 3
    for a, b in zip(*results):  # steps of ~0.7 (lr 1e-3 x g-SNR ~ sqrt(numel)): a few float32 ulps apart
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class FailingLoops(cpu_update.CompiledLoops):
    """Loops whose compilation fails from the ``after``-th call on (as a recompile refused mid-block)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.calls = 0
        compiled = dict(self._compiled)

        def failing(name):
            def call(*args):
                self.calls += 1
                if self.calls > after:
                    raise OSError("no C++ compiler")
                return compiled[name](*args)

            return call

        self._compiled = {name: failing(name) for name in compiled}


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_failed_compilation_completes_the_block_warns_once_and_falls_back(monkeypatch, after):
    """A compilation that fails at the first call or in the middle of a multi-slab bfloat16 block
    (``after`` successful calls first): the block is updated once (the failing call runs eagerly),
    one warning names the cause, later steps take the slab path; all equal the for-loop path."""
    loops = FailingLoops(after)
    monkeypatch.setattr(cpu_update, "_loops", lambda: loops)
    gen = torch.Generator().manual_seed(2)
    shape = (2 * cpu_update.SLAB + 5,)
    p = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    got_p, got_m, want_p, want_m = p.clone(), [None], p.clone(), [None]
    kwargs = dict(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=False, momentum_dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"compiled CPU update is not available here \(OSError: no C\+\+ compiler\)"):
        sgd_sai([got_p], [grads[0]], got_m, [2.0], **kwargs, steps=[0])
    assert loops.failure == "OSError: no C++ compiler" and not cpu_update.compiled_update_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        for step, g in enumerate(grads[1:], start=1):
            sgd_sai([got_p], [g], got_m, [2.0], **kwargs, steps=[step])
    for step, g in enumerate(grads):
        sgd_sai([want_p], [g], want_m, [2.0], **kwargs, foreach=False, steps=[step])
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)  # lerp vs mu m + (1 - mu) g roundings
    torch.testing.assert_close(got_m[0].float(), want_m[0].float(), rtol=0, atol=0.05)


def test_construction_under_warnings_as_errors_compiles():
    """torch's compiler warns while compiling (a DeprecationWarning in torch 2.13): under
    ``-W error`` that must not fail the optimizer's construction or switch the loops off."""
    torch._dynamo.reset()  # compile again, from inductor's cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SGDSaI([torch.nn.Parameter(torch.zeros(SHAPES[0]))], lr=1e-3, weight_decay=0.1)
    assert cpu_update.compiled_update_available(), cpu_update._loops().failure


def test_eager_stances_keep_the_slab_path():
    with torch.compiler.set_stance("force_eager"):
        assert not cpu_update.compiled_update_available()
    assert cpu_update.compiled_update_available()


def test_last_bf16_slab_is_never_one_element():
    assert list(cpu_update._slabs(2 * cpu_update.SLAB + 1)) == [(0, cpu_update.SLAB), (cpu_update.SLAB, 2 * cpu_update.SLAB + 1)]
    assert list(cpu_update._slabs(cpu_update.SLAB + 2))[-1] == (cpu_update.SLAB, cpu_update.SLAB + 2)


def test_dynamo_disabled_keeps_the_slab_path():
    with torch._dynamo.config.patch(disable=True):  # what TORCH_COMPILE_DISABLE=1 sets
        assert not cpu_update.compiled_update_available()
        assert not cpu_update.takes(torch.zeros(SHAPES[0]), torch.float32, torch.float32)
    assert cpu_update.compiled_update_available()
