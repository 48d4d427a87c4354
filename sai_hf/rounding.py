"""Stochastic rounding of float32 to bfloat16: the counter-based hash that every update path uses.

With ``b`` the float32 bits of element ``i`` of a tensor (an int32), all arithmetic mod 2^32 and ``>>>`` the logical
shift::

    x      = (b + i) xor c(seed)
    x      = (x xor (x >>> 16)) * M1;   x = (x xor (x >>> 15)) * M2      (the "lowbias32" mix)
    u_i    = x >>> 16                                                  (top 16 bits)
    result = top 16 bits of  b + u_i                                   (a bfloat16 bit pattern)

``c(seed)`` (:func:`seed_offset`) is a pseudo-random 32-bit key and each mixing step a bijection (odd ``M1``, ``M2``), so
``u_i`` is uniform on ``[0, 2^16)`` and ``E[result] = x``; the index decorrelates equal entries, the mix consecutive
steps. No generator state is kept: a run and its resumed run round alike. The torch-ops paths, the Triton kernel and
the C loop take the same constants and seeds from here (tested bit for bit against :func:`round_bits_into`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MIX_1", "MIX_2", "SLAB", "element_index", "round_bits_into", "rounding_seed", "seed_offset", "slab_size",
           "stochastic_round_to_bf16"]  # fmt: skip

#: The two odd multipliers of the hash (Chris Wellons' "lowbias32"), as signed int32.
MIX_1 = 0x7FEB352D
MIX_2 = 0x846CA68B - (1 << 32)
#: Elements per slab of the torch-ops rounding and bfloat16-momentum update: the slab's float32
#: values and int32 hash stay in cache across the update's elementwise passes.
SLAB = 1 << 18
_MASK64 = (1 << 64) - 1


def rounding_seed(step: int, index: int) -> int:
    """The rounding seed of block ``index`` (its position in the call) at its update count ``step``."""
    return (step + 1) * 1_000_003 + index


def seed_offset(seed: int) -> int:
    """``c(seed)``: a pseudo-random unsigned 32-bit key derived from ``seed`` (the splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0xFFFF_FFFF


def slab_size(numel: int) -> int:
    return max(1, min(numel, SLAB))


def _wrap_int32(value: int) -> int:
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def element_index(length: int, device: torch.device) -> Tensor:
    """``j = 0..length-1`` as int32 (the flat index of an element within its slab)."""
    return torch.arange(length, dtype=torch.int32, device=device)


def round_bits_into(out: Tensor, bits: Tensor, index: Tensor, first_index: int, seed: int) -> None:
    """Write into int16 ``out`` the bfloat16 bits of float32 ``bits`` (viewed as int32; flat
    elements ``first_index + index`` of their tensor, ``index`` from :func:`element_index`)
    stochastically rounded (equations in the module docstring; int32 arithmetic wraps)."""
    h = torch.add(bits, index + _wrap_int32(first_index)).bitwise_xor_(_wrap_int32(seed_offset(seed)))  # (b + i) xor c
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16).bitwise_and_(0xFFFF)).mul_(MIX_1)  # x ^= x >>> 16; x *= M1
    h.bitwise_xor_(torch.bitwise_right_shift(h, 15).bitwise_and_(0x1FFFF)).mul_(MIX_2)  # x ^= x >>> 15; x *= M2
    h.bitwise_right_shift_(16).bitwise_and_(0xFFFF).add_(bits)  # b + (x >>> 16) (mod 2^32)
    out.copy_(h.bitwise_right_shift_(16))  # its top 16 bits


# Run eagerly under torch.compile: inductor's index arithmetic overflows on the wrapping int32 hash.
@torch.compiler.disable
def stochastic_round_to_bf16(x: Tensor, seed: int) -> Tensor:
    """``x`` (computed in float32) rounded to bfloat16 stochastically: unbiased, deterministic per
    ``seed`` (equations in the module docstring). Slab by slab (:data:`SLAB` elements)."""
    bits = x.detach().to(torch.float32).contiguous().view(-1).view(torch.int32)
    out = torch.empty(bits.shape, dtype=torch.int16, device=bits.device)
    numel = bits.numel()
    size = slab_size(numel)
    index = element_index(size, bits.device)
    for start in range(0, numel, size):
        end = min(numel, start + size)
        round_bits_into(out[start:end], bits[start:end], index[: end - start], start, seed)
    return out.view(torch.bfloat16).view(x.shape)
