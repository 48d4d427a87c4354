"""``sai_hf.triton_statistics`` (the first step's g-SNR sums of many CUDA gradients in one launch) on CPU,
through Triton's interpreter, against float64 sums; and the kernel compiled ahead of time for sm_90."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton; Linux x86_64 wheels only)")

from sai_hf import gradient_statistics, gsnr_from_statistics, native, triton_statistics, triton_update  # noqa: E402


def float64_sums(g: torch.Tensor) -> tuple[float, float]:
    x = g.double().reshape(-1)
    return x.sum().item(), (x - x.mean()).square().sum().item()


def gradients() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(5000, generator=gen)
    return [
        torch.randn(3000, generator=gen) * 1e-3,  # three tiles, the last one short
        torch.randn(1, generator=gen),  # one entry
        torch.full((2048,), 0.1),  # constant: C must be exactly 0
        torch.randn(4096, generator=gen) * 1e-5 + 1.0,  # the mean dominates the spread 1e5 times
        (torch.arange(4096) // 1024).float() * 100 + torch.randn(4096, generator=gen),  # per-tile means
        torch.randn(1500, generator=gen).to(torch.bfloat16),
        (torch.randn(1100, generator=gen) + 5).to(torch.float16),
        flat[1:2501],  # not 16-byte aligned: its own launch
        torch.randn(7, 300, generator=gen) * 1e20,  # float32 squares would overflow
    ]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_sums_match_float64_in_the_callers_order(interpret):
    grads = gradients()
    assert all(triton_statistics.takes(g) for g in grads)
    counts, sums = triton_statistics.triton_sums(grads)
    assert sums.shape == (len(grads), 2) and sums.dtype == torch.float64
    assert counts.tolist() == [float(g.numel()) for g in grads]
    for g, (total, centred) in zip(grads, sums.tolist()):
        want_total, want_centred = float64_sums(g)
        assert total == pytest.approx(want_total, rel=1e-12, abs=1e-12 * g.double().abs().sum().item())
        assert centred == pytest.approx(want_centred, rel=1e-10, abs=0.0)
    assert sums[2, 1].item() == 0.0


def test_gradient_statistics_dispatch_to_the_kernel(interpret, monkeypatch):
    """With the native CPU kernel out of the way, ``gradient_statistics`` sends the gradients it can to
    the Triton kernel (and the rest, here an empty and a strided one, one by one): the same g-SNR
    and status as the per-tensor float64 path."""
    monkeypatch.setattr(native, "library", native.NativeLibrary)  # never built: not available
    grads = gradients() + [torch.zeros(0), torch.randn(40, 30)[:, ::3]]
    calls = []
    real = triton_statistics.triton_sums
    monkeypatch.setattr(triton_statistics, "triton_sums", lambda gs: calls.append(len(gs)) or real(gs))
    gsnr, status = gsnr_from_statistics(gradient_statistics(grads), eps=1e-8)
    monkeypatch.delenv("TRITON_INTERPRET")
    want_gsnr, want_status = gsnr_from_statistics(gradient_statistics(grads), eps=1e-8)
    assert calls == [len(grads) - 2]
    assert torch.equal(status, want_status)
    torch.testing.assert_close(gsnr, want_gsnr, rtol=1e-6, atol=0)


def test_refuses_what_it_cannot_reduce(interpret):
    for bad in ([torch.zeros(0)], [torch.zeros(4, 4).t()], [torch.zeros(4, dtype=torch.float64)], []):
        with pytest.raises(ValueError, match="triton_sums"):
            triton_statistics.triton_sums(bad)


def test_compiles_for_sm90(monkeypatch: pytest.MonkeyPatch):
    """Ahead-of-time compilation to PTX (no GPU needed): the float64 reductions are valid Triton for a
    real GPU target, not only in the interpreter."""
    try:
        from triton import compile as triton_compile
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - triton internals moved
        pytest.skip(f"triton's ahead-of-time API is not where expected: {exc}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = importlib.import_module("sai_hf._triton_kernels")
    constants = dict(KIND=2, ALIGNED=True, BLOCK=triton_update.BLOCK)
    signature = {"table": "*i64", "n_tensors": "i32", "search_steps": "i32", "out": "*fp64"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=kernels.tile_statistics_kernel, signature=signature, constexprs=constants)
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=triton_update.NUM_WARPS, enable_fp_fusion=False))
    ptx = compiled.asm["ptx"]
    assert "add.f64" in ptx or "add.rn.f64" in ptx, ptx[-2000:]


def test_gradients_on_several_devices_reduce_per_device_under_its_guard(monkeypatch: pytest.MonkeyPatch):
    """Gradients of one model on several devices (naive model parallelism; the CPU and the meta
    device stand for two GPUs): one ``triton_sums`` call per device, its launches under that
    device's guard."""
    from sai_hf import gsnr

    kernels = importlib.import_module("sai_hf._triton_kernels")
    current, launches = [None], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            self.saved, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.saved

    class Kernel:
        def __getitem__(self, grid):
            return lambda table, count, steps, out, **kwargs: launches.append((current[0], out.device, count))

    fake = type("Kernels", (), dict(N_TILE_COLUMNS=kernels.N_TILE_COLUMNS, tile_statistics_kernel=Kernel()))
    monkeypatch.setattr(native, "library", native.NativeLibrary)  # never built: the CPU gradients go to Triton too
    monkeypatch.setattr(triton_statistics, "kernel_module", lambda: fake)
    monkeypatch.setattr(triton_statistics, "device_guard", Guard)
    monkeypatch.setattr(triton_statistics, "triton_available", lambda device: True)
    calls = []
    real = triton_statistics.triton_sums
    monkeypatch.setattr(triton_statistics, "triton_sums", lambda gs: calls.append({g.device for g in gs}) or real(gs))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    grads = [torch.zeros(3000, device=d) for d in (cpu, meta, meta, cpu, meta)]
    rows = gsnr._batched_statistics(grads)
    assert sorted(rows) == list(range(5)) and all(rows[i].device == g.device for i, g in enumerate(grads))
    assert sorted(map(str, calls)) == [str({cpu}), str({meta})]
    assert sorted(launches, key=str) == sorted([(cpu, cpu, 2), (meta, meta, 3)], key=str)
