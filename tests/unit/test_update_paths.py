"""Which update path ``sai_hf.functional.sgd_sai`` takes for ``fused`` / ``foreach`` (``None`` chooses,
as in torch), and the autograd version counters bumped on torch versions whose
``increment_version`` takes one tensor only (torch 2.4)."""

from __future__ import annotations

import pytest
import torch
import torch.optim.optimizer as torch_optimizer

from sai_hf import SGDSaI, functional
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


@pytest.fixture
def torch_2_4_increment_version(monkeypatch):
    """``torch.autograd.graph.increment_version`` as in torch 2.4: one tensor, a list refused."""
    real = torch.autograd.graph.increment_version
    calls = []

    def one_tensor(tensor):
        if not isinstance(tensor, torch.Tensor):
            raise RuntimeError("increment_version expect a Tensor as input")
        calls.append(tensor)
        real(tensor)

    monkeypatch.setattr(torch.autograd.graph, "increment_version", one_tensor)
    functional._increment_version_takes_lists.cache_clear()
    yield calls
    functional._increment_version_takes_lists.cache_clear()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_version_counters_with_a_one_tensor_increment_version(torch_2_4_increment_version, weight_decay):
    layer = torch.nn.Linear(64, 64)
    opt = SGDSaI(layer.parameters(), lr=1e-2, weight_decay=weight_decay)
    loss = layer(torch.randn(8, 64, requires_grad=True)).square().sum()  # saves the weight
    loss.backward(retain_graph=True)
    before = layer.weight._version
    opt.step()
    opt.step()
    assert layer.weight._version > before
    assert len(torch_2_4_increment_version) == 2 * 4  # two parameters and their buffers, each step
    assert not functional._increment_version_takes_lists()  # decided once, by one probe
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
