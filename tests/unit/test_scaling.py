"""Scales from the first usable gradient: undefined g-SNR (one element, zero variance, an unusable
first gradient: deferred), late blocks and their divisor, degenerate blocks at scale, and
``scale_rule="sqrt_numel"``."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

from sai_hf import SGDSaI, gradient_statistics, gsnr_from_statistics


# --------------------------------------------------------------------------- undefined g-SNR
def test_one_element_parameter_stays_finite_and_gets_largest_scale():
    torch.manual_seed(0)
    w = torch.randn(16, 16, requires_grad=True)
    temperature = torch.ones(1, requires_grad=True)
    opt = SGDSaI([w, temperature], lr=0.1)
    with pytest.warns(UserWarning, match="no usable"):
        for _ in range(5):
            w.grad = torch.randn(16, 16)
            temperature.grad = torch.tensor([3.0])
            opt.step()
    assert torch.isfinite(temperature).all()
    assert opt.state[temperature]["scale"] == opt.state[w]["scale"] == opt.gsnr_max
    assert opt.state[temperature]["scale"] < 100  # not |g| / eps ~ 3e8

def test_zero_variance_gradient_is_degenerate_not_huge():
    p = torch.zeros(10, requires_grad=True)
    q = torch.zeros(4, 4, requires_grad=True)
    opt = SGDSaI([p, q], lr=0.1, normalize="max")
    p.grad = torch.full((10,), 0.7)
    q.grad = torch.arange(16.0).reshape(4, 4)
    with pytest.warns(UserWarning):
        opt.step()
    assert opt.state[p]["scale"] == 1.0
    assert torch.isfinite(p).all() and p.abs().max() < 1.0

@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_unusable_first_gradient_defers_the_block(bad):
    torch.manual_seed(0)
    w = torch.randn(4, 4, requires_grad=True)
    v = torch.randn(8, requires_grad=True)
    opt = SGDSaI([w, v], lr=0.1, weight_decay=0.5)
    v_start = v.detach().clone()
    w.grad = torch.randn(4, 4)
    v.grad = torch.full((8,), bad) if bad == 0.0 else torch.randn(8).index_fill_(0, torch.tensor([3]), bad)
    opt.step()
    assert torch.equal(v, v_start), "a deferred block is not updated (no weight decay either)"
    assert not opt.has_scale(v) and opt.has_scale(w)
    assert opt.pending_params() == [v]
    v.grad = torch.randn(8)
    w.grad = torch.randn(4, 4)
    opt.step()
    assert opt.has_scale(v) and torch.isfinite(v).all() and not torch.equal(v, v_start)
    assert math.isfinite(opt.state[v]["scale"])

def test_deferred_block_drops_eps():
    """A tiny first gradient (LoRA A at step 2) gets the scale-free g-SNR, not one dominated by eps."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    opt = SGDSaI([w, a], lr=0.1)
    w.grad, a.grad = torch.randn(8, 8), torch.zeros(4, 64)
    opt.step()
    tiny = torch.randn(4, 64) * 1e-9
    w.grad, a.grad = torch.randn(8, 8), tiny
    opt.step()
    expected = (tiny.double().norm() / tiny.double().std()).item()
    assert opt.state[a]["gsnr"] == pytest.approx(expected, rel=1e-6)
    assert 12 < opt.state[a]["gsnr"] < 20  # ~sqrt(256); with eps it would be ~2

def test_late_blocks_share_the_first_steps_divisor():
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    late = torch.randn(32, 32, requires_grad=True)
    opt = SGDSaI([w, late], lr=0.1, normalize="max")
    w.grad, late.grad = torch.randn(8, 8), None
    opt.step()
    divisor = opt.gsnr_max
    assert opt.state[w]["scale"] == 1.0
    w.grad, late.grad = torch.randn(8, 8), torch.randn(32, 32)
    opt.step()
    assert opt.gsnr_max == divisor
    assert opt.state[late]["scale"] == pytest.approx(opt.state[late]["gsnr"] / divisor)
    assert opt.state[late]["scale"] > 1.0  # a larger block than any scaled at step 1


# --------------------------------------------------------------------------- degenerate at scale (found attacking the optimizer)
@pytest.mark.parametrize("numel", [1 << 20, (3 << 20) + 5])
def test_constant_gradient_on_a_million_entries_does_not_explode(numel):
    w = torch.zeros(numel, requires_grad=True)
    other = torch.randn(64, 64, requires_grad=True)
    opt = SGDSaI([w, other], lr=1e-3)
    w.grad, other.grad = torch.full((numel,), 0.1), torch.randn(64, 64)
    with pytest.warns(UserWarning, match="no usable variance"):
        opt.step()
    assert opt.state[w]["scale"] == pytest.approx(opt.state[other]["scale"])  # the largest well-defined g-SNR
    assert w.abs().max().item() < 1.0  # was ~1e5 with a scale of ~5e8


# --------------------------------------------------------------------------- scale_rule="sqrt_numel"
@pytest.mark.parametrize("normalize", ["none", "max"])
def test_sqrt_numel_rule_scales_by_block_size_and_keeps_the_measured_gsnr(normalize):
    """The authors' later rule: sqrt(numel) in place of the g-SNR (divided by the largest sqrt(numel)
    of the first scaling step under normalize="max"); the g-SNR is still measured and stored; a
    constant-gradient block is no special case (no fallback, no warning)."""
    torch.manual_seed(0)
    shapes = [(64, 32), (17,), (1,), (8, 8)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    grads[3] = torch.full((8, 8), 0.25)  # zero variance: degenerate under the g-SNR rule
    opt = SGDSaI(params, lr=0.1, momentum=0.0, normalize=normalize, scale_rule="sqrt_numel")
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    top = max(math.sqrt(p.numel()) for p in params)
    for p, g, p0 in zip(params, grads, before):
        state = opt.state[p]
        expected = math.sqrt(p.numel()) / (top if normalize == "max" else 1.0)
        assert state["scale"] == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(p.detach(), p0 - 0.1 * expected * g)
    assert opt.gsnr_max == pytest.approx(top if normalize == "max" else top)
    stats = gradient_statistics([grads[0]])
    measured, _ = gsnr_from_statistics(stats, 1e-8)
    assert opt.state[params[0]]["gsnr"] == pytest.approx(float(measured[0]), rel=1e-12)
    assert opt.state[params[3]]["gsnr"] == 0.0  # measured: no usable variance

def test_sqrt_numel_rule_still_defers_blocks_without_a_gradient():
    """Deferred blocks (LoRA's lora_A: zero first gradient) stay untouched until their first usable
    gradient, then get sqrt(numel) like the others."""
    a, b = torch.ones(4, 8, requires_grad=True), torch.ones(16, requires_grad=True)
    opt = SGDSaI([a, b], lr=0.1, weight_decay=0.1, scale_rule="sqrt_numel")
    a.grad, b.grad = torch.zeros(4, 8), torch.randn(16)
    opt.step()
    assert "scale" not in opt.state[a] and torch.equal(a.detach(), torch.ones(4, 8))
    a.grad = torch.randn(4, 8)
    opt.step()
    assert opt.state[a]["scale"] == pytest.approx(math.sqrt(32))

def test_scale_rule_is_checked_and_shared_by_every_group():
    with pytest.raises(ValueError, match="scale_rule='numel'"):
        SGDSaI([torch.zeros(2, requires_grad=True)], scale_rule="numel")
    with pytest.raises(ValueError, match="scale_rule"):
        SGDSaI(
            [{"params": [torch.zeros(2, requires_grad=True)]},
             {"params": [torch.zeros(2, requires_grad=True)], "scale_rule": "sqrt_numel"}]
        )  # fmt: skip
    opt = SGDSaI([torch.zeros(2, requires_grad=True)], scale_rule="sqrt_numel")
    state = opt.state_dict()
    del state["param_groups"][0]["scale_rule"]  # a checkpoint of an earlier version
    fresh = SGDSaI([torch.zeros(2, requires_grad=True)])
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["scale_rule"] == "gsnr"


def _line_of(source: str) -> int:
    """The line of this file holding ``source`` (once)."""
    import inspect

    lines = inspect.getsource(sys.modules[__name__]).splitlines()
    found = [i + 1 for i, line in enumerate(lines) if line.strip() == source]
    assert len(found) == 1, (source, found)
    return found[0]


def test_degenerate_warning_points_at_the_callers_line():
    """The warning named ``torch/utils/_contextlib.py`` (``torch.no_grad``'s wrapper around ``step``), not the user's
    ``opt.step()``; the same through ``initialize_scales``."""
    for call in ("step", "initialize_scales"):
        params = [torch.nn.Parameter(torch.randn(1)), torch.nn.Parameter(torch.randn(4))]
        opt = SGDSaI(params)
        params[0].grad, params[1].grad = torch.ones(1), torch.randn(4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if call == "step":
                opt.step()  # the warning's line (step)
            else:
                opt.initialize_scales()  # the warning's line (initialize_scales)
        [warning] = [w for w in caught if "no usable variance" in str(w.message)]
        assert (warning.filename, warning.lineno) == (__file__, _line_of(f"opt.{call}()  # the warning's line ({call})"))
