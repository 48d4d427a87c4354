"""The first step's gradient statistics (``sai_hf.gradient_statistics`` -> ``gsnr_from_statistics``) on
CPU: against torch's std/norm and a float64 two-pass definition, on both CPU row paths (the native
kernel and torch ops), summed over shards, and what a block with a zero gradient costs."""

from __future__ import annotations

import pytest
import torch

from sai_hf import SGDSaI, gradient_statistics, gsnr_from_statistics, native
from sai_hf.gsnr import BlockStatus
def test_gsnr_matches_torch_std_and_norm():
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(300) * 1e-3 + 2e-4, torch.randn(2, 3, 4)]
    gsnr, status = gsnr_from_statistics(gradient_statistics(grads), eps=1e-8)
    for g, value in zip(grads, gsnr.tolist()):
        assert value == pytest.approx((g.norm() / (g.std() + 1e-8)).item(), rel=1e-5)
    assert status.tolist() == [BlockStatus.SCALED] * 3

@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["zero-mean", "mean-dominated"])
def test_statistics_of_shards_sum_to_whole_tensor(offset):
    torch.manual_seed(0)
    g = torch.randn(10, 6, dtype=torch.float64) + offset
    whole = gsnr_from_statistics(gradient_statistics([g]), eps=1e-8)
    shards = gsnr_from_statistics(gradient_statistics(list(g.chunk(3, dim=0))).sum(0, keepdim=True), eps=1e-8)
    assert shards[1].tolist() == whole[1].tolist() == [BlockStatus.SCALED]
    assert shards[0].item() == pytest.approx(whole[0].item(), rel=1e-12)

def _float64_gsnr(g: torch.Tensor) -> tuple[float, int]:
    """g-SNR of ``g`` in float64 by definition (two-pass: mean, then centred squares), the slow
    exact reference, with the status rule: one element or std <= 1e-6 rms is DEGENERATE."""
    g = g.to(torch.complex128 if g.is_complex() else torch.float64).reshape(-1)
    std = (g - g.mean()).abs().square().sum().div(g.numel() - 1).sqrt().item()
    norm = g.abs().square().sum().sqrt().item()
    if std <= 1e-6 * norm / g.numel() ** 0.5:
        return 0.0, int(BlockStatus.DEGENERATE)
    return norm / (std + 1e-8), int(BlockStatus.SCALED)

@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(70_000) * 1e-3,  # zero mean: the float32-row fast path
        lambda: (torch.randn(70_000) + 3.0) * 1e-3,  # mean 3 std: still the fast path
        lambda: (torch.randn(70_000) + 300.0) * 1e-3,  # mean dominates: recomputed in float64
        lambda: torch.full((70_000,), 3e-4),  # constant: zero variance must survive (DEGENERATE)
        lambda: torch.full((1 << 20,), 0.1),  # constant over a million entries (float64 sums err by 1e-12)
        lambda: torch.full((3 << 20,) , 3.7, dtype=torch.bfloat16),
        lambda: torch.randn(1 << 20) * 1e-5 + 1.0,  # std 1e-5 of the mean: 10x above the threshold
        lambda: (torch.arange(768_000) // 768).float() * 100 + torch.randn(768_000),  # per-row means
        lambda: torch.randn(70_000) * 1e20,  # float32 squares overflow
        lambda: torch.randn(70_000) * 1e-21,  # float32 squares underflow
        lambda: torch.randn(50_001, dtype=torch.bfloat16),  # not a multiple of the row length
        lambda: (torch.randn(40_000) + 5.0).to(torch.float16),
        lambda: torch.randn(20_000, dtype=torch.complex64),
        lambda: torch.randn(300, 300)[:, ::2],  # non-contiguous
    ],
    ids=["zero-mean", "mean-3std", "mean-300std", "constant", "constant-1M", "constant-3M-bf16", "std-1e-5", "row-means", "huge", "tiny", "bf16", "fp16", "complex", "strided"],
)
@pytest.mark.parametrize("kernels", ["native", "torch-ops"])
def test_cpu_statistics_of_large_tensors_match_float64(make, kernels, monkeypatch):
    """Both CPU row paths: the native kernel's float64 rows (float32 gradients; to 1e-10) and the
    float32 torch-ops rows with their float64 fallback (to 1e-6)."""
    if kernels == "torch-ops":
        monkeypatch.setattr(native, "library", native.NativeLibrary)  # never built: not available
    elif not native.available():
        pytest.skip(f"no native CPU kernels here: {native.library().failure}")
    torch.manual_seed(0)
    g = make()
    gsnr, status = gsnr_from_statistics(gradient_statistics([g]), eps=1e-8)
    want_gsnr, want_status = _float64_gsnr(g)
    assert int(status.item()) == want_status
    exact = kernels == "native" and g.dtype == torch.float32 and g.is_contiguous()
    assert gsnr.item() == pytest.approx(want_gsnr, rel=1e-10 if exact else 1e-6)


# --------------------------------------------------------------------------- found attacking the optimizer
def test_zero_gradient_block_costs_one_fast_pass_per_step(monkeypatch):
    from sai_hf import gsnr

    calls, shifted = [], gsnr._shifted_statistics
    monkeypatch.setattr(gsnr, "_shifted_statistics", lambda g, dtype: calls.append(g.numel()) or shifted(g, dtype))
    used, unused = torch.nn.Parameter(torch.randn(300, 300)), torch.nn.Parameter(torch.zeros(2000, 1000))
    opt = SGDSaI([used, unused], lr=1e-3)
    for _ in range(3):
        used.grad, unused.grad = torch.randn(300, 300) + 0.0, torch.zeros(2000, 1000)
        opt.step()
    assert 2_000_000 not in calls  # never the float64 recomputation
    assert opt.has_scale(used) and not opt.has_scale(unused)
