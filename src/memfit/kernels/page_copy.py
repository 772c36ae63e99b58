"""Copy the chosen entries of a page table into pool slots, with no host work: the fetch step of
tiered decoding (``memfit.kv.tiered``).

``src`` [N, R] uint8 holds one record of R bytes a page (on a GPU: pinned host memory that the
device reads itself, through a CUDA view of it). For each entry ``e`` with ``take[e]`` set, bytes
``offset .. offset + width`` of record ``index[e]`` go to row ``slot[e]`` of ``out`` [M, width].
The entries to take vary from step to step; a kernel that skips the others keeps the shapes fixed,
so the step needs no host sync (and can be captured in a CUDA graph). ``copy_field_reference`` is
the pure-torch definition (any device).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def copy_field_reference(src: torch.Tensor, index: torch.Tensor, slot: torch.Tensor, take: torch.Tensor,
                         out: torch.Tensor, offset: int) -> None:
    e = take.nonzero().squeeze(1)
    out[slot[e]] = src[index[e], offset : offset + out.shape[1]].to(out.device)


def supported(src: torch.Tensor, out: torch.Tensor, offset: int) -> bool:
    """The kernel moves 4-byte words: records, offsets and widths a multiple of 4 bytes."""
    return (triton is not None and out.is_cuda and src.is_cuda and src.shape[1] % 4 == 0 and offset % 4 == 0
            and out.shape[1] % 4 == 0 and src.is_contiguous() and out.is_contiguous())


if triton is not None:

    @triton.jit
    def _copy_kernel(SRC, INDEX, SLOT, TAKE, OUT, R: tl.constexpr, OFF: tl.constexpr, W: tl.constexpr,
                     BLOCK: tl.constexpr):
        e = tl.program_id(0)
        if tl.load(TAKE + e) != 0:
            row = tl.load(INDEX + e).to(tl.int64)
            dst = tl.load(SLOT + e).to(tl.int64)
            for start in tl.static_range(0, W, BLOCK):
                o = start + tl.arange(0, BLOCK)
                m = o < W
                tl.store(OUT + dst * W + o, tl.load(SRC + row * R + OFF + o, mask=m), mask=m)


def copy_field(src: torch.Tensor, index: torch.Tensor, slot: torch.Tensor, take: torch.Tensor, out: torch.Tensor,
               offset: int) -> None:
    """``out[slot[e]] = src[index[e], offset : offset + out.shape[1]]`` for every ``e`` with
    ``take[e]`` (uint8 ``src`` and ``out``; long ``index`` / ``slot``; bool ``take``)."""
    if src.dtype != torch.uint8 or out.dtype != torch.uint8:
        raise TypeError(f"copy_field moves bytes: src and out must be uint8, got {src.dtype} and {out.dtype}")
    if not index.shape == slot.shape == take.shape or index.dim() != 1:
        raise ValueError(f"index, slot and take must be 1-D of one length, got {tuple(index.shape)}, "
                         f"{tuple(slot.shape)}, {tuple(take.shape)}")
    if offset < 0 or offset + out.shape[1] > src.shape[1]:
        raise ValueError(f"bytes {offset}..{offset + out.shape[1]} are not inside records of {src.shape[1]} bytes")
    if not supported(src, out, offset) or index.numel() == 0:
        copy_field_reference(src, index, slot, take, out, offset)
        return
    w = out.shape[1] // 4
    _copy_kernel[(index.numel(),)](src.view(torch.int32), index, slot, take, out.view(torch.int32),
                                   R=src.shape[1] // 4, OFF=offset // 4, W=w, BLOCK=min(1024, triton.next_power_of_2(w)),
                                   num_warps=4)
