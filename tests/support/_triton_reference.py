"""Expected results of ``sai_hf.triton_update.triton_sgd_sai_``, shared by the CPU (interpreter) and
CUDA tests: the kernel's float32 operations done one torch op at a time (bit-exact: the kernel has no
FMA contraction), and the equations in float64."""

from __future__ import annotations

import torch

from sai_hf.functional import sgd_sai
from sai_hf.rounding import rounding_seed as _seed, stochastic_round_to_bf16

F32 = torch.float32


def _scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)  # a 0-dim CPU tensor: a float32 scalar on any device


def float32_expected(p, g, m, step_size, decay, momentum, first, maximize):
    """(new p in p's dtype, new m in float32) by the kernel's float32 operations, one torch op each."""
    g = -g.float() if maximize else g.float()
    if momentum == 0 or first:
        m32 = g
    else:
        m32 = _scalar(momentum) * m.float() + _scalar(1.0 - momentum) * g
    new_p = p.float() * _scalar(decay) + _scalar(step_size) * m32
    return new_p.to(p.dtype), m32


def float64_expected(p, g, m, step_size, decay, momentum, first, maximize):
    """(new p, new m) by the equations in float64."""
    g = -g.double() if maximize else g.double()
    m64 = g if momentum == 0 or first else momentum * m.double() + (1 - momentum) * g
    return p.double() * decay + step_size * m64, m64


def stored(m32: torch.Tensor, buf_dtype: torch.dtype, param_dtype: torch.dtype, seed: int) -> torch.Tensor:
    """What the kernel writes to a buffer of ``buf_dtype``."""
    if buf_dtype == torch.bfloat16 and param_dtype != torch.bfloat16:
        return stochastic_round_to_bf16(m32, seed)
    return m32.to(buf_dtype)


def run_steps(update, shapes, *, param_dtype=F32, buf_dtype=None, momentum=0.9, decay=1 - 1e-3, maximize=False,
              steps=3, device="cpu", seed=0, **launch):  # fmt: skip
    """``steps`` calls of ``update`` (``triton_sgd_sai_``) on fresh tensors of ``shapes``, each checked
    bit for bit against :func:`float32_expected` / :func:`stored` and closely against
    :func:`float64_expected`. ``launch``: extra keywords (``block``, ``chunk_blocks``)."""
    gen = torch.Generator().manual_seed(seed)
    buf_dtype = buf_dtype or param_dtype
    params = [torch.randn(s, generator=gen).to(device, param_dtype) for s in shapes]
    buffers = [torch.empty(s, dtype=buf_dtype, device=device) for s in shapes] if momentum else None
    step_sizes = [-0.01 * (1 + i % 5) for i in range(len(shapes))]
    for step in range(steps):
        grads = [torch.randn(s, generator=gen).to(device, param_dtype) for s in shapes]
        seeds = [_seed(step, i) for i in range(len(shapes))]
        before_p = [p.clone() for p in params]
        before_m = [b.clone() for b in buffers] if momentum else [None] * len(shapes)
        update(params, grads, buffers, step_sizes, decay=decay, momentum=momentum, first=[step == 0] * len(shapes),
               maximize=maximize, seeds=seeds, **launch)  # fmt: skip
        for i in range(len(shapes)):
            args = (before_p[i], grads[i], before_m[i], step_sizes[i], decay, momentum, step == 0, maximize)
            want_p, m32 = float32_expected(*args)
            assert torch.equal(params[i], want_p), (step, i, (params[i].float() - want_p.float()).abs().max())
            if momentum:
                assert torch.equal(buffers[i], stored(m32, buf_dtype, param_dtype, seeds[i])), (step, i)
            p64, _ = float64_expected(*args)
            if param_dtype == F32:
                torch.testing.assert_close(params[i].double(), p64, rtol=1e-6, atol=1e-6)
            else:  # one rounding to the parameter dtype
                torch.testing.assert_close(params[i].double(), p64, rtol=1e-2, atol=1e-3)
    return params, buffers


def compare_with_loop_path(update, device):
    """Same seeds as ``sgd_sai(foreach=False, fused=False)``: the first update (``m = g``) gives the
    same bf16 buffers bit for bit and the same parameters; later ones agree up to a few bf16 ulps of
    ``m`` (lerp and ``mu m + (1 - mu) g`` round differently, and the rounding hash takes ``m``'s bits)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (30,), (1,), (257,)]
    base = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
    scales = [3.0, 0.5, 1.0, 20.0]
    lr, wd, mu = 1e-2, 0.1, 0.9
    loop_p, loop_m = [t.clone() for t in base], [None] * len(shapes)
    kern_p, kern_m = [t.clone() for t in base], [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes]
    for step, step_grads in enumerate(grads):
        sgd_sai(loop_p, step_grads, loop_m, scales, lr=lr, momentum=mu, weight_decay=wd, maximize=False,
                foreach=False, fused=False, momentum_dtype=torch.bfloat16, steps=[step] * len(shapes))  # fmt: skip
        update(kern_p, step_grads, kern_m, [-lr * s for s in scales], decay=1 - lr * wd, momentum=mu,
                first=[step == 0] * len(shapes), maximize=False, seeds=[_seed(step, i) for i in range(len(shapes))])  # fmt: skip
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(loop_m, kern_m))
        for a, b in zip(loop_m, kern_m):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05)  # |m| < 4: 3 bf16 ulps
        for a, b, s in zip(loop_p, kern_p, scales):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 if step == 0 else lr * s * 0.05 * step)
