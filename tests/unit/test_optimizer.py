"""SGDSaI on plain tensors: hand-computed updates on every path, hyperparameters and parameter groups,
no host sync once the scales are fixed. Scaling rules: ``test_scaling.py``; statistics:
``test_statistics.py``; state dicts: ``test_checkpoint.py``; every update path against the float64
reference: ``test_update_against_reference.py``."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from sai_hf import SGDSaI

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


# --------------------------------------------------------------------------- scales fixed after the first step


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


# --------------------------------------------------------------------------- groups share one normalize


def test_mixed_normalize_groups_rejected():
    with pytest.raises(ValueError, match="normalize"):
        SGDSaI(
            [{"params": [torch.zeros(2, requires_grad=True)]}, {"params": [torch.zeros(2, requires_grad=True)], "normalize": "max"}]
        )


# --------------------------------------------------------------------------- parameter groups (found attacking the optimizer)
def test_per_group_maximize_is_accepted_and_ascends():
    torch.manual_seed(0)
    a, b = torch.zeros(50, requires_grad=True), torch.zeros(50, requires_grad=True)
    opt = SGDSaI([{"params": [a], "maximize": True}, {"params": [b]}], lr=1e-2, momentum=0.0)
    g = torch.randn(50) + 1.0
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    assert torch.allclose(a, -b) and (a * g).sum() > 0


@pytest.mark.parametrize(
    "group, key",
    [
        ({"maximize": "yes"}, "maximize"),
        ({"fused": 1}, "fused"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum_dtype": torch.int8}, "momentum_dtype"),
        ({"normalize": "max"}, "normalize"),
    ],
)
def test_add_param_group_rejects_what_it_cannot_honour(group, key):
    opt = SGDSaI([torch.zeros(3, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **group})
    with pytest.raises(ValueError, match=key):
        SGDSaI([{"params": [torch.zeros(3, requires_grad=True)]}, {"params": [torch.zeros(2, requires_grad=True)], **group}])


def test_sparse_gradient_error_names_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Linear(4, 1)
    opt = SGDSaI(list(dense.parameters()) + list(emb.parameters()), lr=1e-3)
    dense(emb(torch.tensor([1, 2]))).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradients: parameter #2 \(shape \(10, 4\)\)"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_normalize_mismatch_names_the_group_and_the_default():
    with pytest.raises(ValueError, match=r"'none' \(the optimizer's default\) for parameter group #1.*group #0 has 'max'"):
        SGDSaI([{"params": [torch.zeros(2, requires_grad=True)], "normalize": "max"}, {"params": [torch.zeros(3, requires_grad=True)]}])


def test_optim_args_choices_are_case_insensitive_like_bools_and_dtypes():
    """``--optim_args normalize=MAX`` was refused ("Invalid normalize='MAX'") while ``maximize=TRUE`` and
    ``momentum_dtype=BF16`` were accepted."""
    from sai_hf.integration import SGD_SAI, check_optim_args
    from sai_hf.optim_args import parse_optim_args

    text = "normalize=MAX,scale_rule=Sqrt_Numel,maximize=TRUE,momentum_dtype=BF16"
    check_optim_args("sgd_sai", text)
    parsed = parse_optim_args(text, SGD_SAI.options, "sgd_sai")
    assert parsed == {"normalize": "max", "scale_rule": "sqrt_numel", "maximize": True, "momentum_dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="--optim_args for sgd_sai: Invalid normalize='maxx'"):
        check_optim_args("sgd_sai", "normalize=MAXX")
