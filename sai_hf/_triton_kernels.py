"""The Triton kernel behind :mod:`sai_hf.triton_update` (import that, not this).

Loaded at most twice: compiled for CUDA, and as a private copy decorated while ``TRITON_INTERPRET=1`` (``triton.jit``
picks the mode when it decorates). A launch's argument is a *table* (int64, field-major: ``table[field * n + t]``)
describing each tensor ``t``: addresses, size, first program id and, for the update, its first-update flag, rounding
offset and two float64 factors. Program ``pid`` finds its tensor by a binary search of the first-program row, then
processes up to ``CHUNK_BLOCKS`` blocks of ``BLOCK`` elements: full blocks unmasked, a tail block masked.
"""

import triton
import triton.language as tl

from .rounding import MIX_1, MIX_2

# Rows of the table (see the module docstring), as constexprs (the only globals a kernel may read).
# Rows up to _SEED_OFFSET hold ints; _STEP_SIZE and _KEEP hold float64 bit patterns.
_P_PTR, _G_PTR, _M_PTR, _NUMEL, _FIRST_PROGRAM, _IS_FIRST, _SEED_OFFSET, _STEP_SIZE, _KEEP = map(tl.constexpr, range(9))
N_INT_FIELDS = 7
N_FIELDS = 9
#: The two odd multipliers of the rounding hash (:mod:`sai_hf.rounding`), as unsigned 32-bit constants.
_MIX_1, _MIX_2 = tl.constexpr(MIX_1 & 0xFFFFFFFF), tl.constexpr(MIX_2 & 0xFFFFFFFF)

# Element kinds (``KIND`` constexprs, :func:`sai_hf.triton_update.dtype_code`): 0 float32, 1 float16,
# 2 bfloat16, handled as its 16-bit pattern (uint16) with integer conversions, so that the compiled
# kernel and the interpreter round exactly alike.


@triton.jit
def _typed_pointer(address, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 ``address`` as a pointer to elements of ``KIND`` (bfloat16 as uint16)."""
    if KIND == 2:
        ptr = address.to(tl.pointer_type(tl.uint16))
    elif KIND == 1:
        ptr = address.to(tl.pointer_type(tl.float16))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address of the launch is a multiple of 16 bytes (checked on the host)
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_f32(address, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    x = tl.load(_typed_pointer(address, KIND, ALIGNED) + offs, mask=mask)
    if KIND == 2:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # exact
    else:
        return x.to(tl.float32)


@triton.jit
def _bf16_nearest_bits(x):
    """Bits of ``x`` (float32) rounded to the nearest bfloat16, ties to even (as torch's
    ``.to(torch.bfloat16)``; NaN becomes 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _bf16_stochastic_bits(x, index, seed_offset):
    """Bits of ``x`` (float32) stochastically rounded to bfloat16, exactly as
    ``sai_hf.rounding.stochastic_round_to_bf16``: with ``b`` the float32 bits of the element at
    flat index ``i`` of its tensor, ``u`` = the top 16 bits of the lowbias32 mix of ``(b + i) xor c``
    and the result is the top 16 bits of ``b + u``. All arithmetic is on uint32, so it wraps mod 2^32
    and ``>>`` is the logical shift."""
    bits = x.to(tl.uint32, bitcast=True)
    h = (bits + index) ^ seed_offset
    h = (h ^ (h >> 16)) * _MIX_1
    h = (h ^ (h >> 15)) * _MIX_2
    return ((bits + (h >> 16)) >> 16).to(tl.uint16)


@triton.jit
def _store_f32(address, offs, mask, x, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = _typed_pointer(address, KIND, ALIGNED) + offs
    if KIND == 2:
        tl.store(ptr, _bf16_nearest_bits(x), mask=mask)
    elif KIND == 1:
        tl.store(ptr, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _update_block(
    p_address, g_address, m_address, offs, mask, step_size, keep, mu, one_minus_mu, is_first, seed_offset,
    P_KIND: tl.constexpr, G_KIND: tl.constexpr, M_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    STOCHASTIC: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    g = _load_f32(g_address, offs, mask, G_KIND, ALIGNED)
    if MAXIMIZE:
        g = -g
    if HAS_MOMENTUM:
        if is_first:
            m = g
        else:
            m = mu * _load_f32(m_address, offs, mask, M_KIND, ALIGNED) + one_minus_mu * g
        if STOCHASTIC:
            ptr = _typed_pointer(m_address, 2, ALIGNED) + offs
            tl.store(ptr, _bf16_stochastic_bits(m, offs.to(tl.uint32), seed_offset), mask=mask)
        else:
            _store_f32(m_address, offs, mask, m, M_KIND, ALIGNED)
    else:
        m = g
    p = _load_f32(p_address, offs, mask, P_KIND, ALIGNED)
    _store_f32(p_address, offs, mask, p * keep + step_size * m, P_KIND, ALIGNED)


@triton.jit
def _owner(table, n_tensors, search_steps, pid, FIRST_PROGRAM_ROW: tl.constexpr):
    """The tensor of program ``pid``: the largest ``t`` with ``first_program[t] <= pid`` (a binary
    search of the table's non-decreasing first-program row)."""
    lo = pid * 0
    hi = lo + n_tensors
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(table + FIRST_PROGRAM_ROW * n_tensors + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def sgd_sai_kernel(
    table, n_tensors, search_steps, mu, one_minus_mu,
    P_KIND: tl.constexpr, G_KIND: tl.constexpr, M_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, STOCHASTIC: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = _owner(table, n_tensors, search_steps, pid, _FIRST_PROGRAM)

    numel = tl.load(table + _NUMEL * n_tensors + t)
    start = (pid - tl.load(table + _FIRST_PROGRAM * n_tensors + t)) * (BLOCK * CHUNK_BLOCKS)  # int64
    end = tl.minimum(start + BLOCK * CHUNK_BLOCKS, numel)
    p_address = tl.load(table + _P_PTR * n_tensors + t)
    g_address = tl.load(table + _G_PTR * n_tensors + t)
    m_address = tl.load(table + _M_PTR * n_tensors + t)
    is_first = tl.load(table + _IS_FIRST * n_tensors + t) != 0
    seed_offset = tl.load(table + _SEED_OFFSET * n_tensors + t).to(tl.uint32)
    step_size = tl.load(table + _STEP_SIZE * n_tensors + t).to(tl.float64, bitcast=True).to(tl.float32)
    keep = tl.load(table + _KEEP * n_tensors + t).to(tl.float64, bitcast=True).to(tl.float32)

    lanes = tl.arange(0, BLOCK)
    n_full = (end - start) // BLOCK
    for k in range(n_full):
        _update_block(
            p_address, g_address, m_address, start + k * BLOCK + lanes, None, step_size, keep, mu, one_minus_mu,
            is_first, seed_offset, P_KIND, G_KIND, M_KIND, HAS_MOMENTUM, STOCHASTIC, MAXIMIZE, ALIGNED,
        )  # fmt: skip
    tail = start + n_full * BLOCK
    if tail < end:
        offs = tail + lanes
        _update_block(
            p_address, g_address, m_address, offs, offs < end, step_size, keep, mu, one_minus_mu,
            is_first, seed_offset, P_KIND, G_KIND, M_KIND, HAS_MOMENTUM, STOCHASTIC, MAXIMIZE, ALIGNED,
        )  # fmt: skip
