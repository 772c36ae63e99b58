"""Append one decode step's key and value to a static 16-bit window, in one launch.

A static (CUDA-graph) decode step writes each layer's new token into a fixed window buffer at a
position only the device knows, and counts it. As torch ops that is four kernels a layer (two
``index_copy_``, two counter increments: about 0.24 ms of an 8B step at 8 x 32K on the H200, for a
few kilobytes); here one program a (row, head) reads its own length, writes the key and value
there, and counts the token. ``append_reference`` is the pure-torch definition (and the CPU path).

``keys`` [B, H, W, D] and ``values`` [B, H, W, Dv] (contiguous) are the windows; ``key`` [B, H, 1, D]
and ``value`` [B, H, 1, Dv] the new token (any strides, any float dtype: stored in the windows');
``lens`` [B, H] int32: tokens filled per row and head, all equal (the next token's position), + 1
after the call.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def append_reference(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     lens: torch.Tensor) -> None:
    pos = lens.reshape(-1)[:1].long()  # on the device: no host sync
    keys.index_copy_(2, pos, key.to(keys.dtype))
    values.index_copy_(2, pos, value.to(values.dtype))
    lens += 1


def supported(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, lens: torch.Tensor) -> bool:
    return (triton is not None and keys.is_cuda and keys.is_contiguous() and values.is_contiguous()
            and lens.is_contiguous() and lens.dtype == torch.int32 and key.shape[2] == 1)


if triton is not None:

    @triton.jit
    def _append_kernel(K, V, k, v, lens, W, H, sk_b, sk_h, sv_b, sv_h,
                       D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        pid = tl.program_id(0)  # one (row, head)
        b, h = pid // H, pid % H
        pos = tl.load(lens + pid)
        od = tl.arange(0, BD)
        x = tl.load(k + b * sk_b + h * sk_h + od, mask=od < D)
        tl.store(K + (pid * W + pos) * D + od, x.to(K.dtype.element_ty), mask=od < D)
        ov = tl.arange(0, BDV)
        y = tl.load(v + b * sv_b + h * sv_h + ov, mask=ov < DV)
        tl.store(V + (pid * W + pos) * DV + ov, y.to(V.dtype.element_ty), mask=ov < DV)
        tl.store(lens + pid, pos + 1)


def append(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           lens: torch.Tensor) -> None:
    """The new token into the windows at ``lens``, then ``lens`` + 1 (see the module docstring)."""
    if not supported(keys, values, key, lens):
        return append_reference(keys, values, key, value, lens)
    b, h, w, d = keys.shape
    dv = values.shape[-1]
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _append_kernel[(b * h,)](keys, values, key, value, lens, w, h, key.stride(0), key.stride(1), value.stride(0),
                             value.stride(1), D=d, DV=dv, BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv))
