"""``sai_hf.triton_update`` on CPU, through Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter runs the kernel's own code with numpy on CPU tensors. ``triton_update`` loads a
private interpreted copy of its kernels whenever ``TRITON_INTERPRET=1`` is set at call time, so the
``interpret`` fixture sets the variable for one test only and the compiled kernels that other tests
(``tests/gpu``) use are not affected. Here: the default block size, many tensors of mixed dtypes
and alignment in one call (the program table), what the kernel refuses, when Triton is available,
one launch per device; the kernel compiled ahead of time for sm_90 (no GPU needed), its PTX read.
Its results on every dtype and option, against the float64 reference and bit for bit against the
same float32 operations in torch: ``test_update_against_reference.py`` (path ``triton``).
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton; Linux x86_64 wheels only)")

import _triton_reference  # noqa: E402
from _triton_reference import float32_expected  # noqa: E402

from sai_hf import triton_update  # noqa: E402


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_update.triton_sgd_sai_


def run_steps(update, shapes, **kwargs):
    """Small blocks by default (64 elements, 2 a program) so that small tensors cross their edges."""
    kwargs.setdefault("block", 64)
    kwargs.setdefault("chunk_blocks", 2)
    return _triton_reference.run_steps(update, shapes, **kwargs)


# Sizes around the block (64) and chunk (128) edges, a single element and a 2-D tensor.
SHAPES = [(1,), (63,), (64,), (65,), (128,), (300,), (7, 45)]


def test_fp32_default_block_size(interpret):
    run_steps(interpret, [(3, 4000), (10,), (8192,)], steps=2, block=triton_update.BLOCK,
              chunk_blocks=triton_update.CHUNK_BLOCKS)  # fmt: skip


def test_many_tensors_mixed_dtypes_and_alignment_in_one_call(interpret):
    """Several groups (dtypes, a 4-byte-aligned view, empty tensors) in one call; 30 tensors in
    the fp32 group exercise the binary search of the program table."""
    gen = torch.Generator().manual_seed(5)
    flat = torch.randn(1 + 50, generator=gen)
    params = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 200, (30,), generator=gen)]
    params += [torch.randn(33, generator=gen).to(torch.bfloat16), flat[1:], torch.empty(0), torch.empty(0, 3)]
    assert params[31].data_ptr() % 16 != 0
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    buffers = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    before = [(p.clone(), b.clone()) for p, b in zip(params, buffers)]
    step_sizes = [-0.001 * (i % 7 + 1) for i in range(len(params))]
    decays = [1.0 if i % 2 else 0.99 for i in range(len(params))]
    interpret(params, grads, buffers, step_sizes, decay=decays, momentum=0.8, first=[False] * len(params),
              maximize=False, seeds=list(range(len(params))), block=32, chunk_blocks=2)  # fmt: skip
    for i, (p, b) in enumerate(before):
        want_p, m32 = float32_expected(p, grads[i], b, step_sizes[i], decays[i], 0.8, False, False)
        assert torch.equal(params[i], want_p), i
        assert torch.equal(buffers[i], m32.to(b.dtype)), i


def test_rejects_what_it_cannot_update(interpret):
    p, g = torch.zeros(8), torch.zeros(8)
    kwargs = dict(decay=1.0, momentum=0.9, first=[True], maximize=False, seeds=[0])
    with pytest.raises(TypeError, match="float64"):
        interpret([p.double()], [g.double()], [g.double()], [-1.0], **kwargs)
    with pytest.raises(ValueError, match="contiguous"):
        interpret([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [torch.zeros(4, 4)], [-1.0], **kwargs)
    with pytest.raises(ValueError, match="buffer"):
        interpret([p], [g], [None], [-1.0], **kwargs)
    with pytest.raises(ValueError, match="elements"):
        interpret([p], [torch.zeros(9)], [g], [-1.0], **kwargs)


def test_triton_available(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_update.triton_available("cpu")
    assert triton_update.triton_available("cuda") == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_update.triton_available("cpu")
    assert not triton_update.triton_available("cuda")  # the interpreter cannot follow device addresses
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        triton_update.triton_sgd_sai_([torch.zeros(2)], [torch.zeros(2)], None, [-1.0], decay=1.0, momentum=0.0,
                                      first=[True], maximize=False, seeds=None)  # fmt: skip


@pytest.mark.parametrize("variant", ["fp32", "bf16-momentum"])
def test_compiles_for_sm90_vectorised_without_fma(monkeypatch: pytest.MonkeyPatch, variant):
    """Ahead-of-time compilation to PTX (ptxas ships in the triton wheel; no GPU needed): full blocks
    load and store 16 bytes per instruction, and no float operation is contracted into an FMA."""
    try:
        from triton import compile as triton_compile
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - triton internals moved
        pytest.skip(f"triton's ahead-of-time API is not where expected: {exc}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = importlib.import_module("sai_hf._triton_kernels")
    stochastic = variant == "bf16-momentum"
    constants = dict(P_KIND=0, G_KIND=0, M_KIND=2 if stochastic else 0, HAS_MOMENTUM=True, STOCHASTIC=stochastic,
                     MAXIMIZE=False, ALIGNED=True, BLOCK=triton_update.BLOCK, CHUNK_BLOCKS=triton_update.CHUNK_BLOCKS)  # fmt: skip
    signature = {"table": "*i64", "n_tensors": "i32", "search_steps": "i32", "mu": "fp32", "one_minus_mu": "fp32"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=kernels.sgd_sai_kernel, signature=signature, constexprs=constants,
                       attrs={(0,): [["tt.divisibility", 16]]})  # fmt: skip
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=triton_update.NUM_WARPS, enable_fp_fusion=False))  # fmt: skip
    ptx = compiled.asm["ptx"]
    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.[bfu]32", ptx))
    vector_stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.[bfu]32", ptx))
    # 8 elements a thread: fp32 arrays take two 16-byte accesses, a bf16 buffer one.
    assert (vector_loads, vector_stores) == ((5, 3) if stochastic else (6, 4)), ptx[-3000:]
    assert "fma" not in ptx


def test_triton_available_is_decided_once_per_device_type(monkeypatch: pytest.MonkeyPatch):
    """The CUDA probe and the import attempt run once per process and device type, not per block and
    step; ``_available.cache_clear()`` decides again. The interpreter switch is still read per call."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    probes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: probes.append(1) or True)
    triton_update._available.cache_clear()
    try:
        assert all(triton_update.triton_available(d) for d in ["cuda", "cuda:0", torch.device("cuda", 1)] * 50)
        assert not triton_update.triton_available("cpu")
        assert len(probes) == 1
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_update.triton_available("cpu") and not triton_update.triton_available("cuda")
        triton_update._available.cache_clear()
        monkeypatch.delenv("TRITON_INTERPRET")
        assert triton_update.triton_available("cuda") and len(probes) == 2
    finally:
        triton_update._available.cache_clear()


class _Guard:
    """A stand-in for ``torch.cuda.device``: records which device each launch ran under."""

    current = None

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.saved, _Guard.current = _Guard.current, self.device

    def __exit__(self, *exc):
        _Guard.current = self.saved


def test_blocks_on_several_devices_launch_per_device_under_its_guard(monkeypatch: pytest.MonkeyPatch):
    """Naive model parallelism puts blocks of one call on several devices: one launch per device
    (here the CPU and the meta device stand for two GPUs), each under that device's guard, with its
    table on that device and only that device's tensors in it."""
    kernels = importlib.import_module("sai_hf._triton_kernels")
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(table, count, *args, **kwargs):
                launches.append((_Guard.current, table.device, count, grid))
            return launch

    fake = type("Kernels", (), dict(N_FIELDS=kernels.N_FIELDS, N_INT_FIELDS=kernels.N_INT_FIELDS, sgd_sai_kernel=Kernel()))
    monkeypatch.setattr(triton_update, "kernel_module", lambda: fake)
    monkeypatch.setattr(triton_update, "device_guard", _Guard)
    monkeypatch.setattr(triton_update, "triton_available", lambda device: True)
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("cpu"), torch.device("meta"), torch.device("meta")]
    params = [torch.zeros(100 * (i + 1), device=d) for i, d in enumerate(devices)]
    triton_update.triton_sgd_sai_(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                                  [-1.0] * 5, decay=1.0, momentum=0.9, first=[True] * 5, maximize=False, seeds=None)  # fmt: skip
    assert sorted(launches, key=str) == sorted([(devices[0], devices[0], 2, (2,)), (devices[1], devices[1], 3, (3,))], key=str)  # a program a tensor
    with pytest.raises(ValueError, match="grad 0 is on meta, its param on cpu"):
        triton_update.triton_sgd_sai_(params[:1], [torch.zeros(100, device="meta")], None, [-1.0], decay=1.0,
                                      momentum=0.0, first=[True], maximize=False, seeds=None)  # fmt: skip
