"""The whole SGD-SaI update of a large CPU block as one compiled loop (``torch.compile``, inductor's C++).

For every element, in the block's precision (float32, or float64 for a float64 block)::

    g <- -g                              if maximize
    m <- g                               if first      (the block's first update: m_1 = g_1)
    m <- mu * m + (1 - mu) * g           otherwise     (momentum != 0)
    p <- p * decay + step_size * m                     (decay = 1 - lr * wd; step_size = -lr * s_i)

These are the Triton kernel's operations (:mod:`sai_hf.triton_update`), each rounded separately
(inductor compiles its C++ without floating-point contraction), so a float32 block gets bit for bit
the Triton kernel's result. One loop reads ``p, g, m`` and writes ``p, m`` once: the memory floor,
decoupled decay included. torch's fused SGD kernel has no decoupled decay, and running ``p *= decay``
before it, slab by slab in cache, still costs ~50% more on a 38.6M-entry block (measured on 2 Xeon
cores: fused SGD without decay 15.3 ms, slab path 23.0 ms, this loop 16.0 ms).

A bfloat16 buffer of a float32 block takes two loops per slab of :data:`SLAB` entries: ``m`` into a
cache-resident float32 scratch, then its stochastic rounding into the buffer (the hash of
:func:`sai_hf.functional.stochastic_round_to_bf16`, bit for bit given ``m``) and the parameter
update. The rounding reads ``m``'s bits through an int32 view of the scratch: inductor's vectorised
code spills a float-to-int bitcast inside a loop to the stack (3x slower, measured).

The loops are compiled once per process and dtype (~10 s cold on 2 cores, ~3 s from inductor's
on-disk cache in later processes); :func:`prepare` compiles them ahead (``SGDSaI`` calls it at
construction when it has blocks that will use them). :func:`compiled_update_available` says whether
they can run here: ``torch.compile`` works on this machine (a C++ compiler, dynamo not disabled, no
eager ``torch.compiler`` stance). Where not, ``sai_hf.functional`` keeps its slab path (same
equations, different rounding order).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch._dynamo
from torch import Tensor

from .functional import _seed_offset, _wrap_int32, stochastic_bf16_bits

__all__ = ["compiled_update_available", "cpu_sgd_sai_", "prepare", "takes", "MIN_NUMEL", "SLAB"]

#: Blocks of fewer elements keep torch's fused kernel: a compiled call costs ~30 us on the host, the
#: decay pass it saves ~0.2 ns per element (measured on 2 cores: break-even near 2^17).
MIN_NUMEL = 1 << 18
#: Elements per slab of the bfloat16-buffer update (its float32 scratch, 4 MiB, stays in cache).
SLAB = 1 << 20
#: dtypes of (parameter, gradient, buffer) that the loops take.
SUPPORTED = {
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),
    (torch.float32, torch.float32, torch.bfloat16),
}
#: dynamo stances under which the loops run compiled (``force_eager`` and ``eager_on_recompile``
#: would run them as whole-block eager ops: several passes and block-sized temporaries).
_COMPILING_STANCES = ("default", "fail_on_recompile")

# The loops. ``c`` holds the block's scalars as one float64 tensor (one guard and one host-to-tensor
# conversion per call instead of one per float): ``c = [sign, mu, 1 - mu, decay, step_size]``, ``sign``
# being -1 under maximize. A float64 scalar does not promote a float32 tensor: float32 blocks compute
# with the scalars rounded to float32, as the Triton kernel does.
SIGN, MU, ONE_MINUS_MU, DECAY, STEP_SIZE = range(5)


def _plain(p: Tensor, g: Tensor, c: Tensor) -> None:
    """``momentum == 0``: ``p <- p * decay + step_size * (sign * g)``."""
    p.copy_(p * c[DECAY] + c[STEP_SIZE] * (g * c[SIGN]))


def _first(p: Tensor, g: Tensor, m: Tensor, c: Tensor) -> None:
    """The first update: ``m <- sign * g``; ``p <- p * decay + step_size * m``."""
    d = g * c[SIGN]
    m.copy_(d)
    p.copy_(p * c[DECAY] + c[STEP_SIZE] * d)


def _momentum(p: Tensor, g: Tensor, m: Tensor, c: Tensor) -> None:
    """``m <- mu * m + (1 - mu) * (sign * g)``; ``p <- p * decay + step_size * m``."""
    new_m = c[MU] * m + c[ONE_MINUS_MU] * (g * c[SIGN])
    m.copy_(new_m)
    p.copy_(p * c[DECAY] + c[STEP_SIZE] * new_m)


def _bf16_momentum(g: Tensor, buf: Tensor, out: Tensor, c: Tensor) -> None:
    """``out <- mu * float(buf) + (1 - mu) * (sign * g)`` (float32 scratch)."""
    out.copy_(c[MU] * buf.float() + c[ONE_MINUS_MU] * (g * c[SIGN]))


def _bf16_first(g: Tensor, out: Tensor, c: Tensor) -> None:
    """``out <- sign * g`` (float32 scratch)."""
    out.copy_(g * c[SIGN])


def _round_and_update(p: Tensor, m: Tensor, m_bits: Tensor, buf_bits: Tensor, first_index: int, key: int, c: Tensor) -> None:
    """``buf <- stochastic_round_to_bf16(m)`` (``m_bits``: ``m`` viewed as int32; ``buf_bits``: the
    buffer viewed as int16; ``first_index``: the flat index of ``m[0]`` in its block, ``key``: the
    seed's key, both wrapped to int32) and ``p <- p * decay + step_size * m``."""
    index = torch.arange(m.numel(), dtype=torch.int32, device=m.device) + first_index
    buf_bits.copy_(stochastic_bf16_bits(m_bits, index, key))
    p.copy_(p * c[DECAY] + c[STEP_SIZE] * m)


class CompiledLoops:
    """The compiled loops of this process, and whether they can be compiled here at all.

    :meth:`run` always completes the update it is given: where compilation fails (no C++ compiler,
    an inductor error, a recompile refused by the user's ``torch.compiler`` stance) the same function
    runs eagerly (the same operations, so the same result), ``failure`` records why, a warning says
    so once, and :func:`takes` sends later blocks to the slab path of :mod:`sai_hf.functional`."""

    FUNCTIONS: dict[str, Callable[..., None]] = {
        "plain": _plain,
        "first": _first,
        "momentum": _momentum,
        "bf16_momentum": _bf16_momentum,
        "bf16_first": _bf16_first,
        "round_and_update": _round_and_update,
    }

    def __init__(self) -> None:
        self.failure: str | None = None
        self._compiled: dict[str, Callable[..., None]] = {}
        try:  # torch.compile itself refuses some Python versions
            self._compiled = {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in self.FUNCTIONS.items()}
        except Exception as err:
            self._fail(err)

    def usable(self) -> bool:
        """Whether the loops run compiled now: no failure so far, dynamo enabled, a compiling stance."""
        if self.failure is not None or torch._dynamo.config.disable:
            return False
        stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
        return stance in _COMPILING_STANCES

    def run(self, name: str, *args: object) -> None:
        """Run loop ``name``: compiled where it can be, else eagerly."""
        if self.usable():
            try:
                with torch.no_grad():
                    self._compiled[name](*args)
                return
            except Exception as err:  # compilation fails before the loop writes anything
                self._fail(err)
        with torch.no_grad():
            self.FUNCTIONS[name](*args)

    def _fail(self, err: Exception) -> None:
        cause = getattr(err, "inner_exception", None) or err.__cause__ or err
        lines = [line for line in str(cause).splitlines() if line.strip()]
        self.failure = f"{type(cause).__name__}: {lines[0].strip() if lines else ''}"
        warnings.warn(
            f"sai_hf: the compiled CPU update is not available here ({self.failure}); large CPU blocks "
            "take the slab path (same equations, more passes over memory with weight decay)",
            RuntimeWarning,
            stacklevel=2,
        )


@functools.cache
def _loops() -> CompiledLoops:
    return CompiledLoops()


def compiled_update_available() -> bool:
    """Whether :func:`cpu_sgd_sai_` runs compiled loops in this process now (checked without
    compiling: a failed compilation makes it False from then on)."""
    return _loops().usable()


def takes(param: Tensor, grad_dtype: torch.dtype, buf_dtype: torch.dtype) -> bool:
    """Whether the compiled loops update this block: CPU, at least :data:`MIN_NUMEL` elements, a
    supported dtype combination (contiguity is the caller's check), and the loops usable here."""
    return (
        param.device.type == "cpu"
        and param.numel() >= MIN_NUMEL
        and (param.dtype, grad_dtype, buf_dtype) in SUPPORTED
        and compiled_update_available()
    )


def _alias(flat: Tensor, start: int, end: int) -> Tensor:
    """``flat[start:end]`` as a tensor that is not a view (``detach``): dynamo guards on a view's
    relation to its base, so views of differently sized bases would each compile the loop again."""
    return flat[start:end].detach()


def _slabs(numel: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the bfloat16 update's slabs: :data:`SLAB` elements each, the last one
    longer by one element rather than one element long (dynamo compiles size 1 apart)."""
    start = 0
    while start < numel:
        end = numel if numel - start <= SLAB + 1 else start + SLAB
        yield start, end
        start = end


def _block(loops: CompiledLoops, p: Tensor, g: Tensor, m: Tensor | None, c: Tensor, first: bool, seed: int, scratch: Tensor | None) -> None:
    if m is None:
        loops.run("plain", p, g, c)
    elif m.dtype == p.dtype:
        loops.run("first" if first else "momentum", p, g, m, c)
    else:
        assert scratch is not None
        key = _wrap_int32(_seed_offset(seed))
        m_bits, buf_bits = scratch.view(torch.int32), m.view(torch.int16)
        for start, end in _slabs(p.numel()):
            value, bits = _alias(scratch, 0, end - start), _alias(m_bits, 0, end - start)
            if first:
                loops.run("bf16_first", _alias(g, start, end), value, c)
            else:
                loops.run("bf16_momentum", _alias(g, start, end), _alias(m, start, end), value, c)
            loops.run("round_and_update", _alias(p, start, end), value, bits, _alias(buf_bits, start, end), _wrap_int32(start), key, c)


def cpu_sgd_sai_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor | None] | None,
    step_sizes: Sequence[float],
    *,
    decay: float,
    momentum: float,
    first: Sequence[bool],
    maximize: bool,
    seeds: Sequence[int],
) -> None:
    """Apply one SGD-SaI step in place to each block (the arguments of
    :func:`sai_hf.triton_update.triton_sgd_sai_`; tensors flat-viewable: contiguous, CPU, dtypes in
    :data:`SUPPORTED`)."""
    loops = _loops()
    rows = [[-1.0 if maximize else 1.0, momentum, 1.0 - momentum, decay, s] for s in step_sizes]
    constants = torch.tensor(rows, dtype=torch.float64, device="cpu")
    scratch = None
    for i, (p, g) in enumerate(zip(params, grads)):
        m = buffers[i] if buffers is not None and momentum != 0 else None
        if m is not None and m.dtype != p.dtype and scratch is None:
            scratch = torch.empty(min(SLAB + 1, max(x.numel() for x in params)), dtype=torch.float32, device="cpu")
        flat_m = m.view(-1).detach() if m is not None else None
        _block(loops, p.view(-1).detach(), g.view(-1).detach(), flat_m, constants[i].detach(), bool(first[i]), int(seeds[i]), scratch)


def prepare(pairs: set[tuple[torch.dtype, torch.dtype | None]]) -> None:
    """Compile the loops that blocks of these ``(parameter dtype, buffer dtype or None for no
    momentum)`` pairs will run, first and later updates, on scratch tensors (of two slabs for a
    bfloat16 buffer: the first slab's index offset, 0, is compiled as a constant, the others' as a
    variable). Warnings that torch's compiler stack raises while compiling are its own, not the
    user's: they are silenced here (under ``-W error`` they would fail the compilation)."""
    for param_dtype, buf_dtype in sorted(pairs, key=str):
        if (param_dtype, param_dtype, buf_dtype or param_dtype) not in SUPPORTED or not compiled_update_available():
            continue
        numel = MIN_NUMEL if buf_dtype in (None, param_dtype) else SLAB + MIN_NUMEL
        p = torch.zeros(numel, dtype=param_dtype, device="cpu")
        m = torch.zeros(numel, dtype=buf_dtype, device="cpu") if buf_dtype is not None else None
        momentum = 0.9 if m is not None else 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for first in (True, False) if m is not None else (True,):
                cpu_sgd_sai_([p], [torch.zeros_like(p)], [m], [0.0], decay=1.0, momentum=momentum, first=[first], maximize=False, seeds=[0])
