"""Every update path against the float64 reference: one matrix, path x dtypes x options.

The reference is ``tests/support/reference.py`` (SPEC's equations in float64, written without the
package): each step of each case is recomputed there from the values the path started the step
from (so a reduced-precision path is judged on one step's roundings, not on a drifted trajectory),
for blocks of fixed scales::

    g <- -g (maximize);  m_1 = g_1, m_t = mu m_{t-1} + (1 - mu) g_t (mu = 0: m = g);
    p <- p (1 - lr wd) - lr s m

Axes (every combination below is generated; none is skipped for being unsupported):

* **path**: ``for-loop`` (``sgd_sai(foreach=False, fused=False)``, the package's own reference),
  ``foreach`` (the multi-tensor path), ``fused`` (the default dispatch: on CPU the native C loop
  for decayed or bfloat16-buffer blocks, torch's fused SGD for the others, the multi-tensor path
  for half-precision parameters and non-contiguous layouts), ``fused-slab`` (``fused`` with the
  native loop unavailable: torch's fused SGD with decay folded in slab by slab, the slabbed
  bfloat16-momentum update), ``native-c`` (``cpu_update.cpu_sgd_sai_`` called directly) and
  ``triton`` (``triton_update.triton_sgd_sai_`` under ``TRITON_INTERPRET=1``, small blocks so that
  small tensors cross their edges). ``native-c`` needs a C compiler and ``triton`` the triton
  package: without them those cases are skipped, with the reason.
* **dtypes** (parameter and gradient / momentum buffer): fp32, fp32 + bf16 momentum (stochastic
  rounding), fp64, fp64 + bf16 momentum, bf16, bf16 + fp32 momentum, fp16, fp16 + bf16 momentum;
  each path gets the combinations it takes (``native-c``: ``cpu_update.FUNCTIONS``; ``triton``:
  float32/float16/bfloat16; ``fused-slab``: those its single pass runs on CPU).
* **options**: momentum 0.9 or 0 (no buffer: only with the parameter's dtype), weight decay 0 or
  0.1, maximize off or on. SGD-SaI has no Nesterov option; ``normalize`` and deferred blocks
  decide the scales, not the update: ``test_scaling.py`` and the property tests
  (``test_properties.py``, every path) cover them.

Blocks: sizes around the Triton blocks (64) and chunks (128), one element, a 2-D tensor; for the
CPU paths also the native loop's thread split (65536) and the bfloat16 slab (2^18); for the paths
that take them, non-contiguous layouts (slice, strided, transposed, channels_last, every third row)
with the gradient contiguous or in the parameter's layout.

Checks after every step: the parameter and the buffer within the tolerance of their dtype of the
float64 values (float64 1e-15; float32 1e-6; bfloat16/float16 1e-2 relative, 1e-3 absolute: one
rounding to the dtype, or the stochastic rounding's one ulp); where the package promises more, bit
for bit: the native loop and the Triton kernel do the float32 operations of
``_triton_reference.float32_expected`` (no FMA contraction), and a bfloat16 buffer of a float32
block holds the same bits on every path (the stochastic rounding of ``mu m + (1 - mu) g`` computed
in float32 with the seed of the block's step and index).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from _triton_reference import float32_expected, stored
from reference import Block, ReferenceSGDSaI, wide

from sai_hf import cpu_update, native
from sai_hf.functional import sgd_sai
from sai_hf.rounding import rounding_seed

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
NAMES = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16"}

#: (parameter dtype, momentum buffer dtype).
DTYPES = [(F32, F32), (F32, BF16), (F64, F64), (F64, BF16), (BF16, BF16), (BF16, F32), (F16, F16), (F16, BF16)]

#: Tolerances against the float64 reference, by the dtype of the tensor compared.
TOLERANCE = {F64: dict(rtol=1e-15, atol=1e-15), F32: dict(rtol=1e-6, atol=1e-6), BF16: dict(rtol=1e-2, atol=1e-3), F16: dict(rtol=1e-2, atol=1e-3)}

LR = 0.01
SCALES = [1.0, 2.0, 3.0, 4.0, 5.0]  # step sizes -0.01 ... -0.05, cycled over the blocks
STEPS = 3

# Sizes around the Triton kernel's block (64) and chunk (128) edges, a single element, a 2-D tensor.
SMALL = [(1,), (63,), (64,), (65,), (128,), (300,), (7, 45)]
# The native loop's edges: one thread's block (below the parallel threshold of 65536), several
# threads' with odd split points; one bfloat16 slab and two elements more (sai_hf.rounding.SLAB = 2^18).
LARGE = [(65535,), (2, 131073)]


def _layouts() -> dict[str, Callable[[torch.dtype], torch.Tensor]]:
    """Each: a fresh non-contiguous view (into its own storage) of fixed values."""
    gen = torch.Generator().manual_seed(11)
    base, image = torch.randn(32, 24, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    return {
        "slice": lambda dtype: base.to(dtype, copy=True)[4:20, 3:18],
        "strided": lambda dtype: base.to(dtype, copy=True)[:, ::2],
        "transposed": lambda dtype: base.to(dtype, copy=True).t(),
        "channels_last": lambda dtype: image.to(dtype, copy=True).to(memory_format=torch.channels_last),
        "every-third-row": lambda dtype: base.to(dtype, copy=True)[::3],
    }


# ----------------------------------------------------------------------------------------- the paths
@dataclass(frozen=True)
class Path:
    """How one update path runs a step: ``update(params, grads, buffers, scales, step, hyper)`` with
    ``buffers[i]`` None before a block's first update (the path stores the new buffer there)."""

    name: str
    update: Callable
    dtypes: tuple[tuple[torch.dtype, torch.dtype], ...]
    large: bool  # the native loop's and the slabs' edges (the paths that have them)
    layouts: bool  # non-contiguous parameters (the kernels called directly take contiguous blocks only)
    bit_exact: bool  # the float32 operations of _triton_reference.float32_expected, bit for bit
    marks: tuple = ()


def _functional(**flags) -> Callable:
    def update(params, grads, buffers, scales, step, hyper):
        sgd_sai(params, grads, buffers, scales, **hyper, steps=[step] * len(params), **flags)

    return update


def _without_native_loop(params, grads, buffers, scales, step, hyper):
    def refuse(*args, **kwargs):
        raise AssertionError("the native loop ran")

    with mock.patch.object(cpu_update, "takes", lambda *args, **kwargs: False), mock.patch.object(cpu_update, "cpu_sgd_sai_", refuse):
        _functional(fused=True)(params, grads, buffers, scales, step, hyper)


def _kernel(call: Callable, **launch) -> Callable:
    """A kernel called directly: buffers allocated (uninitialised) before the first update."""

    def update(params, grads, buffers, scales, step, hyper):
        momentum = hyper["momentum"]
        if momentum:
            for i, p in enumerate(params):
                if buffers[i] is None:
                    buffers[i] = torch.empty_like(p, dtype=hyper["momentum_dtype"] or p.dtype)
        call(
            params, grads, buffers if momentum else None, [-hyper["lr"] * s for s in scales],
            decay=1 - hyper["lr"] * hyper["weight_decay"], momentum=momentum, first=[step == 0] * len(params),
            maximize=hyper["maximize"], seeds=[rounding_seed(step, i) for i in range(len(params))], **launch,
        )  # fmt: skip

    return update


def _native_update(params, grads, buffers, step_sizes, **kwargs):
    cpu_update.cpu_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)


def _triton_update(params, grads, buffers, step_sizes, **kwargs):
    from sai_hf import triton_update

    with mock.patch.dict("os.environ", {"TRITON_INTERPRET": "1"}):
        triton_update.triton_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)


NO_NATIVE = pytest.mark.skipif(not native.available(), reason=f"no native CPU kernels here: {native.library().failure}")
NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton; Linux x86_64 wheels only)")

PATHS = [
    Path("for-loop", _functional(foreach=False, fused=False), tuple(DTYPES), large=False, layouts=True, bit_exact=False),
    Path("foreach", _functional(foreach=True), tuple(DTYPES), large=False, layouts=True, bit_exact=False),
    Path("fused", _functional(fused=True), tuple(DTYPES), large=False, layouts=True, bit_exact=False),
    Path("fused-slab", _without_native_loop, ((F32, F32), (F32, BF16), (F64, F64)), large=True, layouts=True, bit_exact=False),
    Path("native-c", _kernel(_native_update), tuple(sorted({k[0::2] for k in cpu_update.FUNCTIONS}, key=DTYPES.index)),
         large=True, layouts=False, bit_exact=True, marks=(NO_NATIVE,)),  # fmt: skip
    Path("triton", _kernel(_triton_update, block=64, chunk_blocks=2), tuple(d for d in DTYPES if F64 not in d),
         large=False, layouts=False, bit_exact=True, marks=(NO_TRITON,)),  # fmt: skip
]


def _cases():
    for path in PATHS:
        for param_dtype, buf_dtype in path.dtypes:
            for momentum in (0.9, 0.0):
                if momentum == 0 and buf_dtype != param_dtype:
                    continue  # no buffer: the buffer dtype means nothing
                for weight_decay in (0.0, 0.1):
                    for maximize in (False, True):
                        dtypes = NAMES[param_dtype] if buf_dtype == param_dtype else f"{NAMES[param_dtype]}+{NAMES[buf_dtype]}-momentum"
                        if momentum == 0:
                            dtypes = f"{NAMES[param_dtype]}"
                        case_id = f"{path.name}-{dtypes}-mu{momentum}-wd{weight_decay}{'-maximize' if maximize else ''}"
                        yield pytest.param(path, param_dtype, buf_dtype, momentum, weight_decay, maximize, id=case_id, marks=path.marks)


# ----------------------------------------------------------------------------------------- the matrix
def _blocks(path: Path, dtype: torch.dtype, gen: torch.Generator) -> tuple[list[torch.Tensor], list[str]]:
    """Fresh parameters and, for each, the layout of its gradients (``contiguous`` / ``like-param``)."""
    shapes = SMALL + (LARGE if path.large else [])
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grad_layouts = ["contiguous"] * len(params)
    if path.layouts:
        for make in _layouts().values():
            for grad_layout in ("contiguous", "like-param"):
                p = make(dtype)
                assert not p.is_contiguous()
                params.append(p)
                grad_layouts.append(grad_layout)
    return params, grad_layouts


def _gradient(p: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(p.shape, generator=gen).to(p.dtype)
    return torch.empty_like(p).copy_(g) if layout == "like-param" else g


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict, where: str) -> None:
    """``torch.testing.assert_close`` (its message on failure), with a cheaper test first."""
    actual = wide(actual)
    if not bool(((actual - expected).abs() <= tolerance["atol"] + tolerance["rtol"] * expected.abs()).all()):
        torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("path, param_dtype, buf_dtype, momentum, weight_decay, maximize", list(_cases()))
def test_update_path_matches_the_float64_reference(path, param_dtype, buf_dtype, momentum, weight_decay, maximize):
    gen = torch.Generator().manual_seed(0)
    params, grad_layouts = _blocks(path, param_dtype, gen)
    scales = [SCALES[i % len(SCALES)] for i in range(len(params))]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    hyper = dict(lr=LR, momentum=momentum, weight_decay=weight_decay, maximize=maximize, momentum_dtype=buf_dtype if momentum else None)
    group = dict(lr=LR, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    for step in range(STEPS):
        grads = [_gradient(p, layout, gen) for p, layout in zip(params, grad_layouts)]
        before_p = [p.clone() for p in params]
        before_m = [b.clone() if b is not None else None for b in buffers]
        path.update(params, grads, buffers, scales, step, hyper)
        for i, (p, g) in enumerate(zip(params, grads)):
            where = f"{path.name}, step {step}, block {i} {tuple(p.shape)} (stride {p.stride()})"
            block = Block(param=wide(before_p[i]), group=group, scale=scales[i], count=step,
                          buf=wide(before_m[i]) if step and momentum else None)  # fmt: skip
            ReferenceSGDSaI._update(block, wide(g))
            _assert_close(p, block.param, TOLERANCE[param_dtype], f"{where}: parameter")
            if momentum:
                buf = buffers[i]
                assert buf is not None and buf.dtype == buf_dtype and buf.shape == p.shape, where
                _assert_close(buf, block.buf, TOLERANCE[buf_dtype], f"{where}: momentum")
            else:
                assert buffers[i] is None, where
            if param_dtype == F64:
                continue
            step_size, decay = -LR * scales[i], 1 - LR * weight_decay
            want_p, m32 = float32_expected(before_p[i], g, before_m[i], step_size, decay, momentum, step == 0, maximize)
            if path.bit_exact:
                assert torch.equal(p, want_p), (where, (p.float() - want_p.float()).abs().max())
            if momentum and (path.bit_exact or (param_dtype, buf_dtype) == (F32, BF16)):
                assert torch.equal(buffers[i], stored(m32, buf_dtype, param_dtype, rounding_seed(step, i))), f"{where}: momentum bits"
