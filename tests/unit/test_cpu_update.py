"""The native CPU loop of ``sai_hf.cpu_update`` (``sai_hf/csrc/sgd_sai_cpu.c``) beyond ordinary blocks:
special values bit for bit as the torch ops and the torch-ops rounding hash, fragments of one flat
tensor, tensors without memory of their own, what it refuses. Ordinary blocks against the float64
reference (and bit for bit against the Triton kernel's float32 operations): ``test_update_against_reference.py``;
which blocks the fused path sends here: ``test_update_paths.py``; building it: ``test_native_build.py``."""

from __future__ import annotations

import pytest
import torch
from _triton_reference import float32_expected, float64_expected

from sai_hf import cpu_update, native
from sai_hf.functional import sgd_sai
from sai_hf.rounding import rounding_seed as _seed, stochastic_round_to_bf16

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native CPU kernels here: {native.library().failure}")

# Sizes around the loop's edges: one element, a vector tail (not a multiple of 16), one thread's
# block (below the parallel threshold of 65536), several threads' with odd split points.
SHAPES = [(1,), (700, 1001), (65535,), (3, 65537)]


def update(params, grads, buffers, step_sizes, **kwargs):
    cpu_update.cpu_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_the_torch_ops_bit_for_bit(buf_dtype, maximize):
    """Signed zeros, subnormals, the largest floats (whose rounding may carry to infinity), infinities
    and NaN in the gradient and the momentum: the same bits as the torch ops and the torch hash
    (NaN where they give NaN: its sign and payload follow operand order, not specified by either)."""
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"), 1.0, -2.5])
    g = specials.repeat_interleave(len(specials))
    m = specials.repeat(len(specials)).to(buf_dtype)
    p = torch.linspace(-3, 3, g.numel())
    seed = _seed(4, 2)
    want_p, m32 = float32_expected(p, g, m, -0.25, 0.99, 0.9, False, maximize)
    update([p], [g], [m], [-0.25], decay=0.99, momentum=0.9, first=[False], maximize=maximize, seeds=[seed])
    want_m = stochastic_round_to_bf16(m32, seed) if buf_dtype == torch.bfloat16 else m32
    for got, want in ((p, want_p), (m, want_m)):
        assert torch.equal(got.isnan(), want.isnan())
        bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits)[~got.isnan()], want.view(bits)[~want.isnan()])


def test_fragments_of_one_flat_tensor():
    """Fragments of one flat tensor (DeepSpeed ZeRO partitions, FSDP shards) at different offsets and
    sizes, scalars that change every step: each fragment's own update, the rest untouched."""
    flat_p, flat_g, flat_m = torch.randn(300_007), torch.randn(300_007), torch.zeros(300_007)
    cuts = [(0, 100_000), (100_003, 300_007)]
    for step in range(3):
        untouched = flat_p[100_000:100_003].clone()
        want = [float64_expected(flat_p[a:b].clone(), flat_g[a:b], flat_m[a:b].clone(), -0.01 * (step + 1), 0.99 - step / 100, 0.9, step == 0, False) for a, b in cuts]
        update(
            [flat_p[a:b] for a, b in cuts], [flat_g[a:b] for a, b in cuts], [flat_m[a:b] for a, b in cuts],
            [-0.01 * (step + 1)] * 2, decay=0.99 - step / 100, momentum=0.9, first=[step == 0] * 2, maximize=False,
            seeds=[0, 1],
        )  # fmt: skip
        for (a, b), (want_p, want_m) in zip(cuts, want):
            torch.testing.assert_close(flat_p[a:b].double(), want_p, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(flat_m[a:b].double(), want_m, rtol=1e-6, atol=1e-6)
        assert torch.equal(flat_p[100_000:100_003], untouched)


def test_tensors_without_memory_of_their_own_never_reach_the_loop():
    """FakeTensor (``torch.compile``'s tracing, ``torch._subclasses``) and wrapper subclasses have a
    null data pointer here: the optimizer must not hand them to C (it took the process down)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    with FakeTensorMode():
        p, g = torch.randn(1000), torch.randn(1000)
        assert not cpu_update.takes(p, g, torch.float32)
        sgd_sai([p], [g], [None], [1.0], lr=1e-2, momentum=0.9, weight_decay=0.1, maximize=False)
    a, b = torch.randn(1000), torch.randn(1000)
    assert not cpu_update.takes(TwoTensor(a, a.clone()), TwoTensor(b, b.clone()), torch.float32)
    with pytest.raises(ValueError, match="memory of its own"):
        update([TwoTensor(a, a.clone())], [TwoTensor(b, b.clone())], None, [-0.1], decay=0.9, momentum=0.0, first=[True], maximize=False, seeds=[0])
    from sai_hf import gradient_statistics

    assert gradient_statistics([TwoTensor(b, b.clone())]).shape == (1, 5)


def test_non_contiguous_or_mismatched_tensors_are_refused():
    p, g, m = torch.zeros(8, 8), torch.zeros(8, 8), torch.zeros(8, 8)
    with pytest.raises(ValueError, match="contiguous"):
        update([p.t()], [g], [m], [-0.1], decay=1.0, momentum=0.9, first=[True], maximize=False, seeds=[0])
    with pytest.raises(ValueError, match=r"shapes \(8, 8\), \(64,\)"):
        update([p], [g.view(-1)], [m], [-0.1], decay=1.0, momentum=0.9, first=[True], maximize=False, seeds=[0])


