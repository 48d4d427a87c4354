"""SGDSaI on plain tensors: hand-computed updates, edge cases, paths, state."""

from __future__ import annotations

import copy
import math
import statistics
import warnings

import pytest
import torch

from sai_hf import SGDSaI, gradient_statistics, gsnr_from_statistics, native
from sai_hf.gsnr import BlockStatus

#: The three implementations of the update, as SGDSaI flags.
PATHS = {"for-loop": dict(foreach=False, fused=False), "multi-tensor": dict(foreach=True), "fused": dict(fused=True)}

# --------------------------------------------------------------------------- hand-computed reference

P0 = [[1.0, 2.0], [3.0, 4.0]]
GRADS = [
    [[0.1, -0.2], [0.3, 0.4]],
    [[-0.5, 0.25], [0.05, 0.2]],
    [[0.3, 0.1], [-0.1, 0.6]],
]
# A second block (3 elements) so that normalize="max" has something to divide by.
Q0 = [0.5, -1.0, 2.0]
QGRADS = [[0.01, 0.02, 0.035], [0.02, -0.01, 0.0], [0.03, 0.01, 0.02]]


def _gsnr(values: list[float], eps: float) -> float:
    norm = math.sqrt(sum(v * v for v in values))
    return norm / (statistics.stdev(values) + eps)


def _hand_run(normalize: str, lr=0.1, mu=0.9, wd=0.1, eps=1e-8):
    """SGD-SaI written out with Python floats, element by element (Algorithm 1)."""
    p = [v for row in P0 for v in row]
    q = list(Q0)
    g_p, g_q = _gsnr([v for row in GRADS[0] for v in row], eps), _gsnr(QGRADS[0], eps)
    s_p, s_q = (g_p, g_q) if normalize == "none" else (g_p / max(g_p, g_q), g_q / max(g_p, g_q))
    m_p = m_q = None
    for t in range(3):
        gp = [v for row in GRADS[t] for v in row]
        gq = QGRADS[t]
        m_p = list(gp) if m_p is None else [mu * m + (1 - mu) * g for m, g in zip(m_p, gp)]
        m_q = list(gq) if m_q is None else [mu * m + (1 - mu) * g for m, g in zip(m_q, gq)]
        p = [x * (1 - lr * wd) - lr * s_p * m for x, m in zip(p, m_p)]
        q = [x * (1 - lr * wd) - lr * s_q * m for x, m in zip(q, m_q)]
    return p, q, (s_p, s_q)


@pytest.mark.parametrize("normalize", ["none", "max"])
@pytest.mark.parametrize("path", PATHS)
def test_three_steps_match_hand_computation(normalize, path):
    p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    q = torch.tensor(Q0, dtype=torch.float64, requires_grad=True)
    opt = SGDSaI([p, q], lr=0.1, momentum=0.9, weight_decay=0.1, normalize=normalize, **PATHS[path])
    for t in range(3):
        p.grad = torch.tensor(GRADS[t], dtype=torch.float64)
        q.grad = torch.tensor(QGRADS[t], dtype=torch.float64)
        opt.step()
    want_p, want_q, (s_p, s_q) = _hand_run(normalize)
    torch.testing.assert_close(p.detach().flatten(), torch.tensor(want_p, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.detach(), torch.tensor(want_q, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert opt.state[p]["scale"] == pytest.approx(s_p, rel=1e-12)
    assert opt.state[q]["scale"] == pytest.approx(s_q, rel=1e-12)
    if normalize == "max":
        assert max(s_p, s_q) == 1.0


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


# --------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(normalize="mean"), "normalize"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_invalid_hyperparameters_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SGDSaI([torch.zeros(2, requires_grad=True)], **kwargs)


def test_momentum_zero_is_plain_scaled_sgd():
    torch.manual_seed(0)
    p = torch.randn(4, 4, requires_grad=True)
    start = p.detach().clone()
    opt = SGDSaI([p], lr=0.01, momentum=0.0)
    grads = [torch.randn(4, 4) for _ in range(3)]
    for g in grads:
        p.grad = g
        opt.step()
    scale = opt.state[p]["scale"]
    expected = start - 0.01 * scale * sum(grads)
    torch.testing.assert_close(p.detach(), expected)
    assert "momentum_buffer" not in opt.state[p]


def test_maximize_negates_the_gradient():
    torch.manual_seed(0)
    g = torch.randn(3, 3)
    a = torch.zeros(3, 3, requires_grad=True)
    b = torch.zeros(3, 3, requires_grad=True)
    opt_a, opt_b = SGDSaI([a], lr=0.1), SGDSaI([b], lr=0.1, maximize=True)
    a.grad, b.grad = g.clone(), -g.clone()
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("momentum, weight_decay, maximize", [(0.9, 0.0, False), (0.9, 0.1, True), (0.0, 0.01, False)])
@pytest.mark.parametrize("path", ["multi-tensor", "fused"])
def test_every_path_equals_the_for_loop(path, momentum, weight_decay, maximize):
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (1,), (3, 5, 2), (16,)]
    base = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    grads[0][3] = torch.zeros(shapes[3])  # a deferred block joins late on both paths
    results = []
    for flags in (PATHS["for-loop"], PATHS[path]):
        params = [t.clone().requires_grad_() for t in base]
        opt = SGDSaI(params, lr=0.05, momentum=momentum, weight_decay=weight_decay, maximize=maximize, **flags)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
        results.append([p.detach() for p in params])
    for loop, other in zip(*results):
        torch.testing.assert_close(other, loop, rtol=1e-6, atol=1e-7)


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


def test_no_host_sync_after_scales_are_fixed(monkeypatch):
    torch.manual_seed(0)
    params = [torch.randn(5, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = SGDSaI(params, lr=0.1, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # computes the scales: one batched sync allowed here

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in SGDSaI.step")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for flags in PATHS.values():
        for group in opt.param_groups:
            group.update({"foreach": None, "fused": None, **flags})
        for _ in range(2):
            opt.step()


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    shapes = [(6, 6), (6,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = SGDSaI(params, lr=0.1, weight_decay=0.01, normalize="max")
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    for step_grads in grads[3:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()

    resumed = [t.clone().requires_grad_() for t in saved_params]
    opt2 = SGDSaI(resumed, lr=0.1, weight_decay=0.01, normalize="max")
    opt2.load_state_dict(saved_state)
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()  # recomputing scales from this gradient (the official bug) would diverge
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert opt2.gsnr_max == opt.gsnr_max


def test_mixed_normalize_groups_rejected():
    with pytest.raises(ValueError, match="normalize"):
        SGDSaI(
            [{"params": [torch.zeros(2, requires_grad=True)]}, {"params": [torch.zeros(2, requires_grad=True)], "normalize": "max"}]
        )


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
