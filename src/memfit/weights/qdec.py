"""QDEC: a quantized layer corrected, token by token, by its quantization residual on the input
channels that matter most for that token.

A quantized weight ``Q`` misses ``R = W - Q``. For an input row ``x`` the error of ``Q x`` is
``R x = sum_c R[:, c] x[c]``, which the few channels with the largest ``|x[c]|`` dominate (LLM
activations have outlier channels). QDEC keeps ``R`` in host memory, quantized per input channel
(``bits`` 8 or 4, symmetric, one float16 scale a channel; 16 / 32: float16 / float32 as it is: 32
restores the unquantized layer when every channel is chosen), and at each call
adds ``R[:, c] x[c]`` over each row's ``k`` largest ``|x[c]|``. The device holds the quantized
layer only; a call reads the union of its rows' channels, ``k`` columns of ``R`` a row at decode.

Rows are stored channel-major (``[in, out]``) so that a channel's residual is one contiguous row:
fetching ``k`` channels is ``k`` contiguous reads.
"""

from __future__ import annotations

import torch

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


def correction(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``R x`` over each row's ``k`` largest ``|x[c]|`` ([..., in] -> [..., out], x's dtype).
    ``codes`` / ``scale`` may sit in host memory while ``x`` is on a GPU: only the channels the
    rows chose are read and moved."""
    xf = x.reshape(-1, x.shape[-1])
    idx = xf.abs().topk(k, dim=-1).indices  # [T, k]
    chans, pos = torch.unique(idx, return_inverse=True)  # the channels any row chose
    src = chans.to(codes.device)
    rows = decode_rows(codes.index_select(0, src), scale.index_select(0, src) if scale.numel() else scale, bits)
    rows = rows.to(x.device, non_blocking=True)
    sel = torch.zeros(xf.shape[0], chans.numel(), dtype=torch.float32, device=x.device)
    sel.scatter_(1, pos.view(xf.shape[0], k), xf.gather(1, idx).float())
    return (sel @ rows).to(x.dtype).reshape(*x.shape[:-1], -1)
