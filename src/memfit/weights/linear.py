"""QuantLinear: a Linear layer whose weight is stored as packed bit planes plus a small grid.

Two grids: ``uniform`` (per group of input channels a scale and a zero point, codes ``q`` stand for
``(q - zero) * scale``; scale and zero in float16, or with ``meta_bits`` in that many bits each, see
``grid.MetaCodes``) and ``codebook`` (per output channel ``2**bits`` values, codes index them).
Codes are packed as bit planes, most significant first (``kernels.packing.pack_planes``), so a model
stored at 8 bits can be read at any ``read_bits`` <= 8 (any-precision): the top ``n`` planes are the
index of an ``n``-bit bin, dequantized at the bin's centre.

On CPU (and for layouts no kernel takes) the forward dequantizes the weight and calls ``F.linear``.
On CUDA, for up to 16 rows (decode), uniform grids read at their stored width run a Triton GEMV over a
copy of the codes in a layout made for bandwidth (``kernels.tile_gemv``: whole codes in parts of 8/4/2/1
bits, each program's block contiguous; 16-bit activations); a 4-bit grid the tiles do not fit, or a
4-bit layer of up to ``TINYGEMM_MAX`` weights, runs torch's tinygemm kernel ``torch._weight_int4pack_mm``
(the int4 kernel torchao uses) where it takes the group size; any-precision reads below the stored
width, and float32 activations, run a Triton GEMV that reads the bit planes (``kernels.plane_gemv``);
more rows (prefill, where the matmul's cost hides the dequantization) dequantize. A twin layer (``rank``:
``W = L R`` + the grid's weight) runs the tiles by default, which add ``(x R^T) L^T`` in their launch;
elsewhere the low-rank part is two small matmuls after the product.
``set_prefer("tiles" | "tinygemm" | "planes")`` asks for one of them where it takes the layer;
``"tiles-a8"``: the tiles with the input rounded to int8 (opt-in). ``kernel`` says which path a layer
uses. The kernel's copy is made on first use; where it holds every code the bit planes are then dropped
from the GPU and rebuilt from it exactly when needed (saving, moving, another read width): the codes
sit in GPU memory once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memfit.kernels import plane_gemv, tile_gemv
from memfit.kernels.hostmem import device_view, pinned_copy
from memfit.kernels.packing import pack_planes, unpack_planes
from memfit.weights import qdec, twin
from memfit.weights.anyprec import bin_centres
from memfit.weights.grid import META_BITS, MetaCodes

KINDS = ("uniform", "codebook")
_SIDE_STREAMS: dict = {}  # device -> the CUDA stream QDEC's corrections run on beside the layers' products
QDEC_BUFFERS = ("qdec_codes", "qdec_scale")  # QDEC's residual: kept in host memory wherever the layer goes
LOWRANK_BUFFERS = ("lr_l", "lr_l_scale", "lr_r", "lr_r_scale")  # twin's 8-bit factors L [out, r], R [r, in]
TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_MAX = 6144 * 4096  # 4-bit layers up to this many weights run tinygemm by default (see _tinygemm_ok)
# decode kernels a layer may be told to prefer (None: tiles, else tinygemm, else planes); "tiles-a8": the
# tiles with the input rounded to int8 (``tile_gemv(..., a8=True)``), opt-in until it has run on a GPU
PREFER = ("tiles", "tinygemm", "planes", "tiles-a8")
# twin on the tiles: "kernel" adds (x R^T) L^T in the GEMV's launch (each block's last program waits for u);
# "torch": the launch hands u back and torch adds u L^T, which torch.compile can fuse with the ops around it;
# "auto": torch while compiling, else the kernel. "kernel" stays the default until "auto" has been timed
# on a GPU (its kernel side was checked in Triton's interpreter; see docs/weights.md)
TWIN_EPILOGUE = "kernel"
TWIN_EPILOGUES = ("kernel", "torch", "auto")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, kind: str = "uniform",
                 bias: bool = False, device=None, dtype: torch.dtype = torch.bfloat16, meta_bits: int = 0,
                 qdec_k: int = 0, qdec_bits: int = 8, rank: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown grid kind {kind!r}; use one of {KINDS}")
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if kind == "uniform" and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        if meta_bits and (kind != "uniform" or meta_bits not in META_BITS):
            raise ValueError(f"meta_bits must be 0 (float16 scale and zero) or 2..8 on a uniform grid, got {meta_bits} ({kind})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.kind, self.meta_bits = bits, group_size, kind, meta_bits
        self.read_bits = bits
        self.dtype = dtype
        self.register_buffer("planes", torch.zeros(bits, out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        ng = in_features // group_size
        if kind == "uniform" and meta_bits:
            self.register_buffer("scale_codes", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
            self.register_buffer("offset_codes", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
            self.register_buffer("meta_ranges", torch.zeros(out_features, 4, dtype=torch.float16, device=device))
        elif kind == "uniform":
            self.register_buffer("scale", torch.zeros(out_features, ng, dtype=torch.float16, device=device))
            self.register_buffer("zero", torch.zeros(out_features, ng, dtype=torch.float16, device=device))
        else:
            self.register_buffer("codebook", torch.zeros(out_features, 1 << bits, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # the kernel's copy of the codes: ("tinygemm", packed, scales_and_zeros) or ("tiles", parts, scale, offset)
        self._fast: tuple | None = None
        self._lr_table: torch.Tensor | None = None  # stacked twin layers: the kernel's block table (on first use)
        self.prefer: str | None = None
        # QDEC (memfit.weights.qdec): the residual W - Q, in host memory, added on each token's k channels
        self.qdec_k, self.qdec_bits = qdec_k, qdec_bits
        self._qdec_views: tuple[torch.Tensor, torch.Tensor] | None = None  # CUDA views of the pinned residual
        self._qdec_pinned: list = []  # the pinned memory's owners
        if qdec_k:
            qdec.check(qdec_bits, qdec_k / in_features)
            for name, t in zip(QDEC_BUFFERS, qdec.empty(in_features, out_features, qdec_bits)):
                self.register_buffer(name, t)
        self.rank, self.lr_segments = 0, None
        if rank:  # twin (memfit.weights.twin): W = L R + the grid's weight
            self.attach_lowrank(torch.zeros(out_features, rank, dtype=torch.int8, device=device),
                                torch.zeros(out_features, dtype=torch.float16, device=device),
                                torch.zeros(rank, in_features, dtype=torch.int8, device=device),
                                torch.zeros(rank, dtype=torch.float16, device=device))

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: torch.Tensor, bits: int, *, scale=None, zero=None, codebook=None,
                   group_size: int = 0, meta: MetaCodes | None = None) -> "QuantLinear":
        """A layer holding ``codes`` on a uniform grid (``scale`` and ``zero``, or ``meta``) or a ``codebook``."""
        kind = "codebook" if codebook is not None else "uniform"
        q = cls(linear.in_features, linear.out_features, bits, group_size or linear.in_features, kind,
                bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype,
                meta_bits=meta.bits if meta is not None else 0)
        if codes.shape != (linear.out_features, linear.in_features) or codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 {tuple(linear.weight.shape)}, got {codes.dtype} {tuple(codes.shape)}")
        q.planes.copy_(pack_planes(codes, bits))
        if meta is not None:
            q.scale_codes.copy_(meta.scale_codes)
            q.offset_codes.copy_(meta.offset_codes)
            q.meta_ranges.copy_(meta.ranges)
        elif kind == "uniform":
            q.scale.copy_(scale)
            q.zero.copy_(zero)
        else:
            q.codebook.copy_(codebook)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        return q

    # buffers indexed by output row, and the dimension that indexes them
    ROW_BUFFERS = {"planes": 1, "scale": 0, "zero": 0, "scale_codes": 0, "offset_codes": 0, "meta_ranges": 0,
                   "codebook": 0}

    def _plain_config(self) -> tuple:
        """What layers must share to be stacked into one (:meth:`stack`)."""
        return (self.in_features, self.bits, self.read_bits, self.group_size, self.kind, self.meta_bits, self.dtype,
                self.prefer, self.planes.device)

    @classmethod
    def stack(cls, layers: "list[QuantLinear]") -> "QuantLinear":
        """One layer whose output rows are ``layers``' rows in order: the same codes and grids, so the same
        products, from one kernel launch (projections sharing an input: ``weights.fuse``). The layers must
        share their input size, widths, grid and dtype, and hold no QDEC residual. Twin layers stack too: the
        factors' rows of ``R`` one after another (``u = R x`` for all at once), each layer's ``L`` kept apart
        (flat, :attr:`lr_segments` says where: ``L`` is block-diagonal), so no byte is added."""
        first = layers[0]
        if (any(m.qdec_k or m.lr_segments for m in layers)
                or any(m._plain_config() != first._plain_config() for m in layers)):
            raise ValueError("only QuantLinear layers with the same input size, bits, grid, dtype and device, no QDEC "
                             "residual, and not stacked twin layers themselves, stack")
        out = cls(first.in_features, sum(m.out_features for m in layers), first.bits, first.group_size, first.kind,
                  bias=any(m.bias is not None for m in layers), device=first.planes.device, dtype=first.dtype,
                  meta_bits=first.meta_bits)
        out.read_bits, out.prefer = first.read_bits, first.prefer
        for name, dim in cls.ROW_BUFFERS.items():
            if name in out._buffers:
                parts = [m._planes() if name == "planes" else m._buffers[name] for m in layers]
                out._buffers[name] = torch.cat(parts, dim)
        if out.bias is not None:
            zeros = out.bias.data.new_zeros
            biases = [m.bias.data if m.bias is not None else zeros(m.out_features) for m in layers]
            out.bias.data.copy_(torch.cat(biases))
        if any(m.rank for m in layers):
            out._stack_lowrank(layers)
        return out

    def _stack_lowrank(self, layers: "list[QuantLinear]") -> None:
        """The twin factors of stacked ``layers`` (a layer without them: rank 0), ``L`` flat."""
        segs, parts, row, col, at = [], {n: [] for n in LOWRANK_BUFFERS}, 0, 0, 0
        dev = self.planes.device
        for m in layers:
            if m.rank:
                for n in LOWRANK_BUFFERS:
                    parts[n].append(m._buffers[n].reshape(-1) if n == "lr_l" else m._buffers[n])
            else:
                parts["lr_l_scale"].append(torch.zeros(m.out_features, dtype=torch.float16, device=dev))
            segs.append((row, row + m.out_features, col, m.rank, at))
            row, col, at = row + m.out_features, col + m.rank, at + m.out_features * m.rank
        for n in LOWRANK_BUFFERS:
            self.register_buffer(n, torch.cat(parts[n]))
        self.rank, self.lr_segments = col, segs

    def rows(self, start: int, stop: int, bias: bool = True) -> "QuantLinear":
        """A layer of output rows ``start .. stop - 1`` of this one (the inverse of :meth:`stack`; in a stacked
        twin layer, rows of one of the stacked layers)."""
        seg = next((g for g in self._segments() if g[0] <= start and stop <= g[1]), None) if self.rank else None
        if self.qdec_k or (self.rank and seg is None) or not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows {start}..{stop} of a {self.out_features}-row layer (without QDEC; of one stacked "
                             "layer where it holds twin factors)")
        out = type(self)(self.in_features, stop - start, self.bits, self.group_size, self.kind,
                         bias=bias and self.bias is not None, device=self.planes.device, dtype=self.dtype,
                         meta_bits=self.meta_bits)
        out.read_bits, out.prefer = self.read_bits, self.prefer
        for name, dim in self.ROW_BUFFERS.items():
            if name in out._buffers:
                src = self._planes() if name == "planes" else self._buffers[name]
                out._buffers[name] = src.narrow(dim, start, stop - start).clone()
        if out.bias is not None:
            out.bias.data.copy_(self.bias.data[start:stop])
        if seg is not None and seg[3]:
            r0, _, c0, r, _ = seg
            out.attach_lowrank(self._segment_l(seg)[start - r0 : stop - r0].clone(), self.lr_l_scale[start:stop].clone(),
                               self.lr_r[c0 : c0 + r].clone(), self.lr_r_scale[c0 : c0 + r].clone())
        return out

    def _segments(self) -> list[tuple[int, int, int, int, int]]:
        """Twin's factors by stacked layer: (first row, end row, first row of ``R``, rank, start of its ``L``
        in the flat ``lr_l``); one for a layer not stacked."""
        return self.lr_segments or [(0, self.out_features, 0, self.rank, 0)]

    def _segment_l(self, seg: tuple[int, int, int, int, int]) -> torch.Tensor:
        """The int8 ``L`` [rows, rank] of one of :meth:`_segments`."""
        r0, r1, _, r, at = seg
        return self.lr_l.reshape(-1)[at : at + (r1 - r0) * r].reshape(r1 - r0, r)

    def _lowrank_from_u(self, u: torch.Tensor) -> torch.Tensor:
        """Twin's ``u L^T`` (float32 [rows, out]) from ``u`` = ``x R^T`` (float32 [rows, r]), a layer at a
        time where stacked; written as products summed (not a matmul) so that torch.compile fuses it."""
        parts = []
        for seg in self._segments():
            r0, r1, c0, r, _ = seg
            parts.append(u.new_zeros(u.shape[0], r1 - r0) if r == 0 else
                         (u[:, None, c0 : c0 + r] * self._segment_l(seg).float()).sum(-1))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)) * self.lr_l_scale.float()

    def attach_lowrank(self, l_codes: torch.Tensor, l_scale: torch.Tensor, r_codes: torch.Tensor,
                       r_scale: torch.Tensor) -> None:
        """Twin: add ``L R`` to the weight, ``L`` = int8 ``l_codes`` [out, r] times the float16 row scales
        ``l_scale`` [out], ``R`` likewise [r, in]."""
        r = l_codes.shape[1] if l_codes.dim() == 2 else -1
        if (l_codes.shape != (self.out_features, r) or r_codes.shape != (r, self.in_features) or r < 1
                or l_codes.dtype != torch.int8 or r_codes.dtype != torch.int8
                or l_scale.shape != (self.out_features,) or r_scale.shape != (r,)):
            raise ValueError(f"low-rank factors must be int8 [{self.out_features}, r] and [r, {self.in_features}] with "
                             f"float16 row scales; got {tuple(l_codes.shape)} / {tuple(r_codes.shape)}")
        dev = self.planes.device
        for name, t in zip(LOWRANK_BUFFERS, (l_codes, l_scale.half(), r_codes, r_scale.half())):
            self.register_buffer(name, t.to(dev))
        self.rank, self.lr_segments = r, None

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Twin's ``L`` [out, r] and ``R`` [r, in], float32 (stacked: ``L`` block-diagonal)."""
        rw = twin.dequant_rows(self.lr_r, self.lr_r_scale)
        if not self.lr_segments:
            return twin.dequant_rows(self.lr_l, self.lr_l_scale), rw
        lw = torch.zeros(self.out_features, self.rank, device=rw.device)
        for seg in self.lr_segments:
            r0, r1, c0, r, _ = seg
            lw[r0:r1, c0 : c0 + r] = self._segment_l(seg).float()
        return lw * self.lr_l_scale.float()[:, None], rw

    def attach_residual(self, weight: torch.Tensor, k: int, bits: int = 8) -> None:
        """QDEC: keep ``weight - self.dequantize()`` (in host memory, at ``bits``) and add it, at each
        call, over each input row's ``k`` largest channels."""
        if not 1 <= k <= self.in_features:
            raise ValueError(f"qdec: k must be in 1..{self.in_features} input channels, got {k}")
        qdec.check(bits, k / self.in_features)
        codes, scale = qdec.encode(weight.float() - self.dequantize(torch.float32), bits)
        self.qdec_k, self.qdec_bits = k, bits
        for name, t in zip(QDEC_BUFFERS, (codes, scale)):
            self.register_buffer(name, t.cpu())
        if self.planes.is_cuda:
            self._pin_residual()

    def _pin_residual(self) -> None:
        """Pin the residual (exact size) and give the layer's GPU a view of it."""
        for name in QDEC_BUFFERS:
            if not self._buffers[name].is_pinned():
                self._buffers[name], owner = pinned_copy(self._buffers[name], "a QDEC residual")
                self._qdec_pinned.append(owner)
        views = [device_view(self._buffers[n], self.planes.device) for n in QDEC_BUFFERS]
        scale = views[1] if views[1] is not None else self._buffers["qdec_scale"].to(self.planes.device)  # empty: float
        self._qdec_views = (views[0], scale) if views[0] is not None else None

    def set_read_bits(self, n: int) -> None:
        """Read the top ``n`` bit planes only (any-precision); needs nothing re-quantized."""
        if not 1 <= n <= self.bits:
            raise ValueError(f"this layer stores {self.bits} bit planes: read_bits must be in 1..{self.bits}, got {n}")
        if self.kind == "codebook" and n != self.bits:
            raise ValueError("a codebook grid is read at its own bits only; any-precision needs a uniform grid")
        self._drop_fast()
        self.read_bits = n

    def set_prefer(self, kernel: str | None) -> None:
        """Run ``kernel`` (one of :data:`PREFER`) where it takes this layer; None: the default."""
        if kernel is not None and kernel not in PREFER:
            raise ValueError(f"unknown kernel {kernel!r}; use one of {PREFER} or None")
        self._drop_fast()
        self.prefer = kernel

    # -- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        if not self.planes.numel() and self._fast is not None and self._fast[0] == "tiles":
            return tile_gemv.unpack_tiles(self._fast[1], self.bits, self.out_features)  # read_bits == bits here
        return unpack_planes(self._planes(), self.in_features, self.read_bits)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform grid's scale and zero, float32 [out, groups]."""
        if self.meta_bits:
            return MetaCodes(self.scale_codes, self.offset_codes, self.meta_ranges, self.meta_bits).grid()
        return self.scale.float(), self.zero.float()

    def dequantize(self, dtype: torch.dtype | None = None, lowrank: bool = True) -> torch.Tensor:
        """The layer's weight [out, in]: the grid's (or codebook's), plus ``L R`` for a twin layer
        (unless ``lowrank`` is False)."""
        q = self.codes()
        if self.kind == "codebook":
            w = torch.gather(self.codebook.float(), 1, q.long())
        else:
            # the top n of b planes index a bin of 2**(b-n) codes: dequantize at the bin's centre
            c = bin_centres(q, self.bits, self.read_bits).reshape(self.out_features, -1, self.group_size)
            scale, zero = self.grid()
            w = ((c - zero[..., None]) * scale[..., None]).reshape(self.out_features, -1)
        if self.rank and lowrank:
            lw, rw = self._factors()
            w = w + lw @ rw
        return w.to(dtype or self.dtype)

    @property
    def kernel(self) -> str:
        if self._tinygemm_ok():
            return "tinygemm-int4"
        if self._tiles_ok():
            return "triton-tiles-a8" if self.prefer == "tiles-a8" else "triton-tiles"
        return "triton-gemv" if self._gemv_ok() else "dequantize"

    def _decode_input(self, x: torch.Tensor | None) -> torch.Tensor:
        return x if x is not None else self.planes.new_empty(1, self.in_features, dtype=torch.bfloat16)

    def _gemv_ok(self, x: torch.Tensor | None = None) -> bool:
        if self.kind != "uniform" or not self.planes.is_cuda:
            return False
        return plane_gemv.supports(self._decode_input(x), self.planes, self.group_size)

    def _tiles_ok(self, x: torch.Tensor | None = None) -> bool:
        if self.kind != "uniform" or not self.planes.is_cuda or self.read_bits != self.bits:
            return False
        if self.prefer not in (None, "tiles", "tiles-a8"):
            return False
        return (tile_gemv.fits(self.bits, self.group_size)
                and tile_gemv.supports(self._decode_input(x), self.group_size, self.in_features)
                and (self.prefer != "tiles-a8" or self.in_features % tile_gemv.A8_BLOCK == 0))

    def _tinygemm_ok(self) -> bool:
        # by default where the tiles do not fit, and for layers of up to TINYGEMM_MAX weights, where a call
        # is mostly fixed cost and tinygemm's is lower (H200, one call from HBM: q/k/v stacked, 6144 x 4096,
        # 9.9 us against the tiles' 17.5; gate/up stacked, 28672 x 4096, 34.8 against 33.4)
        # twin layers take the tiles where they fit: their kernel adds the low-rank part in the same launch
        fits = tile_gemv.fits(self.bits, self.group_size)
        default = self.prefer is None and (not fits or (self.out_features * self.in_features <= TINYGEMM_MAX
                                                        and not self.rank))
        return ((self.prefer == "tinygemm" or default) and self.planes.is_cuda and self.kind == "uniform"
                and self.read_bits == 4
                and self.group_size in TINYGEMM_GROUPS and self.in_features % 128 == 0 and self.out_features % 8 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm"))

    def _fast_copy(self, kind: str) -> tuple:
        """The kernel's copy of the codes (made on first use). It holds every code, so the planes are
        then dropped: the codes sit on the GPU once."""
        if self._fast is not None and self._fast[0] == kind:
            return self._fast
        self._drop_fast()
        q = self.codes()
        scale, zero = self.grid()
        if kind == "tinygemm":
            # tinygemm dequantizes (q - 8) * s + z with z in the float domain; ours is the bin centre
            # ((q + 0.5) m - 0.5 - zero) * scale, i.e. s = m * scale and z = 8 s + (0.5 m - 0.5 - zero) * scale
            m = 1 << (self.bits - 4)
            s = m * scale
            z = 8 * s + ((0.5 * m - 0.5) - zero) * scale
            q = q.to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._fast = ("tinygemm", packed, sz)
        else:
            parts = tile_gemv.pack_tiles(q, self.bits, self.group_size)
            npad = parts[0].shape[0] * parts[0].shape[2]
            pad = (0, 0, 0, npad - self.out_features)
            # w = code * scale + offset, the grid as the kernel reads it: float16 [groups, outputs]
            self._fast = ("tiles", parts, F.pad(scale, pad).T.contiguous().half(),
                          F.pad(-zero * scale, pad).T.contiguous().half())
        if self.read_bits == self.bits:
            self.planes = self.planes.new_empty(0)
        return self._fast

    # -- the kernel's copy as the only copy of the codes -------------------------------------------
    def _planes(self) -> torch.Tensor:
        if self.planes.numel() or self._fast is None:
            return self.planes
        if self._fast[0] == "tiles":
            return pack_planes(tile_gemv.unpack_tiles(self._fast[1], self.bits, self.out_features), self.bits)
        return pack_planes(self._int4_codes(), self.bits)

    def _int4_codes(self, chunk: int = 2048) -> torch.Tensor:
        """The codes back from the tinygemm copy, exactly: with scale 1 and zero 8 the kernel reads
        code q as (q - 8) * 1 + 8 = q, so multiplying rows of the identity returns them (uint8 [out, in])."""
        packed, dev = self._fast[1], self._fast[1].device
        sz = torch.tensor([1.0, 8.0], device=dev, dtype=torch.bfloat16).expand(
            self.in_features // self.group_size, self.out_features, 2).contiguous()
        cols = []
        for i in range(0, self.in_features, chunk):  # rows i .. i + c of the identity, built alone
            c = min(chunk, self.in_features - i)
            rows = torch.zeros(c, self.in_features, device=dev, dtype=torch.bfloat16)
            rows[torch.arange(c, device=dev), torch.arange(i, i + c, device=dev)] = 1
            cols.append(torch.ops.aten._weight_int4pack_mm(rows, packed, self.group_size, sz).T)
        return torch.cat(cols, 1).round().to(torch.uint8)

    def _drop_fast(self) -> None:
        """Forget the kernel's copy, putting the planes back first if it was their only copy."""
        if self._fast is not None and not self.planes.numel():
            self.planes = self._planes()
        self._fast = self._lr_table = None

    def _apply(self, fn, recurse: bool = True):
        self._drop_fast()  # moving or casting: the copy stays behind, the planes go along
        held = {n: self._buffers.pop(n) for n in QDEC_BUFFERS if n in self._buffers}
        out = super()._apply(fn, recurse)
        self._buffers.update(held)  # QDEC's residual stays in host memory, as stored, wherever the layer goes
        if held and self.planes.is_cuda:
            self._pin_residual()
        elif held:
            self._qdec_views = None
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "planes"] = self._planes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_fast()  # new codes make the copy stale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _kernel_product(self, x: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """``x`` times the grid's weight through a decode kernel that reads the codes, or None where
        none takes this call; and whether twin's low-rank part is in it (the tiles add it in their launch)."""
        if self._tinygemm_ok() and x.dtype == torch.bfloat16:
            _, packed, sz = self._fast_copy("tinygemm")
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features), packed, self.group_size, sz)
            return y.reshape(*x.shape[:-1], self.out_features), False
        if self._tiles_ok(x):
            _, parts, scale, offset = self._fast_copy("tiles")
            lowrank = tuple(self._buffers[n] for n in LOWRANK_BUFFERS) if self.rank else None
            if lowrank is not None and self.lr_segments:  # stacked: each block of outputs its own rows of L
                if self._lr_table is None:
                    self._lr_table = tile_gemv.lowrank_blocks(self.lr_segments, self.out_features, x.device)
                lowrank = (*lowrank, self._lr_table) if self._lr_table is not None else None
            split = lowrank is not None and (TWIN_EPILOGUE == "torch" or (
                TWIN_EPILOGUE == "auto" and torch.compiler.is_compiling()))
            y = tile_gemv.tile_gemv(x, parts, self.bits, self.out_features, scale, offset,
                                    a8=self.prefer == "tiles-a8", lowrank=lowrank, lowrank_u=split)
            if split:
                y, u = y
                y = (y.reshape(-1, self.out_features).float() + self._lowrank_from_u(u)).to(x.dtype).reshape(y.shape)
            return y, lowrank is not None
        if self._gemv_ok(x):
            if self.meta_bits:
                grid = {"meta": (self.scale_codes, self.offset_codes, self.meta_ranges)}
            else:
                grid = {"scale": self.scale, "zero": self.zero}
            return plane_gemv.plane_gemv(x, self._planes(), self.group_size, self.read_bits, **grid), False
        return None, False

    # QDEC on CUDA: the correction runs on a side stream while the layer's own product runs (host
    # memory over PCIe beside HBM). Off: both on the caller's stream, one after the other.
    qdec_overlap: bool = True

    def _qdec_begin(self, x: torch.Tensor) -> tuple | None:
        """Start QDEC's correction of ``x`` on the device's side stream (CUDA, residual pinned); None
        where it runs inline. The side stream first waits for the caller's (``x`` is ready), and the
        caller waits for it before the sum (:meth:`forward`); every later side-stream allocation is
        queued after the caller's work, so the correction's memory is not reused under the sum."""
        if not (self.qdec_k and self.qdec_overlap and x.is_cuda and self._qdec_views is not None):
            return None
        main = torch.cuda.current_stream(x.device)
        side = _SIDE_STREAMS.get(x.device)
        if side is None:
            # high priority: its short kernels start as soon as they can, beside the long GEMV
            side = _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device, priority=-1)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            c = self._qdec_correction(x)
        return main, side, c

    def _qdec_correction(self, x: torch.Tensor) -> torch.Tensor:
        return qdec.correction(x, self.qdec_codes, self.qdec_scale, self.qdec_bits, self.qdec_k, self._qdec_views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = self._qdec_begin(x)
        y, with_lowrank = self._kernel_product(x)
        if y is None:  # the dequantized weight holds the grid's and twin's low-rank part
            y = F.linear(x, self.dequantize(x.dtype), self.bias)
        else:  # a kernel read the codes: the bias and (unless the kernel added it) twin's (x R^T) L^T come after
            y = y + self.bias if self.bias is not None else y
            if self.rank and not with_lowrank:
                lw, rw = self._factors()
                y = y + F.linear(F.linear(x, rw.to(x.dtype)), lw.to(x.dtype))
        if started is not None:
            main, side, c = started
            main.wait_stream(side)
            y = y + c
        elif self.qdec_k:
            y = y + self._qdec_correction(x)
        return y

    # -- accounting -----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the layer as it runs on its device (what ``save_quantized`` writes, but QDEC's
        residual, which stays in host memory: :attr:`qdec_nbytes`): bit planes, grid and bias."""
        planes = self.bits * self.out_features * -(-self.in_features // 8)
        return planes + self._held() - self.planes.nbytes - self.qdec_nbytes

    @property
    def qdec_nbytes(self) -> int:
        """Bytes of QDEC's residual (host memory)."""
        return sum(self._buffers[n].nbytes for n in QDEC_BUFFERS if n in self._buffers)

    @property
    def resident_nbytes(self) -> int:
        """Bytes this layer holds on its device now: its buffers and bias, and the decode kernel's copy
        of the codes with its grid (tinygemm's or the tiles') where it exists, the planes then gone
        unless the layer is read below its stored width. QDEC's residual, in host memory, is not counted."""
        held = self._held() - self.qdec_nbytes
        if self._fast is None:
            return held
        return held + sum(t.nbytes for x in self._fast[1:] for t in (x if isinstance(x, list) else [x]))

    def _held(self) -> int:
        return sum(t.nbytes for t in self.buffers()) + (self.bias.nbytes if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"read_bits={self.read_bits}, kind={self.kind}, group_size={self.group_size}, meta_bits={self.meta_bits}, "
                f"bias={self.bias is not None}" + (f", rank={self.rank}" if self.rank else "") + (f", qdec_k={self.qdec_k}, qdec_bits={self.qdec_bits}" if self.qdec_k else ""))
