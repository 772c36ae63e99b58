"""Host memory a GPU reads itself: pinned at exactly its size, and seen as a CUDA tensor.

``PinnedHost`` pins with ``cudaHostRegister`` on plain host memory: torch's pinned allocator rounds
each block up to a power of two, which for blocks of a few GiB (a layer's offloaded KV pages, a
layer's weight residual) can nearly double the host memory they take. ``device_view`` gives a CUDA
tensor over pinned memory (unified addressing): kernels then read host memory across the bus
themselves, with no host work, staging copy or wait, so the reads can sit in a CUDA graph.
"""

from __future__ import annotations

import torch


class PinnedHost:
    """``nbytes`` of host memory pinned at that size, unpinned when this object goes: whoever reads
    ``buf`` (or a view of it) keeps this object too. ``what`` names the memory in errors."""

    def __init__(self, nbytes: int, what: str = "host memory"):
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.ptr = self.buf.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, 1 | 2) if nbytes else 0  # portable, mapped
        if int(err) != 0:
            raise RuntimeError(f"pinning {nbytes / 2**30:.2f} GiB of host memory for {what} failed "
                               f"(cudaHostRegister error {int(err)})")
        self.registered = bool(nbytes)

    def __del__(self):
        if getattr(self, "registered", False):
            self.registered = False
            try:
                torch.cuda.synchronize()  # no copy or kernel may still be reading it
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:  # interpreter shutdown: CUDA may be gone already, and the process with it
                pass


def pinned_copy(x: torch.Tensor, what: str = "host memory") -> tuple[torch.Tensor, PinnedHost]:
    """``x`` copied into host memory pinned at its exact size: (the copy, its owner to keep alive)."""
    owner = PinnedHost(x.numel() * x.element_size(), what)
    return owner.buf.view(x.dtype).view(x.shape).copy_(x), owner


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over pinned, contiguous host memory (same dtype and shape); None where the
    device is not a GPU or the memory is not pinned. The caller keeps ``host`` alive."""
    if device.type != "cuda" or host.numel() == 0 or not host.is_pinned() or not host.is_contiguous():
        return None

    class _Host:
        __cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1", "version": 3,
                                    "data": (host.data_ptr(), False), "strides": None}

    return torch.as_tensor(_Host(), device=device).view(host.dtype).view(host.shape)
