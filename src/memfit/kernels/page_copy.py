"""Copy the chosen entries of a page table into pool slots, with no host work: the fetch step of
tiered decoding (``memfit.kv.tiered``).

``src`` [N, R] uint8 holds one record of R bytes a page (on a GPU: pinned host memory that the
device reads itself, through a CUDA view of it). A record is its fields end to end; ``outs`` holds
one [M, width] uint8 tensor a field (widths summing to R). For each entry ``e`` with ``take[e]``
set, record ``index[e]`` is split into row ``slot[e]`` of every field. The entries to take vary
from step to step; a kernel that skips the others keeps the shapes fixed, so the step needs no
host sync (and can be captured in a CUDA graph). One program copies one whole record (one
contiguous read across the bus). ``copy_records_reference`` is the pure-torch definition.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

MAX_FIELDS = 4


def copy_records_reference(src: torch.Tensor, index: torch.Tensor, slot: torch.Tensor, take: torch.Tensor,
                           outs: list[torch.Tensor]) -> None:
    e = take.nonzero().squeeze(1)
    rec = src[index[e]].to(outs[0].device)
    for out, part in zip(outs, rec.split([o.shape[1] for o in outs], dim=1)):
        out[slot[e]] = part


def supported(src: torch.Tensor, outs: list[torch.Tensor]) -> bool:
    """The kernel moves 4-byte words: every width a multiple of 4 bytes; at most MAX_FIELDS fields."""
    return (triton is not None and src.is_cuda and len(outs) <= MAX_FIELDS and src.is_contiguous()
            and all(o.is_cuda and o.is_contiguous() and o.shape[1] % 4 == 0 for o in outs))


if triton is not None:

    @triton.jit
    def _segment(src, dst, W: tl.constexpr, BLOCK: tl.constexpr):
        for start in tl.static_range(0, W, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < W
            tl.store(dst + o, tl.load(src + o, mask=m), mask=m)

    @triton.jit
    def _copy_kernel(SRC, INDEX, SLOT, TAKE, O0, O1, O2, O3, R: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                     W2: tl.constexpr, W3: tl.constexpr, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        if tl.load(TAKE + e) != 0:
            rec = SRC + tl.load(INDEX + e).to(tl.int64) * R
            dst = tl.load(SLOT + e).to(tl.int64)
            _segment(rec, O0 + dst * W0, W0, BLOCK)
            _segment(rec + W0, O1 + dst * W1, W1, BLOCK)
            _segment(rec + W0 + W1, O2 + dst * W2, W2, BLOCK)
            _segment(rec + W0 + W1 + W2, O3 + dst * W3, W3, BLOCK)


def copy_records(src: torch.Tensor, index: torch.Tensor, slot: torch.Tensor, take: torch.Tensor,
                 outs: list[torch.Tensor]) -> None:
    """For every ``e`` with ``take[e]``: record ``src[index[e]]`` split into ``out[slot[e]]`` of each
    of ``outs`` (uint8 ``src`` [N, R] and ``outs`` [M, w_i], sum of w_i = R; long ``index`` /
    ``slot``; bool ``take``)."""
    if src.dtype != torch.uint8 or any(o.dtype != torch.uint8 for o in outs):
        raise TypeError("copy_records moves bytes: src and outs must be uint8")
    if not index.shape == slot.shape == take.shape or index.dim() != 1:
        raise ValueError(f"index, slot and take must be 1-D of one length, got {tuple(index.shape)}, "
                         f"{tuple(slot.shape)}, {tuple(take.shape)}")
    widths = [o.shape[1] for o in outs]
    if not outs or sum(widths) != src.shape[1]:
        raise ValueError(f"fields of {widths} bytes do not make records of {src.shape[1]} bytes")
    if not supported(src, outs) or index.numel() == 0:
        copy_records_reference(src, index, slot, take, outs)
        return
    words = [w // 4 for w in widths] + [0] * (MAX_FIELDS - len(outs))
    views = [o.view(torch.int32) for o in outs] + [outs[0].view(torch.int32)] * (MAX_FIELDS - len(outs))
    _copy_kernel[(index.numel(),)](src.view(torch.int32), index, slot, take, *views, R=src.shape[1] // 4,
                                   W0=words[0], W1=words[1], W2=words[2], W3=words[3],
                                   BLOCK=min(1024, triton.next_power_of_2(max(words))), num_warps=4)
