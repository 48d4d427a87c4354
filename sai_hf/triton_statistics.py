"""The first step's g-SNR sums of many gradients in one Triton launch per dtype group (CUDA).

For every gradient ``b`` with ``n_b`` entries: its sum ``S_b`` and centred sum of squares ``C_b`` in float64 (the
inputs of :mod:`sai_hf.gsnr`'s rows). Each program reduces one tile ``r`` of ``BLOCK`` entries two-pass in registers
(centred values, no cancellation); the tiles of each gradient are combined on the device (Chan et al.)::

    S_b = sum_r S_r;     C_b = sum_r C_r + sum_r m_r (S_r / m_r - S_b / n_b)^2

with ``torch.segment_reduce`` (deterministic, no atomics), under the gradients' device guard and without a host sync.
Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .triton_update import BLOCK, NUM_WARPS, SUPPORTED_DTYPES, aligned, device_guard, dtype_code, first_programs, kernel_module, triton_available

__all__ = ["triton_sums", "takes"]


def takes(g: Tensor) -> bool:
    """Whether :func:`triton_sums` reduces this gradient: non-empty, contiguous, a supported dtype, on
    a device the Triton kernels run on."""
    return g.numel() > 0 and g.is_contiguous() and g.dtype in SUPPORTED_DTYPES and triton_available(g.device)


def triton_sums(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(n, sums)``: float64 entry counts ``n_b`` ``(B,)`` and ``[S_b, C_b]`` ``(B, 2)`` of each gradient
    (all on one device, each :func:`takes`), on that device (equations in the module docstring);
    launched under that device's guard."""
    if not grads:
        raise ValueError("triton_sums: no gradients")
    device = grads[0].device
    if any(g.device != device or not takes(g) for g in grads):
        raise ValueError(f"triton_sums: every gradient must be a non-empty contiguous {SUPPORTED_DTYPES} tensor on {device}")
    kernels = kernel_module()
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((dtype_code(g.dtype, "grad"), aligned(g)), []).append(i)

    def to_device(host: Tensor) -> Tensor:  # no sync: from pinned memory, non-blocking
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)

    order = [i for indices in groups.values() for i in indices]
    tiles_of = [-(-grads[i].numel() // BLOCK) for i in order]
    with device_guard(device):
        tiles = torch.empty((sum(tiles_of), kernels.N_TILE_COLUMNS), dtype=torch.float64, device=device)
        start = 0
        for (kind, is_aligned), indices in groups.items():
            first_program, programs = first_programs([grads[i].numel() for i in indices], BLOCK)
            host = torch.tensor([[grads[i].data_ptr() for i in indices], [grads[i].numel() for i in indices], first_program], dtype=torch.int64)
            kernels.tile_statistics_kernel[(programs,)](
                to_device(host), len(indices), (len(indices) - 1).bit_length(), tiles[start : start + programs],
                KIND=kind, ALIGNED=is_aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
                enable_fp_fusion=False,  # as the update kernel: each float64 operation rounded separately
            )  # fmt: skip
            start += programs
        lengths = to_device(torch.tensor(tiles_of, dtype=torch.int64))
        m, tile_sum, tile_centred = tiles.unbind(1)

        def per_gradient(values: Tensor) -> Tensor:
            return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)

        n, total = per_gradient(m), per_gradient(tile_sum)
        mean = torch.repeat_interleave(total / n, lengths, output_size=tiles.shape[0])
        centred = per_gradient(tile_centred) + per_gradient(m * (tile_sum / m - mean).square())
        inverse = to_device(torch.argsort(torch.tensor(order, dtype=torch.int64)))  # back to the callers' order
        return n[inverse], torch.stack((total, centred), dim=1)[inverse]
