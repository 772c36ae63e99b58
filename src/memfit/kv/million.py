"""MILLION (Wang et al., DAC 2025): product quantization of keys and values.

Each head's vector of ``D`` channels is cut into ``D / sub`` sub-vectors of ``sub`` channels; each
sub-vector is stored as the index of its nearest centroid in a codebook of ``2**(bits * sub)``
centroids fitted to that sub-space by k-means on the context itself. The codes cost ``bits`` per
element and there is no per-group scale or zero point: the only other bytes are the codebooks, one per
layer, sub-space and tensor (keys, values), shared by the layer's heads (float16, ``2 * D * 2**(bits
* sub)`` bytes a tensor), which a long context amortises. A codebook spends its levels where the data
is (a uniform grid spends them on the range), and a sub-vector's centroids follow how its channels
vary together, so PQ keeps more per bit than per-channel scalar codes; the paper calls it "outlier-
immunized" for that reason. Each token's ``outliers`` largest channels can still be kept exactly
(uint8 index, float16 value: 3 bytes each) and are taken out before the fit.

Keys are grouped so that each sub-vector holds whole RoPE pairs (channels ``i`` and ``i + D/2``,
which RoPE rotates together): a pair's post-RoPE points lie on rings the k-means fits, where a
split pair would scatter them across two sub-spaces. ``rotate`` multiplies by the Hadamard matrix
first instead (OPQ's balancing of the sub-spaces' variance, with a fixed rotation).

Fitting costs k-means on at most ``fit_tokens`` sampled vectors per layer (``iters`` rounds of
assignment and update), then one assignment of every token. Tokens quantized later (the 16-bit
window spilling while decoding: ``extend``) are encoded on the codebook the layer already has: one
codebook per layer, no refit. Stacking ragged contexts (``cat``) encodes the second run's values
again on the first run's codebook, which adds that codebook's error to theirs.

Measured on SmolLM2 (shipped essay, 2,980 tokens, half as context, ``residual=32``; 16-bit 26.45):
2 bits, ``sub=4`` 30.52 at 3.09 bits an element counted (``kivi(bits=2)`` 34.01 at 2.66; the codebooks
are about 0.6 bit an element at this length), with 2 exact channels a token 28.88 at 3.83; 4 bits
(``sub=2``) 27.20. Better than KIVI's grid at 2 bits, worse than ``hadamard(bits=2)`` (26.79 at 2.71),
whose 16-bit sinks and clipping it lacks. On the 5 default tasks at 1K tokens it keeps less than its
perplexity suggests: 71% of 16-bit accuracy at 4 bits (``kivi(bits=4)`` 93%), 5% at 2 bits (KIVI 16%),
probably because centroids fitted to the context serve its common vectors and fold rare ones (a
needle's) into them. Prefill of 4K tokens on a 2-core CPU in bfloat16: 3.89 s against 2.25 s without
compression (the fit and the search; 13.84 s before the search moved to faiss, see ``_assign``). In
bfloat16 (the default now) 2 bits give 31.58 against none's 26.49; the torch search gave 31.62 (ties
broken otherwise: faiss computes each distance directly, torch as ||c||^2 - 2 x.c).
"""

from __future__ import annotations

from dataclasses import dataclass

from memfit.kv.quant import KIVI, STORED, OnKIVI, Stored, token_outliers
from memfit.kv.rotate import hadamard
from memfit.lazy import lazy_module

torch = lazy_module("torch")
packing = lazy_module("memfit.kernels.packing")

_CHUNK = 1 << 20  # distances computed at a time by the torch path (a [P, C] block that stays in cache)


def _order(d: int, pairs: bool) -> torch.Tensor:
    """Channel order in which consecutive ``sub`` channels make a sub-vector: RoPE's pairs (i, i + d/2)
    side by side, or the natural order."""
    if not pairs or d % 2:
        return torch.arange(d)
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2, d)], 1).reshape(-1)


def _faiss():
    """faiss, or None where it is not installed (the torch path then does the search)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _assign_faiss(faiss, x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``_assign`` for codebooks of 256 centroids by faiss's product-quantizer encoder: distances and
    their minimum in one pass per point (SIMD; the [P, C] distances are never written to memory)."""
    b, s, p, sub = x.shape
    out = torch.empty(b, s, p, dtype=torch.int64)
    for i in range(b):
        pq = faiss.ProductQuantizer(s * sub, s, 8)
        faiss.copy_array_to_vector(cb[i].contiguous().numpy().ravel(), pq.centroids)
        codes = pq.compute_codes(x[i].transpose(0, 1).reshape(p, s * sub).contiguous().numpy())  # uint8 [P, S]
        out[i] = torch.from_numpy(codes).long().T
    return out


def _assign(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: ``x`` [B, S, P, sub], ``cb`` [B, S, C, sub] (float32) -> int64
    [B, S, P]. faiss on CPU for 256 centroids when installed; otherwise in torch, a block at a time."""
    b, s, p, sub = x.shape
    c = cb.shape[2]
    # faiss where the [P, C] distances are largest (8-bit codes): 2.6x the torch path below there
    faiss = _faiss() if x.device.type == "cpu" and c == 256 else None
    if faiss is not None:
        return _assign_faiss(faiss, x.float(), cb.float())
    norms = (cb * cb).sum(-1).reshape(b * s, 1, c)
    cbt = cb.reshape(b * s, c, sub).transpose(1, 2)
    xf = x.reshape(b * s, p, sub)
    step = max(1, _CHUNK // max(1, b * s * c))
    out = torch.empty(b * s, p, dtype=torch.int64, device=x.device)
    for i in range(0, p, step):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centroid. min's indices:
        # twice as fast as argmin on CPU
        out[:, i:i + step] = torch.baddbmm(norms, xf[:, i:i + step], cbt, alpha=-2).min(-1).indices
    return out.view(b, s, p)


def kmeans(x: torch.Tensor, centroids: int, iters: int, fit_tokens: int, seed: int = 0) -> torch.Tensor:
    """Codebooks [B, S, C, sub] (float32) for the points ``x`` [B, S, P, sub] of each batch row and
    sub-space: Lloyd's k-means on at most ``fit_tokens`` points drawn without replacement, started
    from distinct points (with no more points than centroids, the points themselves: exact)."""
    b, s, p, sub = x.shape
    g = torch.Generator().manual_seed(seed)
    if p > fit_tokens:
        x = x[:, :, torch.randperm(p, generator=g)[:fit_tokens].to(x.device)]
        p = fit_tokens
    start = torch.randperm(p, generator=g)[:centroids].to(x.device)
    cb = x[:, :, start]
    if p <= centroids:  # every point a centroid; pad with copies of the first
        return torch.cat([cb, cb[:, :, :1].expand(b, s, centroids - p, sub)], 2)
    for _ in range(iters):
        a = _assign(x, cb)
        sums = torch.zeros_like(cb).scatter_add_(2, a.unsqueeze(-1).expand(-1, -1, -1, sub), x)
        count = torch.zeros(b, s, centroids, device=x.device).scatter_add_(2, a, torch.ones_like(a, dtype=x.dtype))
        # an empty cluster keeps its centroid
        cb = torch.where(count.unsqueeze(-1) > 0, sums / count.clamp_min(1).unsqueeze(-1), cb)
    return cb


@dataclass
class PQTensor(Stored):
    """Codes [B, H, N, S * w / 8] (uint8, ``w = log2(C)`` bits each, packed along the last dimension),
    ``codebook`` [B, S, C, sub] (float16; one per batch row, shared by the heads) and each token's
    exact channels ``out_idx`` [B, H, N, c] (uint8) / ``out_val`` (float16), or None."""

    codes: torch.Tensor
    codebook: torch.Tensor
    pairs: bool
    rotate: bool
    out_idx: torch.Tensor | None = None
    out_val: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.codebook.shape[2].bit_length() - 1

    @property
    def head_dim(self) -> int:
        return self.codebook.shape[1] * self.codebook.shape[3]

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, n, _ = self.codes.shape
        return b, h, n, self.head_dim

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "codebook": self.codebook}
        if self.out_idx is not None:
            out.update(out_idx=self.out_idx, out_val=self.out_val)
        return out

    def meta(self) -> dict:
        return {"kind": "million", "pairs": self.pairs, "rotate": self.rotate}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "PQTensor":
        return cls(t[prefix + "codes"], t[prefix + "codebook"], bool(meta["pairs"]), bool(meta["rotate"]),
                   t.get(prefix + "out_idx"), t.get(prefix + "out_val"))

    @classmethod
    def encode(cls, x: torch.Tensor, codebook: torch.Tensor | None, *, bits: int, sub: int, pairs: bool,
               rotate: bool, outliers: int, iters: int, fit_tokens: int) -> "PQTensor":
        """``x`` [B, H, N, D] on ``codebook`` (None: fit one to ``x``)."""
        b, h, n, d = x.shape
        x, idx, val = token_outliers(x, outliers)
        if rotate:
            x = x @ hadamard(d, x.device)
        s = d // sub
        pts = x[..., _order(d, pairs and not rotate).to(x.device)].reshape(b, h * n, s, sub).transpose(1, 2)
        if codebook is None:
            codebook = kmeans(pts, 1 << (bits * sub), iters, fit_tokens).clamp(-65504, 65504).to(torch.float16)
        codes = _assign(pts, codebook.float()).transpose(1, 2).reshape(b, h, n, s).to(torch.uint8)
        w = bits * sub
        return cls(codes if w == 8 else packing.pack(codes, w), codebook, pairs, rotate, idx, val)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        b, h, n, d = self.shape
        _, s, c, sub = self.codebook.shape
        codes = self.codes if self.width == 8 else packing.unpack(self.codes, self.width)
        cb = self.codebook.float()
        # each sub-space's centroid for each token: [B, S, H N, sub]
        pts = cb.gather(2, codes.reshape(b, h * n, s).transpose(1, 2).long().unsqueeze(-1).expand(-1, -1, -1, sub))
        y = torch.empty(b, h, n, d, device=cb.device)
        y[..., _order(d, self.pairs and not self.rotate).to(cb.device)] = pts.transpose(1, 2).reshape(b, h, n, d)
        if self.rotate:
            y = y @ hadamard(d, y.device).T
        if self.out_idx is not None:
            y = y.scatter(-1, self.out_idx.long(), self.out_val.float())
        return y.to(dtype or torch.float32)

    def _outliers(self) -> int:
        return 0 if self.out_idx is None else self.out_idx.shape[-1]

    def _append(self, codes: torch.Tensor, idx: torch.Tensor | None, val: torch.Tensor | None) -> "PQTensor":
        cat = lambda a, o: None if a is None else torch.cat([a, o], -2)  # noqa: E731
        return PQTensor(torch.cat([self.codes, codes], -2), self.codebook, self.pairs, self.rotate,
                        cat(self.out_idx, idx), cat(self.out_val, val))

    def _on_codebook(self, x: torch.Tensor, outliers: int) -> "PQTensor":
        """``x`` [B, H, n, D] encoded on this codebook, in this format."""
        sub = self.codebook.shape[3]
        return PQTensor.encode(x, self.codebook, bits=self.width // sub, sub=sub, pairs=self.pairs,
                               rotate=self.rotate, outliers=outliers, iters=0, fit_tokens=1)

    extends = True  # the window's spills are encoded on this codebook (CompressedLayer._spill)

    def extend(self, x: torch.Tensor) -> "PQTensor":
        """Tokens ``x`` [B, H, n, D] after these, encoded on this codebook (the window spilling while
        decoding: one codebook per layer, fitted on the context)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"cannot extend product-quantized tensors of head_dim {self.head_dim} with {x.shape[-1]}")
        new = self._on_codebook(x, self._outliers())
        return self._append(new.codes, new.out_idx, new.out_val)

    def cat(self, other: "PQTensor") -> "PQTensor":
        """``other``'s tokens after these (another context's run, when ragged layers are stacked): what
        its codes stand for, encoded again on this codebook, its exact channels kept as they are."""
        # the codebooks' shape fixes head_dim, sub-vectors and width
        if other._outliers() != self._outliers() or other.codebook.shape != self.codebook.shape or \
                (other.pairs, other.rotate) != (self.pairs, self.rotate):
            raise ValueError("cannot concatenate product-quantized tensors of different formats")
        x = other.dequantize(torch.float32)
        if other.out_idx is not None:
            x = x.scatter(-1, other.out_idx.long(), 0.0)
        return self._append(self._on_codebook(x, 0).codes, other.out_idx, other.out_val)

    def prefix(self, n: int) -> "PQTensor":
        cut = lambda a: None if a is None else a[:, :, :n].clone()  # noqa: E731
        return PQTensor(cut(self.codes), self.codebook, self.pairs, self.rotate, cut(self.out_idx), cut(self.out_val))


STORED["million"] = PQTensor


@dataclass(frozen=True)
class Million(OnKIVI):
    """Product-quantized keys and values (MILLION): ``bits`` per element, sub-vectors of ``sub``
    channels (codebooks of ``2**(bits * sub)`` centroids, fitted on the context: ``iters`` k-means
    rounds on at most ``fit_tokens`` vectors), each token's ``outliers`` largest channels exact,
    ``rotate``: a Hadamard rotation first; the most recent ``residual`` tokens in 16-bit, spilled
    ``group`` at a time. See the module docstring."""

    bits: int = 2
    sub: int = 4
    residual: int = 128
    group: int = 64
    outliers: int = 0
    rotate: bool = False
    iters: int = 6
    fit_tokens: int = 2048  # SmolLM2's perplexity at 2 bits: 30.28 with 4096 and 8 rounds, 30.52 (1.6x faster)

    def __post_init__(self) -> None:
        w = self.bits * self.sub
        if self.bits < 1 or self.sub < 1 or w not in packing.SUPPORTED_BITS:
            raise ValueError(f"million: bits * sub is the code width and must be one of {packing.SUPPORTED_BITS} "
                             f"(bits {self.bits}, sub {self.sub})")
        self._check_kivi("million")  # KIVI's checks on group and residual
        if not 0 <= self.outliers < 256:
            raise ValueError(f"million: outliers (channels per token kept exactly) must be in [0, 256), "
                             f"got {self.outliers}")
        if self.iters < 0 or self.fit_tokens < 1:
            raise ValueError(f"million: iters must be >= 0 and fit_tokens >= 1, got {self.iters} / {self.fit_tokens}")

    @property
    def kivi(self) -> KIVI:
        """KIVI's window arithmetic (the 16-bit window, spilled in whole groups); its width is unused
        (KIVI has no 1-bit codes)."""
        return KIVI(8, self.group, self.residual)

    def _encode(self, x: torch.Tensor, pairs: bool) -> PQTensor:
        d = x.shape[-1]
        if d % self.sub:
            raise ValueError(f"million: head_dim {d} must be a multiple of sub={self.sub}")
        if self.outliers >= d:
            raise ValueError(f"million: outliers ({self.outliers} channels) must be below head_dim {d}")
        return PQTensor.encode(x, None, bits=self.bits, sub=self.sub, pairs=pairs, rotate=self.rotate,
                               outliers=self.outliers, iters=self.iters, fit_tokens=self.fit_tokens)

    def quantize_keys(self, k: torch.Tensor) -> PQTensor:
        return self._encode(k, pairs=True)

    def quantize_values(self, v: torch.Tensor) -> PQTensor:
        return self._encode(v, pairs=False)

    def token_bytes(self, d: int) -> float:
        return 2 * (d * self.bits / 8 + 3 * self.outliers)  # keys and values: codes, exact channels

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 2 * d * (1 << (self.bits * self.sub)) * 2  # a float16 codebook for keys and one for values
