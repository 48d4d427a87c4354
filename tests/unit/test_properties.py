"""Property tests: ``sai_hf.SGDSaI`` against the float64 oracle of ``tests/support/reference.py``.

What is generated (``hypothesis``): parameter groups (per-group lr, weight decay, eps, momentum
including 0, momentum_dtype; maximize per optimizer or per group) of blocks of every shape class
(0-d, one element, empty, small, >= 1M entries), dtype (fp32, fp64, bf16, fp16, complex64/128) and
layout (contiguous, sliced, strided, transposed, channels_last; gradients in the parameter's layout
or contiguous), a few steps of gradients of every kind (random, constant, mean-dominated, zero,
tiny ~1e-30, huge ~1e30, NaN/inf, absent) on every path (for-loop, foreach, fused, default; the
compiled path has one dedicated test), and a ``torch.save``/``torch.load`` state-dict round trip at
a random step.

The oracle is :class:`reference.ReferenceSGDSaI`, SPEC's equations and SGDSaI's documented rules
in float64, written without the package's math. After every step each block is checked for: its
scale state (``gsnr``/``scale`` within rtol 1e-6, ``step`` count, no ``scale`` while deferred), its
weights (bit-identical while deferred; otherwise within ``rtol * magnitude of the summed terms``),
its momentum buffer (presence, dtype, values), its layout (strides, storage, neighbouring storage
untouched), and the one-time degenerate-block warning. Blocks of fp32/fp64/complex parameters are
compared with a free-running oracle; bf16/fp16 parameters and narrow momentum buffers with the
oracle re-anchored to the optimizer's rounded values before each step (a few ulps per step);
stochastically rounded bf16 buffers also with a z-test for unbiasedness.

Profiles (``tests/conftest.py``): ``ci`` (default; derandomised, fixed budget) and ``thorough``
(``pytest tests/unit/test_properties.py --hypothesis-profile=thorough``).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from reference import ReferenceSGDSaI, wide

from sai_hf import SGDSaI

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
C64, C128 = torch.complex64, torch.complex128
REAL = (F32, F64, BF16, F16)
COMPLEX = (C64, C128)
LOW = (BF16, F16)

#: Unit roundoff of each dtype (complex: of its real parts).
UNIT = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11, C64: 2.0**-24, C128: 2.0**-53}
#: Relative tolerance of a parameter, as a multiple of the summed magnitude of the terms that made it.
PARAM_RTOL = {F64: 1e-10, C128: 1e-10, F32: 1e-5, C64: 1e-5, BF16: 2.0**-7, F16: 2.0**-10}
#: Stochastic rounding to bfloat16 lands on one of the two neighbours: up to one ulp (2^-7 relative).
SR_RTOL = 2.0**-6
#: g-SNR and scale agree within this (CPU statistics of large blocks are float32 per 1024-row).
SCALE_RTOL = 1e-6

PATH_FLAGS = {
    "default": {},
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}
PATHS = tuple(PATH_FLAGS)
LAYOUTS = ("contiguous", "sliced", "strided", "transposed", "channels_last")
#: Minimum number of dimensions of each layout.
LAYOUT_MIN_DIMS = {"contiguous": 0, "sliced": 1, "strided": 1, "transposed": 2, "channels_last": 4}
#: Repeated entries weight the (uniform) choice towards blocks that get a well-defined g-SNR.
SHAPE_CLASSES = ("small", "small", "small", "one", "0d", "empty")
#: "random" first: hypothesis shrinks towards it.
KINDS = ("random", "random", "random", "mean", "constant", "zero", "tiny", "random", "mean", "huge", "nonfinite", "absent")
#: Kinds after which a block is still deferred (so a NaN/inf gradient may follow).
DEFERRING = ("zero", "nonfinite", "absent")
CONSTANTS = (0.1, -3.7, 1.0, 2.5e-3)
MEAN_RATIOS = (1e-2, 1e-3, 1e-4)

LRS = (0.1, 1e-3, 0.01, 0.3)
MOMENTA = (0.9, 0.0, 0.5, 0.99)
WEIGHT_DECAYS = (0.0, 0.01, 0.1, 1.0)
EPSILONS = (1e-8, 0.0, 1e-3, 0.5)
MOMENTUM_DTYPES = (None, BF16, F32, F64, F16)


def budget(fraction: float) -> settings:
    """This test's share of the loaded profile's ``max_examples`` (the profile's other settings kept)."""
    return settings(max_examples=max(1, round(settings().max_examples * fraction)))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class BlockSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str = "contiguous"
    grad_layout: str = "same"  # "same" as the parameter, or "contiguous"


@dataclass(frozen=True)
class GroupSpec:
    blocks: tuple[BlockSpec, ...]
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    eps: float = 1e-8
    momentum_dtype: torch.dtype | None = None
    maximize: bool | None = None  # None: not set in the group (the optimizer's value applies)


@dataclass(frozen=True)
class Case:
    groups: tuple[GroupSpec, ...]
    grads: tuple[tuple[str, ...], ...]  # grads[t][i]: kind of block i's gradient at step t + 1
    path: str = "default"
    normalize: str = "none"
    scale_rule: str = "gsnr"
    maximize: bool = False
    seed: int = 0
    round_trip_after: int | None = None  # state-dict round trip after this many steps
    #: Reject (hypothesis.assume) runs where a block is scaled after a first scaling step that had no
    #: well-defined g-SNR (the rule that test_first_scaling_step_without_well_defined_gsnr checks).
    only_defined_gsnr_max: bool = False

    @property
    def blocks(self) -> list[tuple[BlockSpec, GroupSpec]]:
        return [(b, g) for g in self.groups for b in g.blocks]


@st.composite
def shapes(draw, layout: str, classes: tuple[str, ...]) -> tuple[int, ...]:
    low = LAYOUT_MIN_DIMS[layout]
    high = 4 if layout == "channels_last" else 3
    usable = [c for c in classes if c != "0d" or low == 0]  # repeats kept: they are weights
    kind = draw(st.sampled_from(usable))
    if kind == "0d":
        return ()
    ndim = draw(st.integers(max(1, low), high))
    if kind == "one":
        return (1,) * ndim
    if kind == "empty":
        dims = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
        dims[draw(st.integers(0, ndim - 1))] = 0
        return tuple(dims)
    dims = draw(st.lists(st.integers(1, 5 if ndim < 4 else 3), min_size=ndim, max_size=ndim))
    if math.prod(dims) < 2:
        dims[0] = 2
    return tuple(dims)


@st.composite
def block_specs(draw, dtypes, layouts, shape_classes) -> BlockSpec:
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(layouts))
    shape = draw(shapes(layout, shape_classes))
    grad_layout = "same" if layout == "contiguous" else draw(st.sampled_from(("same", "contiguous")))
    return BlockSpec(dtype, shape, layout, grad_layout)


@st.composite
def cases(
    draw,
    *,
    dtypes=REAL,
    layouts=("contiguous",),
    shape_classes=SHAPE_CLASSES,
    kinds=KINDS,
    paths=PATHS,
    momentum_dtypes=(None, BF16, F32, F64),
    max_groups=3,
    max_blocks=3,
    min_steps=1,
    max_steps=4,
    group_maximize=False,
    valid_fused=True,
    round_trip=False,
    only_defined_gsnr_max=True,
) -> Case:
    path = draw(st.sampled_from(paths))
    if path == "fused" and valid_fused:  # what the fused kernel supports on CPU
        dtypes = tuple(d for d in dtypes if d in (F32, F64)) or (F32,)
        momentum_dtypes = (None,)
    @st.composite
    def group_specs(draw) -> GroupSpec:
        blocks = tuple(draw(st.lists(block_specs(dtypes, layouts, shape_classes), min_size=1, max_size=max_blocks)))
        complex_group = any(b.dtype.is_complex for b in blocks)
        return GroupSpec(
            blocks,
            lr=draw(st.sampled_from(LRS)),
            momentum=draw(st.sampled_from(MOMENTA)),
            weight_decay=draw(st.sampled_from(WEIGHT_DECAYS)),
            eps=draw(st.sampled_from(EPSILONS)),
            momentum_dtype=None if complex_group else draw(st.sampled_from(momentum_dtypes)),
            maximize=draw(st.sampled_from((None, True, False))) if group_maximize else None,
        )

    # Lists (not counts) so that the shrinker can delete any group or block.
    groups = draw(st.lists(group_specs(), min_size=1, max_size=max_groups))
    n_blocks = sum(len(g.blocks) for g in groups)
    steps = draw(st.integers(min_steps, max_steps))
    deferred = [True] * n_blocks
    grads = []
    for _ in range(steps):
        row = []
        for i in range(n_blocks):
            allowed = [k for k in kinds if k != "nonfinite" or deferred[i]]  # NaN/inf only before scaling
            kind = draw(st.sampled_from(allowed))
            deferred[i] = deferred[i] and kind in DEFERRING
            row.append(kind)
        grads.append(tuple(row))
    return Case(
        groups=tuple(groups),
        grads=tuple(grads),
        path=path,
        normalize=draw(st.sampled_from(("none", "max"))),
        scale_rule=draw(st.sampled_from(("gsnr", "gsnr", "sqrt_numel"))),
        maximize=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        round_trip_after=draw(st.integers(1, steps - 1)) if round_trip and steps > 1 else None,
        only_defined_gsnr_max=only_defined_gsnr_max,
    )


# --------------------------------------------------------------------------- tensors


def _pick(seq, gen: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=gen))]


def _noise(shape, complex_: bool, gen: torch.Generator) -> torch.Tensor:
    real = torch.randn(shape, generator=gen, dtype=F64)
    return torch.complex(real, torch.randn(shape, generator=gen, dtype=F64)) if complex_ else real


def gradient_values(kind: str, shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor | None:
    """Float64 (complex128) values of a gradient of this kind, or None for "absent".

    A kind may carry its constant: ``"constant:0.1"``."""
    if kind == "absent":
        return None
    cplx, fp16 = dtype.is_complex, dtype == F16
    phase = complex(1.0, -0.5) if cplx else 1.0
    if kind.startswith("constant"):
        value = float(kind.split(":")[1]) if ":" in kind else _pick(CONSTANTS, gen)
        return torch.full(shape, value * phase, dtype=C128 if cplx else F64)
    if kind == "random":
        return _noise(shape, cplx, gen)
    if kind == "mean":
        centre = _pick((0.1, -2.0), gen) * phase
        ratio = 1e-2 if fp16 else _pick(MEAN_RATIOS, gen)
        return centre + abs(centre) * ratio * _noise(shape, cplx, gen)
    if kind == "zero":
        return torch.zeros(shape, dtype=C128 if cplx else F64)
    if kind == "tiny":  # fp16: its subnormal range
        return _noise(shape, cplx, gen) * (1e-6 if fp16 else 1e-30)
    if kind == "huge":  # fp16: near the top of its range
        return _noise(shape, cplx, gen) * (5e3 if fp16 else 1e30)
    if kind == "nonfinite":
        values = _noise(shape, cplx, gen)
        flat = values.view(-1)
        for _ in range(1 + int(torch.randint(2, (1,), generator=gen))):
            if flat.numel():
                flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = _pick((math.nan, math.inf, -math.inf), gen)
        return values
    raise ValueError(kind)


def materialise(values: torch.Tensor, dtype: torch.dtype, layout: str, gen: torch.Generator):
    """``values`` as a ``dtype`` tensor with ``layout``: ``(tensor, base, covered)`` where ``base``
    is the storage-owning tensor and ``covered`` marks the entries of ``base`` the tensor views."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        t = values.to(dtype).clone()
        return t, t, torch.ones(shape, dtype=torch.bool)
    if layout == "channels_last":
        t = values.to(dtype).contiguous(memory_format=torch.channels_last)
        return t, t, torch.ones(shape, dtype=torch.bool)
    if layout == "transposed":
        base_shape = shape[:-2] + (shape[-1], shape[-2])
        base = torch.empty(base_shape, dtype=dtype)
        t = base.transpose(-1, -2)
        t.copy_(values)
        return t, base, torch.ones(base_shape, dtype=torch.bool)
    if layout == "sliced":
        base_shape = shape[:-1] + (shape[-1] + 3,)
        index = (..., slice(1, 1 + shape[-1]))
    elif layout == "strided":
        base_shape = shape[:-1] + (2 * shape[-1] + 1,)
        index = (..., slice(1, 1 + 2 * shape[-1], 2))
    else:
        raise ValueError(layout)
    base = _noise(base_shape, dtype.is_complex, gen).to(dtype)  # neighbours that must stay as they are
    covered = torch.zeros(base_shape, dtype=torch.bool)
    covered[index] = True
    t = base[index]
    t.copy_(values)
    return t, base, covered


def param_values(shape, dtype, gen) -> torch.Tensor:
    return _noise(shape, dtype.is_complex, gen)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {C64: F32, C128: F64}.get(dtype, dtype)


def atol_of(dtype: torch.dtype) -> float:
    """Two subnormal spacings of ``dtype``."""
    info = torch.finfo(real_dtype(dtype))
    return 4 * info.smallest_normal * UNIT[dtype]


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (wide(actual) - expected).abs()
    bad = ~(err <= tol)  # NaN anywhere fails
    if bool(bad.any()):
        j = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries off; first at flat index {j}: "
            f"got {wide(actual).reshape(-1)[j].item()!r}, reference {expected.reshape(-1)[j].item()!r}, "
            f"tolerance {tol.reshape(-1)[j].item():.3g}"
        )


def assert_rel(actual: float, expected: float, rtol: float, what: str) -> None:
    assert isinstance(actual, float) and math.isfinite(actual), f"{what}: {actual!r} is not a finite float"
    assert abs(actual - expected) <= rtol * abs(expected), f"{what}: got {actual!r}, reference {expected!r}"


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and just above |x| (same sign as x), from float32 bits."""
    bits = x.to(F32).contiguous().view(torch.int32)
    down = bits & ~0xFFFF
    up = torch.where(bits == down, down, down + 0x10000)
    return down.view(F32).double(), up.view(F32).double()


# --------------------------------------------------------------------------- the run


def is_degenerate_warning(w: warnings.WarningMessage) -> bool:
    return "SGDSaI" in str(w.message)


@dataclass
class Run:
    """One optimizer, its parameters and the reference, stepped together and compared after each step."""

    case: Case
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.case.seed)
        self.specs = self.case.blocks
        self.params: list[torch.nn.Parameter] = []
        self.bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.layout: list[tuple[tuple[int, ...], int]] = []
        for spec, _ in self.specs:
            self._add_param(param_values(spec.shape, spec.dtype, self.gen), spec)
        self.initial = [p.detach().clone() for p in self.params]
        self.ref = ReferenceSGDSaI(
            [
                dict(
                    params=self.params[self._slice(k)],
                    lr=g.lr,
                    momentum=g.momentum,
                    weight_decay=g.weight_decay,
                    eps=g.eps,
                    maximize=self.case.maximize if g.maximize is None else g.maximize,
                )
                for k, g in enumerate(self.case.groups)
            ],
            normalize=self.case.normalize,
            scale_rule=self.case.scale_rule,
        )
        self.overflowed: set[int] = set()
        self.opt: SGDSaI | None = None

    def _slice(self, k: int) -> slice:
        start = sum(len(g.blocks) for g in self.case.groups[:k])
        return slice(start, start + len(self.case.groups[k].blocks))

    def _add_param(self, values: torch.Tensor, spec: BlockSpec, index: int | None = None) -> None:
        t, base, covered = materialise(values, spec.dtype, spec.layout, self.gen)
        p = torch.nn.Parameter(t)
        entry = (base, covered, base.detach().clone())
        if index is None:
            self.params.append(p)
            self.bases.append(entry)
            self.layout.append((p.stride(), p.data_ptr()))
        else:
            self.params[index] = p
            self.bases[index] = entry
            self.layout[index] = (p.stride(), p.data_ptr())

    # ------------------------------------------------------------------ expectations
    def buffer_dtype(self, i: int) -> torch.dtype:
        spec, group = self.specs[i]
        return group.momentum_dtype or spec.dtype

    def anchored(self, i: int) -> bool:
        spec, group = self.specs[i]
        return spec.dtype in LOW or (group.momentum != 0 and self.buffer_dtype(i) in LOW)

    def fused_may_refuse(self, i: int) -> bool:
        """Whether an explicit fused=True may refuse this block (raise instead of updating it).

        The fused kernels run contiguous fp32/fp64 blocks (on CPU) with buffers in the parameter
        dtype (or bf16 for fp32); sai_hf documents a fallback to the multi-tensor path for the other
        blocks. Either design passes: such a block is updated like the reference, or the step
        raises ValueError/RuntimeError with no weight changed."""
        spec, group = self.specs[i]
        buffer_ok = group.momentum == 0 or self.buffer_dtype(i) == spec.dtype or (spec.dtype, self.buffer_dtype(i)) == (F32, BF16)
        fused_kind = spec.dtype in (F32, F64) and buffer_ok and spec.layout == "contiguous" and spec.grad_layout == "same"
        return not fused_kind or group.momentum_dtype is not None

    def may_refuse(self) -> bool:
        return self.case.path == "fused" and any(self.fused_may_refuse(i) for i in range(len(self.specs)))

    # ------------------------------------------------------------------ optimizer
    def build(self) -> bool:
        """Create the optimizer; False if it (legitimately) refused the configuration."""
        groups = []
        for k, g in enumerate(self.case.groups):
            d = dict(params=self.params[self._slice(k)], lr=g.lr, momentum=g.momentum, weight_decay=g.weight_decay, eps=g.eps)
            if g.momentum_dtype is not None:
                d["momentum_dtype"] = g.momentum_dtype
            if g.maximize is not None:
                d["maximize"] = g.maximize
            groups.append(d)
        try:
            self.opt = SGDSaI(
                groups,
                normalize=self.case.normalize,
                scale_rule=self.case.scale_rule,
                maximize=self.case.maximize,
                **PATH_FLAGS[self.case.path],
            )
        except (ValueError, RuntimeError):
            if self.may_refuse():
                return False
            raise
        self.degenerate_before = len(self.ref.degenerate_blocks)
        self.warnings = 0
        return True

    def gradients(self, kinds: tuple[str, ...]) -> list[torch.Tensor | None]:
        grads = []
        for (spec, _), kind in zip(self.specs, kinds):
            values = gradient_values(kind, spec.shape, spec.dtype, self.gen)
            if values is None:
                grads.append(None)
                continue
            layout = spec.layout if spec.grad_layout == "same" else "contiguous"
            grads.append(materialise(values, spec.dtype, layout, self.gen)[0])
        return grads

    def step(self, t: int, kinds: tuple[str, ...]) -> bool:
        """Step ``t`` (1-based) of both; False if the optimizer (legitimately) refused it."""
        opt = self.opt
        for i, p in enumerate(self.params):
            if self.anchored(i) and i not in self.overflowed and self.ref.blocks[i].touched:
                self.ref.reanchor(i, p, opt.state.get(p, {}).get("momentum_buffer"))
        grads = self.gradients(kinds)
        for p, g in zip(self.params, grads):
            p.grad = g
        counts = [b.count for b in self.ref.blocks]
        self.ref.step(grads)
        if self.case.only_defined_gsnr_max and self.ref.gsnr_max is None:
            late = [i for i, b in enumerate(self.ref.blocks) if b.scale is not None and b.eps_free and b.count == counts[i] + 1 == 1]
            # left to test_first_scaling_step_without_well_defined_gsnr
            assume(not late)
        before = [p.detach().clone() for p in self.params] if self.case.path == "fused" else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step()
            except (ValueError, RuntimeError) as error:
                if not self.may_refuse():
                    raise
                for i, (p, old) in enumerate(zip(self.params, before)):
                    assert torch.equal(p.detach(), old), f"fused=True refused step {t} ({error}) after changing block {i}"
                return False
        self.warnings += sum(map(is_degenerate_warning, caught))
        self.check(t)
        return True

    # ------------------------------------------------------------------ checks
    def check(self, t: int) -> None:
        opt, ref = self.opt, self.ref
        for i, p in enumerate(self.params):
            spec, group = self.specs[i]
            b = ref.blocks[i]
            state = opt.state.get(p, {})
            where = f"step {t}, block {i} {spec}"
            base, covered, base_initial = self.bases[i]
            assert (p.stride(), p.data_ptr()) == self.layout[i], f"{where}: not updated in place (strides or storage changed)"
            assert torch.equal(base[~covered], base_initial[~covered]), f"{where}: storage next to the parameter changed"
            if b.scale is None:
                assert "scale" not in state, f"{where}: deferred block got scale {state.get('scale')!r}"
                assert "momentum_buffer" not in state, f"{where}: deferred block has a momentum buffer"
                assert torch.equal(p.detach(), self.initial[i]), f"{where}: deferred block was changed"
                continue
            assert "scale" in state, f"{where}: no scale, reference has {b.status} gsnr {b.gsnr!r}"
            assert_rel(state["gsnr"], b.gsnr, SCALE_RTOL, f"{where}: gsnr ({b.status})")
            assert_rel(state["scale"], b.scale, SCALE_RTOL, f"{where}: scale ({b.status})")
            assert state.get("step") == b.count, f"{where}: step {state.get('step')!r}, reference {b.count}"
            if group.momentum == 0:
                assert "momentum_buffer" not in state, f"{where}: momentum=0 keeps a buffer"
            if i in self.overflowed:
                continue
            buf_dtype = self.buffer_dtype(i)
            limit = torch.finfo(real_dtype(spec.dtype)).max / 4
            if group.momentum != 0:
                limit = min(limit, torch.finfo(real_dtype(buf_dtype)).max / 4)
            if _max(b.mag_p) > limit or _max(b.mag_m) > limit:
                self.overflowed.add(i)  # beyond the dtype's range: not SGD-SaI's business
                continue
            tol = PARAM_RTOL[spec.dtype] * b.mag_p + SCALE_RTOL * b.mag_step + atol_of(spec.dtype)
            assert_within(p.detach(), b.param, tol, f"{where}: parameter")
            if group.momentum != 0:
                buf = state.get("momentum_buffer")
                assert buf is not None, f"{where}: no momentum buffer"
                assert buf.dtype == buf_dtype, f"{where}: momentum buffer dtype {buf.dtype}, expected {buf_dtype}"
                assert buf.shape == p.shape, f"{where}: momentum buffer shape {tuple(buf.shape)}"
                rtol = SR_RTOL if buf_dtype == BF16 and spec.dtype != BF16 else PARAM_RTOL[buf_dtype]
                assert_within(buf, b.buf, rtol * b.mag_m + atol_of(buf_dtype), f"{where}: momentum buffer")
        assert self.warnings <= 1, f"step {t}: the degenerate-block warning was issued {self.warnings} times"
        if len(ref.degenerate_blocks) > self.degenerate_before:
            assert self.warnings == 1, f"step {t}: degenerate blocks {ref.degenerate_blocks} scaled without a warning"
        if ref.scaling_started:
            assert opt.gsnr_max == (None if ref.gsnr_max is None else pytest.approx(ref.gsnr_max, rel=SCALE_RTOL)), (
                f"step {t}: gsnr_max {opt.gsnr_max!r}, reference {ref.gsnr_max!r}"
            )

    def round_trip(self) -> None:
        """Save the state dict with torch.save, load it into a new optimizer over copies of the
        parameters, check that every state entry came back identical, and continue with those."""
        blob = io.BytesIO()
        torch.save(self.opt.state_dict(), blob)
        blob.seek(0)
        saved = torch.load(blob)
        old_params, old_opt = self.params, self.opt
        self.params = list(old_params)
        for i, (spec, _) in enumerate(self.specs):
            self._add_param(old_params[i].detach(), spec, index=i)
        self.initial = [p.detach().clone() for p in self.params]  # deferred blocks: still their initial values
        assert self.build(), "a configuration the first optimizer accepted was refused"
        self.degenerate_before = len(self.ref.degenerate_blocks)
        self.opt.load_state_dict(saved)
        for i, (old, new) in enumerate(zip(old_params, self.params)):
            a, b = old_opt.state.get(old, {}), self.opt.state.get(new, {})
            assert set(a) == set(b), f"block {i} {self.specs[i][0]}: state keys {sorted(a)} came back as {sorted(b)}"
            for key, value in a.items():
                other = b[key]
                if torch.is_tensor(value):
                    assert other.dtype == value.dtype, f"block {i}: {key} {value.dtype} came back {other.dtype}"
                    assert torch.equal(other, value), f"block {i}: {key} values changed"
                else:
                    assert type(other) is type(value) and (other == value or value != value), (
                        f"block {i}: {key} {value!r} came back as {other!r}"
                    )
        assert self.opt.gsnr_max == old_opt.gsnr_max
        for k, (old_group, new_group) in enumerate(zip(old_opt.param_groups, self.opt.param_groups)):
            for key, value in old_group.items():
                if key != "params":
                    assert new_group.get(key) == value, f"group {k}: {key} {value!r} came back as {new_group.get(key)!r}"


def run_case(case: Case) -> Run:
    run = Run(case)
    if not run.build():
        return run
    for t, kinds in enumerate(case.grads, start=1):
        if not run.step(t, kinds):
            event("fused=True refused a step")
            return run
        if case.round_trip_after == t:
            run.round_trip()
    for i, b in enumerate(run.ref.blocks):  # coverage, shown by --hypothesis-show-statistics
        spec = run.specs[i][0]
        event(f"block {spec.dtype} {spec.layout}: {b.status or 'deferred'}{' (out of range)' if i in run.overflowed else ''}")
    return run


# --------------------------------------------------------------------------- properties


@budget(2.0)
@given(case=cases())
def test_matches_reference(case):
    """Contiguous real blocks of every shape class and dtype, every gradient kind, group option and path.

    Left to dedicated tests: other layouts, complex, per-group maximize, the round trip, fp16
    momentum, fused=True on blocks it cannot run, and a first scaling step without a well-defined g-SNR."""
    run_case(case)


@budget(0.4)
@given(
    case=cases(
        momentum_dtypes=MOMENTUM_DTYPES, max_groups=2, max_blocks=2, kinds=("random", "random", "constant", "mean", "zero", "absent")
    )
)
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (4,)),), momentum_dtype=F16),),
        grads=(("random",), ("random",)),
    )
)
def test_every_momentum_dtype(case):
    """momentum_dtype in {None, bf16, fp16, fp32, fp64} for every parameter dtype and path."""
    run_case(case)


@budget(0.8)
@given(
    case=cases(
        dtypes=(F32, F64, BF16),
        layouts=LAYOUTS,
        shape_classes=("small", "small", "one", "empty"),
        kinds=("random", "random", "mean", "constant", "zero", "absent"),
    )
)
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (4, 3), "strided"),)),),
        grads=(("random",), ("random",)),
    )
)
def test_layouts_match_reference(case):
    """Sliced, strided, transposed and channels_last parameters (gradients in their layout or contiguous):
    same updates, same strides and storage, neighbouring storage untouched."""
    run_case(case)


@budget(0.4)
@given(case=cases(dtypes=(F32, F64), group_maximize=True, momentum_dtypes=(None,)))
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (3,)),), maximize=True), GroupSpec(blocks=(BlockSpec(F32, (3,)),))),
        grads=(("random", "random"),),
    )
)
def test_per_group_maximize(case):
    """``maximize`` set per parameter group (True in one, False or unset in another)."""
    run_case(case)


@budget(0.8)
@given(case=cases(min_steps=2, max_steps=5, round_trip=True))
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (4,)),), momentum_dtype=BF16),),
        grads=(("random",), ("random",)),
        round_trip_after=1,
    )
)
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(BF16, (4,)),), momentum_dtype=F32),),
        grads=(("random",), ("random",)),
        round_trip_after=1,
    )
)
def test_state_dict_round_trip(case):
    """torch.save/torch.load of the state dict at a random step: every entry (dtype included) comes back
    identical, and the resumed optimizer continues along the reference."""
    run_case(case)


@budget(0.4)
@given(case=cases(dtypes=COMPLEX + (F32,), paths=("default", "loop", "foreach"), momentum_dtypes=(None,)))
@example(case=Case(groups=(GroupSpec(blocks=(BlockSpec(C64, (4,)),)),), grads=(("random",),)))
def test_complex_blocks_match_reference(case):
    """Complex parameters: ||g||^2 = sum |g|^2, unbiased var = sum |g - mean|^2 / (n - 1), as torch.std."""
    run_case(case)


@budget(0.5)
@given(case=cases(dtypes=REAL + COMPLEX, paths=("fused",), valid_fused=False))
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (4,)),)), GroupSpec(blocks=(BlockSpec(BF16, (4,)),))),
        grads=(("random", "random"),),
        path="fused",
    )
)
def test_fused_on_blocks_it_cannot_run(case):
    """fused=True with blocks the fused kernels cannot run (half precision and complex on CPU, other
    momentum dtypes, non-contiguous): every block is updated like the reference (sai_hf's documented
    per-block fallback), or the step raises ValueError/RuntimeError with no weight changed."""
    run_case(case)


@budget(0.5)
@given(
    case=cases(
        shape_classes=("empty", "one", "small"),
        kinds=("zero", "nonfinite", "absent", "random", "constant"),
        max_steps=5,
    )
)
def test_deferred_and_empty_blocks_stay_untouched(case):
    """Absent, zero, NaN/inf first gradients and empty blocks: no scale, no buffer, bit-identical
    weights until the first usable gradient; no NaN anywhere; empty blocks are never scaled."""
    run = run_case(case)
    for i, (p, (spec, _)) in enumerate(zip(run.params, run.specs)):
        state = run.opt.state.get(p, {})
        if p.numel() == 0:
            assert not state, f"empty block {i} {spec} has state {sorted(state)}"
        assert not torch.isnan(p.detach()).any(), f"block {i} {spec} has NaN"
        assert all(not torch.is_tensor(v) or not v.isnan().any() for v in state.values()), f"block {i}: NaN in state"


@budget(0.3)
@given(
    shape=st.sampled_from([(64, 64), (4096,), (33, 31)]),
    kinds=st.lists(st.sampled_from(["random", "constant", "mean"]), min_size=2, max_size=4),
    momentum=st.sampled_from([0.9, 0.5, 0.99]),
    path=st.sampled_from(["default", "foreach", "loop"]),
    seed=st.integers(0, 2**16),
)
def test_bf16_momentum_rounding_is_unbiased(shape, kinds, momentum, path, seed):
    """fp32 parameters, bfloat16 momentum: given the previous stored buffer, every new buffer entry is
    one of the two bfloat16 neighbours of the exact momentum, and the rounding errors sum to zero
    within 6 standard deviations of unbiased, independent stochastic rounding."""
    case = Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, shape), BlockSpec(F32, (8,))), lr=0.01, momentum=momentum, momentum_dtype=BF16),),
        grads=tuple((k, "random") for k in kinds),
        path=path,
        seed=seed,
    )
    run = Run(case)
    assert run.build()
    for t, row in enumerate(case.grads, start=1):
        p = run.params[0]
        assert run.step(t, row)  # re-anchors the reference to the stored buffer first
        block = run.ref.blocks[0]
        exact = block.buf
        stored = run.opt.state[p]["momentum_buffer"].double()
        down, up = bf16_neighbours(exact)
        slack = 4 * UNIT[F32] * block.mag_m  # the float32 arithmetic before the rounding
        low, high = torch.minimum(down, up) - slack, torch.maximum(down, up) + slack
        outside = ~((stored >= low) & (stored <= high))
        assert not bool(outside.any()), f"step {t}: {int(outside.sum())} buffer entries are not bf16 neighbours of the momentum"
        clean = slack < 1e-3 * (up - down).abs()  # entries whose float32 value has no rounding doubt
        variance = ((up - exact) * (exact - down)).abs()[clean].sum().item()
        if variance > 0:
            z = (stored - exact)[clean].sum().item() / math.sqrt(variance)
            assert abs(z) <= 6, f"step {t}: rounding bias z = {z:.1f} (kinds {kinds})"


LARGE_SHAPES = [(1 << 20,), (1000, 1001)]


@budget(0.04)
@given(
    shape=st.sampled_from(LARGE_SHAPES),
    dtype=st.sampled_from([F32, BF16]),
    first=st.sampled_from(["constant:0.1", "random", "mean", "constant:-3.7", "tiny", "huge", "zero"]),
    path=st.sampled_from(["default", "foreach", "loop"]),
    seed=st.integers(0, 3),
)
@example(shape=(1 << 20,), dtype=F32, first="constant:0.1", path="default", seed=0)
@example(shape=(1000, 1001), dtype=F32, first="mean", path="foreach", seed=1)
def test_large_blocks_match_reference(shape, dtype, first, path, seed):
    """Blocks of >= 1M entries (the CPU statistics are chunked there): a constant first gradient is
    DEGENERATE, mean-dominated / tiny / huge ones get the float64 g-SNR."""
    case = Case(
        groups=(GroupSpec(blocks=(BlockSpec(dtype, shape), BlockSpec(F32, (8, 8))), lr=0.01, weight_decay=0.1),),
        grads=((first, "random"), ("random", "random")),
        path=path,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_case(case)


@budget(0.3)
@given(
    case=cases(
        dtypes=(F32, F64),
        shape_classes=("one", "0d", "small"),
        kinds=("constant", "absent", "random", "zero"),
        min_steps=2,
        only_defined_gsnr_max=False,
    )
)
@example(
    case=Case(
        groups=(GroupSpec(blocks=(BlockSpec(F32, (1,)), BlockSpec(F32, (3,)), BlockSpec(F32, (1,)))),),
        grads=(("random", "absent", "absent"), ("random", "random", "random")),
    )
)
def test_first_scaling_step_without_well_defined_gsnr(case):
    """Degenerate blocks only at the first scaling step: they get g-SNR 1.0 (scale 1.0); gsnr_max is
    then set by the first later step with a well-defined g-SNR, which later degenerate blocks get and
    later blocks are divided by under normalize="max"."""
    run_case(case)


@pytest.mark.slow  # ~40 s with a cold inductor cache on 2 cores (~13 s warm)
def test_compiled_step_matches_reference():
    """``torch.compile`` of a function calling ``opt.step()``: three steps against the reference."""
    torch._dynamo.reset()  # no guards left by other tests' compiled steps (same code objects)
    gen = torch.Generator().manual_seed(0)
    shapes_ = [(16, 8), (8,), (5, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_]
    opt = SGDSaI(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    ref = ReferenceSGDSaI([dict(params=params, lr=0.05, momentum=0.9, weight_decay=0.1)])

    @torch.compile
    def compiled_step():
        opt.step()

    for t in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes_]
        for p, g in zip(params, grads):
            p.grad = g
        compiled_step()
        ref.step(grads)
        for i, (p, b) in enumerate(zip(params, ref.blocks)):
            assert_rel(opt.state[p]["scale"], b.scale, SCALE_RTOL, f"step {t + 1}, block {i}: scale")
            tol = PARAM_RTOL[F32] * b.mag_p + SCALE_RTOL * b.mag_step
            assert_within(p.detach(), b.param, tol, f"step {t + 1}, block {i}: parameter")
            assert_within(opt.state[p]["momentum_buffer"], b.buf, PARAM_RTOL[F32] * b.mag_m, f"step {t + 1}, block {i}: buffer")
