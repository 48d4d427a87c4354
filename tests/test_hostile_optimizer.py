"""Regression tests for the optimizer defects of issue #10 (items 1-4 and sparse gradients): each
reproduced the defect before its fix."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from sai_hf import SGDSaI


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# --------------------------------------------------------------------------- 1. degenerate at scale
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


# --------------------------------------------------------------------------- 3. layouts
def _layouts():
    """Each: a fresh non-contiguous view (into its own storage) of fixed values."""
    base, image = torch.randn(32, 24), torch.randn(2, 3, 4, 5)
    return {
        "slice": lambda: base.clone()[4:20, 3:18],
        "strided": lambda: base.clone()[:, ::2],
        "transposed": lambda: base.clone().t(),
        "channels_last": lambda: image.to(memory_format=torch.channels_last),
        "every-third-row": lambda: base.clone()[::3],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("grad_layout", ["contiguous", "like-param"])
def test_non_contiguous_parameters_get_the_reference_update(layout, grad_layout):
    torch.manual_seed(0)
    make = _layouts()[layout]
    value = make()
    assert not value.is_contiguous()
    grads = [torch.randn(value.shape) for _ in range(3)]
    # The update must not depend on the layout: every path on the strided parameter against the
    # for-loop path on a contiguous copy of the same values.
    results = {}
    for name, flags in {"default": {}, "fused": dict(fused=True), "multi": dict(foreach=True), "want": {}}.items():
        p = torch.nn.Parameter(value.contiguous() if name == "want" else make())
        assert p.is_contiguous() == (name == "want")
        opt = SGDSaI([p], lr=1e-2, weight_decay=0.1, **(flags if name != "want" else dict(foreach=False, fused=False)))
        for g in grads:
            p.grad = g.clone() if grad_layout == "contiguous" or name == "want" else torch.empty_like(p).copy_(g)
            opt.step()
        results[name] = p.detach().clone()
    want = results.pop("want")
    assert not torch.equal(want, value)
    for name, got in results.items():
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_view_of_a_larger_parameter_leaves_the_rest_untouched():
    torch.manual_seed(0)
    storage = torch.randn(10, 10)
    p = torch.nn.Parameter(storage[:, ::2])  # shares storage with the odd columns
    odd = storage[:, 1::2].clone()
    opt = SGDSaI([p], lr=1e-2)
    p.grad = torch.randn(10, 5)
    opt.step()
    assert torch.equal(storage[:, 1::2], odd)


# --------------------------------------------------------------------------- 4. parameter groups
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


# --------------------------------------------------------------------------- 2. state dicts
def _trained(shapes, steps=2, **kwargs):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = SGDSaI(params, lr=1e-3, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape).to(p.dtype)
        opt.step()
    return params, opt


def test_state_dict_of_another_shape_is_refused_naming_index_and_shapes():
    _, opt = _trained([(8, 4), (16,)])
    _, other = _trained([(8, 4), (32,)], steps=0)
    with pytest.raises(ValueError, match=r"parameter #1.*shape \(16,\).*shape \(32,\)"):
        other.load_state_dict(_save_load(opt.state_dict()))


@pytest.mark.parametrize(
    "param_dtype, momentum_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_momentum_dtype_survives_save_and_load_and_resume_is_bit_exact(param_dtype, momentum_dtype):
    shapes = [(64, 32), (300,)]
    params, opt = _trained([s for s in shapes], steps=0, momentum_dtype=momentum_dtype)
    for p in params:
        p.data = p.data.to(param_dtype)
    opt = SGDSaI(params, lr=1e-3, weight_decay=0.1, momentum_dtype=momentum_dtype)
    torch.manual_seed(1)
    grads = [[torch.randn(s).to(param_dtype) for s in shapes] for _ in range(6)]

    def run(optimizer, ps, steps):
        for step_grads in steps:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            optimizer.step()

    run(opt, params, grads[:3])
    saved_params, saved_state = _save_load(([p.detach().clone() for p in params], opt.state_dict()))
    run(opt, params, grads[3:])

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = SGDSaI(resumed, lr=1e-3, weight_decay=0.1, momentum_dtype=momentum_dtype)
    opt2.load_state_dict(saved_state)
    assert [opt2.state[p]["momentum_buffer"].dtype for p in resumed] == [momentum_dtype] * 2
    run(opt2, resumed, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert all(torch.equal(opt.state[a]["momentum_buffer"], opt2.state[b]["momentum_buffer"]) for a, b in zip(params, resumed))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.AdamW(ps, lr=1e-3), "Adam/AdamW"),
        (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), "torch.optim.SGD"),
        (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), "RMSprop"),
    ],
    ids=["adamw", "sgd", "rmsprop"],
)
@pytest.mark.parametrize("stepped", [True, False])
def test_other_optimizers_state_is_refused_saying_what_it_is(make, match, stepped):
    params = [torch.randn(4, 3, requires_grad=True)]
    foreign = make(params)
    if stepped:
        params[0].grad = torch.randn(4, 3)
        foreign.step()
    opt = SGDSaI([torch.randn(4, 3, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match=f"not SGD-SaI's.*{match}"):
        opt.load_state_dict(_save_load(foreign.state_dict()))


def test_official_sgd_sai_checkpoint_is_imported_exactly():
    sgd_sai = pytest.importorskip("sgd_sai")
    torch.manual_seed(0)
    shapes = [(32, 16), (16,), (40,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    official_params = [t.clone().requires_grad_() for t in init]
    official = sgd_sai.SGD_sai(official_params, lr=1e-3, momentum=0.9, weight_decay=0.01)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for step in range(6):
            for p, g in zip(official_params, grads[step]):
                p.grad = g.clone()
            official.step()
            if step == 2:
                checkpoint = _save_load(([p.detach().clone() for p in official_params], official.state_dict()))
    saved_params, saved_state = checkpoint
    params = [t.clone().requires_grad_() for t in saved_params]
    opt = SGDSaI(params, lr=5.0, normalize="max")  # the checkpoint's own hyperparameters win
    with pytest.warns(UserWarning, match="official sgd-sai"):
        opt.load_state_dict(saved_state)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["normalize"] == "none"
    for step in range(3, 6):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(params, official_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_garbage_state_dict_names_what_is_wrong():
    opt = SGDSaI([torch.randn(3, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match="'state'"):
        opt.load_state_dict({"param_groups": opt.state_dict()["param_groups"]})
    bad = opt.state_dict()
    bad["state"] = {0: {"scale": "big", "gsnr": 1.0, "step": 1}}
    with pytest.raises(ValueError, match="scale of parameter #0"):
        opt.load_state_dict(bad)


# --------------------------------------------------------------------------- found by the adversarial pass
def test_gradient_of_another_shape_is_refused_on_every_path():
    for flags in ({}, dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False)):
        w = torch.nn.Parameter(torch.zeros(4))
        opt = SGDSaI([w], lr=1e-3, momentum=0.0, **flags)
        w.grad = torch.randn(4)
        opt.step()
        w.data = torch.zeros(4096)  # a resized layer whose gradient is stale
        with pytest.raises(ValueError, match=r"gradient of shape \(4,\) for a parameter of shape \(4096,\)"):
            opt.step()
        assert torch.equal(w, torch.zeros(4096))


def test_complex_parameter_with_real_momentum_dtype_is_refused():
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))
    opt = SGDSaI([p], lr=1e-3, momentum_dtype=torch.bfloat16)
    p.grad = torch.randn(8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex block #0"):
        opt.step()


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


@pytest.mark.parametrize(
    "change, key", [({"momentum": 1.5}, "momentum"), ({"lr": -1.0}, "lr"), ({"normalize": "bogus"}, "normalize")]
)
def test_loaded_group_hyperparameters_are_checked(change, key):
    _, opt = _trained([(4, 3)])
    state = opt.state_dict()
    state["param_groups"][0].update(change)
    with pytest.raises(ValueError, match=f"parameter group #0: Invalid {key}"):
        opt.load_state_dict(state)
    del state["param_groups"][0]["momentum"]
    with pytest.raises(ValueError, match=r"parameter group #0: missing \['momentum'\]"):
        opt.load_state_dict(state)


def test_normalize_mismatch_names_the_group_and_the_default():
    with pytest.raises(ValueError, match=r"'none' \(the optimizer's default\) for parameter group #1.*group #0 has 'max'"):
        SGDSaI([{"params": [torch.zeros(2, requires_grad=True)], "normalize": "max"}, {"params": [torch.zeros(3, requires_grad=True)]}])
