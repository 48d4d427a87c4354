"""State dtype rules: bf16 momentum (stochastic rounding), bf16/fp16 parameters, torch.compile."""

from __future__ import annotations

import pytest
import torch
from _models import lm_step, tiny_gpt2, token_batches

from sai_hf import SGDSaI
from sai_hf.functional import stochastic_round_to_bf16


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((200_000,), 1.0 + 2**-10)  # halfway-ish between two bf16 neighbours
    rounded = stochastic_round_to_bf16(x, seed=7)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0078125}
    assert rounded.float().mean().item() == pytest.approx(1.0 + 2**-10, rel=1e-4)
    assert torch.equal(rounded, stochastic_round_to_bf16(x, seed=7))
    assert not torch.equal(rounded, stochastic_round_to_bf16(x, seed=8))
    exact = torch.tensor([1.5, -2.25, 0.0])
    assert torch.equal(stochastic_round_to_bf16(exact, seed=1).float(), exact)


def test_stochastic_rounding_is_unbiased_per_element_over_seeds():
    x = torch.tensor([1.0 + 2**-9, -3.0 - 2**-8, 1e-3 + 1e-6, 7.0])
    draws = torch.stack([stochastic_round_to_bf16(x, seed=s).double() for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), x.double(), rtol=2e-4, atol=0)
    below = x.to(torch.bfloat16).double()  # every draw is one of the two bf16 neighbours
    assert ((draws - x.double()).abs() <= 2 * (below - x.double()).abs().clamp_min(1e-30) + 0.04).all()


def test_slabbed_bf16_momentum_update_equals_whole_tensor_formula(monkeypatch):
    from sai_hf import functional, rounding

    torch.manual_seed(0)
    p, g = torch.randn(10, 250), torch.randn(10, 250)
    buf = torch.randn(10, 250).to(torch.bfloat16)
    value = buf.float() * torch.tensor(0.9) + g * torch.tensor(1 - 0.9)  # float32 ops, each rounded
    want_buf, want_p = stochastic_round_to_bf16(value, seed=11), p.clone().add_(value, alpha=-0.01)
    monkeypatch.setattr(rounding, "SLAB", 300)  # 2500 elements: 8 full slabs and a partial one
    assert torch.equal(stochastic_round_to_bf16(value, seed=11), want_buf)
    functional._bf16_momentum_update(p, g, buf, 0.9, -0.01, 1.0, False, seed=11)
    assert torch.equal(buf, want_buf)
    assert torch.equal(p, want_p)


def test_slabbed_bf16_momentum_update_with_decay_and_first_step(monkeypatch):
    from sai_hf import functional, rounding

    torch.manual_seed(0)
    p, g = torch.randn(10, 250), torch.randn(10, 250)
    buf = torch.empty(10, 250, dtype=torch.bfloat16)
    want_buf, want_p = stochastic_round_to_bf16(g, seed=5), p.clone().mul_(0.99).add_(g, alpha=-0.01)
    monkeypatch.setattr(rounding, "SLAB", 300)
    functional._bf16_momentum_update(p, g, buf, 0.9, -0.01, 0.99, True, seed=5)
    assert torch.equal(buf, want_buf)
    torch.testing.assert_close(p, want_p, rtol=0, atol=1e-7)


def test_momentum_state_bytes_fp32_and_bf16():
    model = tiny_gpt2()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_gpt2()
        opt = SGDSaI(model.parameters(), lr=1e-3, momentum_dtype=dtype)
        lm_step(model, token_batches(1)[0], opt)
        sizes[dtype] = _state_bytes(opt)
    assert sizes[None] == param_bytes
    assert sizes[torch.bfloat16] == param_bytes // 2


def _train_losses(steps: int, **kwargs) -> tuple[list[float], SGDSaI]:
    model = tiny_gpt2()
    opt = SGDSaI(model.parameters(), lr=2e-3, **kwargs)
    batches = token_batches(8, seed=3)
    return [lm_step(model, batches[i % len(batches)], opt) for i in range(steps)], opt


def test_bf16_momentum_keeps_training_quality():
    fp32, _ = _train_losses(32)
    bf16, opt = _train_losses(32, momentum_dtype=torch.bfloat16)
    assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in opt.state.values())
    start, fp32_end, bf16_end = fp32[0], sum(fp32[-8:]) / 8, sum(bf16[-8:]) / 8
    assert fp32_end < start - 0.1
    assert start - bf16_end >= 0.9 * (start - fp32_end), "bf16 momentum must keep the fp32 progress"


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(foreach=False, fused=False)], ids=["default", "multi", "loop"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(param_dtype, path):
    model = tiny_gpt2().to(param_dtype)
    opt = SGDSaI(model.parameters(), lr=2e-2, **path)  # pure low-precision weights need larger steps
    batches = token_batches(4, seed=3)
    losses = [lm_step(model, batches[i % 4], opt) for i in range(12)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].dtype == param_dtype  # rule: buffers follow the parameter


@pytest.mark.slow
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16], ids=["fp32-momentum", "bf16-momentum"])
def test_compiled_step_matches_eager(momentum_dtype):
    """``torch.compile(optimizer.step)`` (inductor): first step (scales) and later steps match eager."""
    torch.manual_seed(0)
    base = [torch.randn(16, 8), torch.randn(8), torch.randn(1)]
    grads = [[torch.randn_like(t) for t in base] for _ in range(3)]
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
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_updates_every_element_of_cpu_half_precision(dtype):
    # torch's CPU fused SGD skips the vectorised part of half-precision tensors: such blocks must
    # take the multi-tensor path, and match the for-loop reference exactly.
    torch.manual_seed(0)
    base, other = torch.randn(4096).to(dtype), torch.randn(8, 8)
    grads = [(torch.randn(4096).to(dtype), torch.randn(8, 8)) for _ in range(3)]
    results = []
    for path in (dict(fused=True), dict(foreach=True)):
        params = [base.clone().requires_grad_(), other.clone().requires_grad_()]
        opt = SGDSaI(params, lr=0.1, weight_decay=0.1, **path)
        for g0, g1 in grads:
            params[0].grad, params[1].grad = g0.clone(), g1.clone()
            opt.step()
        results.append([p.detach() for p in params])
    (fused_half, fused_fp32), (multi_half, multi_fp32) = results
    assert (fused_half != base).float().mean() > 0.9  # every element moves, not only the first 16
    assert torch.equal(fused_half, multi_half)
    torch.testing.assert_close(fused_fp32, multi_fp32, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- found attacking the optimizer
def test_bf16_momentum_of_float64_parameters_is_stochastically_rounded():
    # Round-to-nearest would lose every (1 - mu) * 0.003 increment on a bf16 buffer around 1.0.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    opt = SGDSaI([p], lr=1e-6, momentum=0.9, momentum_dtype=torch.bfloat16)
    p.grad = torch.randn(4096, dtype=torch.float64) * 0.01 + 1.0
    opt.step()
    for _ in range(100):
        p.grad = torch.full((4096,), 1.003, dtype=torch.float64)
        opt.step()
    # 0.9^100 of the start is left; bf16 spacing near 1 is 0.0078, the mean of 4096 dithers ~1e-4.
    assert opt.state[p]["momentum_buffer"].double().mean().item() == pytest.approx(1.003, abs=3e-4)
