"""What every update path guarantees besides its values (those: ``test_update_against_reference.py``):
which path ``sai_hf.functional.sgd_sai`` takes for ``fused`` / ``foreach`` (``None`` chooses, as in
torch) and which kernel the fused path gives a CPU block; the autograd version counters bumped; a view
updated alone; what every path refuses."""

from __future__ import annotations

import pytest
import torch
import torch.optim.optimizer as torch_optimizer

from sai_hf import SGDSaI, cpu_update, functional, native
from sai_hf.functional import sgd_sai

PATHS = {"_single_tensor_sgd_sai": "loop", "_multi_tensor_sgd_sai": "foreach", "_single_pass_sgd_sai": "fused"}


def _paths_taken(monkeypatch, **flags) -> list[str]:
    taken = []
    for name, path in PATHS.items():
        real = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, real=real, path=path, **k: taken.append(path) or real(*a, **k))
    p = torch.randn(64, 32)
    sgd_sai([p], [torch.randn_like(p)], [None], [1.0], lr=1e-2, momentum=0.9, weight_decay=0.1, maximize=False, **flags)
    return taken


@pytest.mark.parametrize(
    "flags, cpu, foreach_device",
    [
        (dict(), "fused", "fused"),
        (dict(fused=True), "fused", "fused"),
        (dict(foreach=True), "foreach", "foreach"),
        (dict(foreach=False), "loop", "loop"),
        (dict(fused=False, foreach=False), "loop", "loop"),
        (dict(fused=False), "loop", "foreach"),  # None chooses: foreach where the device has foreach kernels
        (dict(fused=False, foreach=None), "loop", "foreach"),
    ],
)
def test_none_chooses_like_torch(monkeypatch, flags, cpu, foreach_device):
    """``fused=False, foreach=None`` takes the multi-tensor path where torch's rule
    (``_default_to_fused_or_foreach``) would (every tensor on a device with foreach kernels: CUDA;
    here the CPU is declared one), the for-loop elsewhere; only ``foreach=False`` forces the loop."""
    assert _paths_taken(monkeypatch, **flags) == [cpu]
    assert torch_optimizer._default_to_fused_or_foreach([torch.zeros(1)], False, False) == (False, False)
    monkeypatch.setattr(torch_optimizer, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    assert _paths_taken(monkeypatch, **flags) == [foreach_device]


def test_both_true_is_refused():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="cannot both be True"):
        sgd_sai([p], [p], [None], [1.0], lr=1.0, momentum=0.9, weight_decay=0.0, maximize=False, fused=True, foreach=True)


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


@pytest.mark.skipif(not native.available(), reason=f"no native CPU kernels here: {native.library().failure}")
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


# --------------------------------------------------------------------------- views and refusals (found attacking the optimizer)
def test_view_of_a_larger_parameter_leaves_the_rest_untouched():
    torch.manual_seed(0)
    storage = torch.randn(10, 10)
    p = torch.nn.Parameter(storage[:, ::2])  # shares storage with the odd columns
    odd = storage[:, 1::2].clone()
    opt = SGDSaI([p], lr=1e-2)
    p.grad = torch.randn(10, 5)
    opt.step()
    assert torch.equal(storage[:, 1::2], odd)


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
