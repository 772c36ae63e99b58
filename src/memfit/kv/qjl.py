"""QJL (Zandieh et al., 2024): keys as the signs of a Johnson-Lindenstrauss projection, plus one
norm per token; no scale or zero point.

Each key ``k`` (one head, one token) is stored as ``sign(S k)``, ``sketch`` bits, with ``S`` a fixed
``sketch x D`` Gaussian matrix (regenerated from ``seed``, never stored), and ``||k||`` in float16.
For a Gaussian row ``s``, ``E[sign(s.k) (s.q)] = sqrt(2 / pi) q.k / ||k||``, so

    q . k_hat,  k_hat = sqrt(pi / 2) / sketch * ||k|| * S^T sign(S k),

is an unbiased estimate of ``q . k`` for any query: the query is projected by the same ``S`` and
no quantization constant enters. As in the paper, the channels where keys carry outliers are kept
apart (the error grows with ``||k||``): each token's ``outliers`` largest channels are stored exactly
(uint8 index, float16 value) and the sketch encodes the rest. memfit reads the keys through ``k_hat`` (the same product, taken
after the attention's query projection), so QJL keys attend through the dequantized path.
The estimate's spread is about ``sqrt(pi / 2) ||q|| ||k|| / sqrt(sketch)``: QJL needs a sketch several
times the head dimension where keys carry large norms. Values stay
per-token quantized (KIVI's ``bits``, groups of ``group`` channels); recent tokens stay in the
16-bit window, ``residual`` of them, spilled ``group`` at a time as KIVI does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memfit.kv.quant import STORED, OnKIVI, Stored, token_outliers
from memfit.lazy import lazy_module

torch = lazy_module("torch")

_SKETCHES: dict[tuple, torch.Tensor] = {}


def sketch_matrix(m: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    """The ``m x d`` Gaussian projection for ``seed`` (float32; the same on every device: drawn on
    the CPU), built once per device."""
    key = (m, d, seed, str(device))
    if key not in _SKETCHES:
        g = torch.Generator().manual_seed(seed)
        _SKETCHES[key] = torch.randn(m, d, generator=g).to(device)
    return _SKETCHES[key]


def _pack_signs(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., m] -> uint8 [..., m / 8], the first sign in the lowest bit."""
    w = (1 << torch.arange(8, device=bits.device, dtype=torch.uint8))
    return (bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8) * w).sum(-1, dtype=torch.uint8)


def _unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m / 8] -> float32 [..., m] of +-1."""
    w = (1 << torch.arange(8, device=packed.device, dtype=torch.uint8))
    bits = (packed.unsqueeze(-1) & w) != 0
    return bits.reshape(*packed.shape[:-1], -1).float() * 2 - 1


@dataclass
class QJLTensor(Stored):
    """Keys as packed signs [B, H, N, sketch / 8] (uint8) and norms [B, H, N, 1] (float16) of what is
    left once each token's ``c`` largest channels are taken out: their indices [B, H, N, c] (uint8)
    and float16 values (None when ``c`` is 0)."""

    signs: torch.Tensor
    norm: torch.Tensor
    head_dim: int
    seed: int
    out_idx: torch.Tensor | None = None
    out_val: torch.Tensor | None = None

    @classmethod
    def encode(cls, k: torch.Tensor, sketch: int, seed: int, outliers: int = 0) -> "QJLTensor":
        s = sketch_matrix(sketch, k.shape[-1], seed, k.device)
        k, idx, val = token_outliers(k, outliers)
        return cls(_pack_signs(k @ s.T >= 0), k.norm(dim=-1, keepdim=True).to(torch.float16), k.shape[-1], seed,
                   idx, val)

    @property
    def sketch(self) -> int:
        return self.signs.shape[-1] * 8

    @property
    def num_tokens(self) -> int:
        return self.signs.shape[-2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, n, _ = self.signs.shape
        return b, h, n, self.head_dim

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"signs": self.signs, "norm": self.norm}
        if self.out_idx is not None:
            out.update(out_idx=self.out_idx, out_val=self.out_val)
        return out

    def meta(self) -> dict:
        return {"kind": "qjl", "head_dim": self.head_dim, "seed": self.seed}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "QJLTensor":
        return cls(t[prefix + "signs"], t[prefix + "norm"], int(meta["head_dim"]), int(meta["seed"]),
                   t.get(prefix + "out_idx"), t.get(prefix + "out_val"))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``k_hat`` (module docstring): unbiased inner products with any query."""
        s = sketch_matrix(self.sketch, self.head_dim, self.seed, self.signs.device)
        k = (_unpack_signs(self.signs) @ s) * (self.norm.float() * (math.sqrt(math.pi / 2) / self.sketch))
        if self.out_idx is not None:  # the exact channels replace the estimate there
            k = k.scatter(-1, self.out_idx.long(), self.out_val.float())
        return k.to(dtype or torch.float32)

    def cat(self, other: "QJLTensor") -> "QJLTensor":
        if (other.sketch, other.head_dim, other.seed, other.channels) != (self.sketch, self.head_dim, self.seed,
                                                                          self.channels):
            raise ValueError("cannot concatenate QJL keys of different sketches")
        cat = lambda a, b: None if a is None else torch.cat([a, b], -2)  # noqa: E731
        return QJLTensor(cat(self.signs, other.signs), cat(self.norm, other.norm), self.head_dim, self.seed,
                         cat(self.out_idx, other.out_idx), cat(self.out_val, other.out_val))

    @property
    def channels(self) -> int:
        return 0 if self.out_idx is None else self.out_idx.shape[-1]

    def prefix(self, n: int) -> "QJLTensor":
        cut = lambda a: None if a is None else a[:, :, :n].clone()  # noqa: E731
        return QJLTensor(cut(self.signs), cut(self.norm), self.head_dim, self.seed, cut(self.out_idx), cut(self.out_val))


STORED["qjl"] = QJLTensor


@dataclass(frozen=True)
class QJL(OnKIVI):
    """QJL keys (``sketch`` sign bits and a float16 norm per token and head, each token's ``outliers``
    largest channels kept exactly) and ``bits``-bit per-token values; see the module docstring."""

    sketch: int = 128
    bits: int = 4
    group: int = 64
    residual: int = 128
    # 8 of 64 channels: SmolLM2's perplexity 60.2 with 4, 32.1 with 8 (sketch 128; 502 with none)
    outliers: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sketch < 8 or self.sketch % 8:
            raise ValueError(f"qjl: sketch (sign bits per key) must be a positive multiple of 8, got {self.sketch}")
        self._check_kivi("qjl")
        if not 0 <= self.outliers < 256:
            raise ValueError(f"qjl: outliers (channels per token kept exactly) must be in [0, 256), got {self.outliers}")

    def quantize_keys(self, k: torch.Tensor) -> QJLTensor:
        if self.outliers >= k.shape[-1]:
            raise ValueError(f"qjl: outliers ({self.outliers} channels) must be below head_dim {k.shape[-1]}")
        return QJLTensor.encode(k, self.sketch, self.seed, self.outliers)

    def quantize_values(self, v: torch.Tensor):
        return self.kivi.quantize_values(v)  # values are KIVI's

    def token_bytes(self, d: int) -> float:
        values = d * self.bits / 8 + 4 * d / self.value_group(d)  # codes, float16 scale and zero a group
        return values + self.sketch / 8 + 2 + 3 * self.outliers  # signs, norm, outliers' uint8 index + value

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 0.0
