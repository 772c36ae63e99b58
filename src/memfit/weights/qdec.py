"""QDEC: a quantized layer corrected, token by token, by its quantization residual on the input
channels that matter most for that token.

A quantized weight ``Q`` misses ``R = W - Q``. For an input row ``x`` the error of ``Q x`` is
``R x = sum_c R[:, c] x[c]``, which the few channels with the largest ``|x[c]|`` dominate (LLM
activations have outlier channels). QDEC keeps ``R`` in host memory, quantized per input channel
(``bits`` 8 or 4, symmetric, one float16 scale a channel; 16 / 32: float16 / float32 as it is: 32
restores the unquantized layer when every channel is chosen), and at each call
adds ``R[:, c] x[c]`` over each row's ``k`` largest ``|x[c]|``. The device holds the quantized
layer only. A call with few rows (decode) reads each row's ``k`` channels, with fixed shapes: on a
GPU through a CUDA view of the pinned residual, so no step waits on the host. A call with many
rows (prefill) reads the union of its rows' channels once.

Rows are stored channel-major (``[in, out]``) so that a channel's residual is one contiguous row:
fetching ``k`` channels is ``k`` contiguous reads.
"""

from __future__ import annotations

import weakref

import torch

from memfit.kernels import qdec_gather
from memfit.kernels.packing import pack, unpack

BITS = (4, 8, 16, 32)
_FLOAT = {16: torch.float16, 32: torch.float32}


def check(bits: int, channels: float) -> None:
    if bits not in BITS:
        raise ValueError(f"qdec_bits must be one of {BITS}, got {bits}")
    if not 0 < channels <= 1:
        raise ValueError(f"qdec_channels is the fraction of input channels corrected a token, in (0, 1], got {channels}")


def channels_for(fraction: float, in_features: int) -> int:
    """Channels corrected a token: ``fraction`` of ``in_features``, at least one."""
    return max(1, round(fraction * in_features))


def empty(in_features: int, out_features: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (codes, scale) of the shapes and dtypes :func:`encode` stores (what loading fills)."""
    if bits in _FLOAT:
        return torch.zeros(in_features, out_features, dtype=_FLOAT[bits]), torch.empty(0, dtype=torch.float16)
    return (torch.zeros(in_features, out_features * bits // 8, dtype=torch.uint8),
            torch.zeros(in_features, dtype=torch.float16))


def encode(residual: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual`` [out, in] (float) -> (codes, scale): codes [in, out * bits / 8] uint8 (16 / 32
    bits: float16 / float32 [in, out]), scale float16 [in] (16 / 32 bits: empty)."""
    r = residual.float().T.contiguous()  # [in, out]: a channel's residual, contiguous
    if bits in _FLOAT:
        return r.to(_FLOAT[bits]), torch.empty(0, dtype=torch.float16)
    if r.shape[1] * bits % 8:
        raise ValueError(f"out_features {r.shape[1]} cannot be packed at {bits} bits")
    top = (1 << (bits - 1)) - 1  # symmetric: codes -top..top around zero
    scale = (r.abs().amax(1) / top).clamp_min(1e-12).to(torch.float16)
    codes = torch.round(r / scale.float()[:, None]).clamp_(-top, top) + top
    return pack(codes.to(torch.uint8), bits), scale


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of :func:`encode`'s output -> float32 [rows, out]."""
    if bits in _FLOAT:
        return codes.float()
    top = (1 << (bits - 1)) - 1
    return (unpack(codes, bits).float() - top) * scale.float()[:, None]


def _rows(codes: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, bits: int, device) -> torch.Tensor:
    index = index.to(codes.device)
    rows = decode_rows(codes.index_select(0, index), scale.index_select(0, index) if scale.numel() else scale, bits)
    return rows.to(device, non_blocking=True)


_last: tuple | None = None  # (weakref to an input, (its version, k, capturing), its chosen channels)


def chosen(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k`` largest ``|x[c]|`` -> [T, k]. Layers called with the same tensor (q, k and v
    of one attention; gate and up) share one top-k: the last input's is kept, and reused while that
    very tensor, unchanged (its version), comes again, on the same side of a CUDA-graph capture (a
    captured top-k holds nothing until replayed; one run outside would not be in the graph); not
    under torch.compile, which traces this."""
    global _last
    key = None
    if not torch.compiler.is_compiling():
        key = (x._version, k, x.is_cuda and torch.cuda.is_current_stream_capturing())
        last = _last
        if last is not None and last[0]() is x and last[1] == key:
            return last[2]
    idx = x.reshape(-1, x.shape[-1]).abs().topk(k, dim=-1).indices
    if key is not None:
        _last = (weakref.ref(x), key, idx)
    return idx


def correction(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, k: int,
               views: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``R x`` over each row's ``k`` largest ``|x[c]|`` ([..., in] -> [..., out], x's dtype).
    ``codes`` / ``scale`` may sit in host memory while ``x`` is on a GPU: only the channels the
    rows chose are read and moved. ``views``: CUDA views of them (pinned), read by the device."""
    xf = x.reshape(-1, x.shape[-1])
    t = xf.shape[0]
    idx = chosen(x, k)  # [T, k]
    codes, scale = views if views is not None else (codes, scale)
    if t * k <= codes.shape[0]:  # few rows: each row's own channels, fixed shapes
        if qdec_gather.supported(xf, codes, bits):  # on a GPU: one launch
            return qdec_gather.correction(xf, idx, codes, scale).to(x.dtype).reshape(*x.shape[:-1], -1)
        rows = _rows(codes, scale, idx.reshape(-1), bits, x.device)  # [T * k, out]
        out = (rows * xf.gather(1, idx).float().reshape(-1, 1)).view(t, k, -1).sum(1)
    else:  # many rows: the channels any row chose, once
        chans, pos = torch.unique(idx, return_inverse=True)
        sel = torch.zeros(t, chans.numel(), dtype=torch.float32, device=x.device)
        sel.scatter_(1, pos.view(t, k), xf.gather(1, idx).float())
        out = sel @ _rows(codes, scale, chans, bits, x.device)
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)
