"""GEAR (Kang et al., 2024): quantize, then keep what quantization lost as a low-rank matrix plus a
sparse set of the largest entries.

Keys and values are quantized as KIVI does (``bits``, keys per channel in groups of ``group`` tokens,
values per token), with KVQuant's dense-and-sparse split taking out the ``outliers`` fraction of each
head's elements first (GEAR's sparse matrix: they are kept exactly). The error left, ``E = X -
dequant(Q(X))`` [N, D] per head, gets its top ``rank`` directions (an eigendecomposition of ``E^T
E``): ``E ~ A B`` with ``A`` [N, rank] per token and ``B`` [rank, D] per head, both float16, added
back on read. Tokens quantized later (the window spilling while decoding) get their own fit, which
is then moved onto the basis their head already has (``A' = A B_new B^T``), so a layer keeps one ``B``.

What it costs beside KIVI's bytes: ``rank`` float16 values per token, head and tensor, and the
bases (``2 * rank * D`` float16 per head and tensor). How much it buys depends on how structured the
error is: on SmolLM2's KV at 2 bits the top 4 of 64 directions hold about 10-17% of the error's
energy (the error is close to white); see docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.kv.quant import KIVI, STORED, OnCodes, OnKIVI, QTensor, kivi_token_bytes
from memfit.lazy import lazy_module

torch = lazy_module("torch")


def _error_basis(e: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` right singular vectors of each [N, D] slice of ``e`` [B, H, N, D]: [B, H, rank, D]."""
    cov = e.transpose(-1, -2) @ e  # [B, H, D, D]: cheaper than an SVD of the N x D error
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[..., -rank:].flip(-1).transpose(-1, -2).contiguous()


@dataclass
class GearTensor(OnCodes):
    """KIVI codes (``q``) plus the low-rank part of their error: ``a`` [B, H, N, rank] and ``basis``
    [B, H, rank, D], float16."""

    q: QTensor
    a: torch.Tensor
    basis: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, q: QTensor, rank: int, basis: torch.Tensor | None = None) -> "GearTensor":
        """``x``'s codes ``q`` with the low-rank part of ``x - dequant(q)``, on ``basis`` if given."""
        e = x.float() - q.dequantize(torch.float32)
        if basis is None:
            basis = _error_basis(e, rank).to(torch.float16)
        return cls(q, (e @ basis.float().transpose(-1, -2)).to(torch.float16), basis)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.q.tensors(), "lr_a": self.a, "lr_basis": self.basis}

    def meta(self) -> dict:
        return {"kind": "gear", "q": self.q.meta()}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "GearTensor":
        return cls(QTensor.from_meta(t, prefix, meta["q"]), t[prefix + "lr_a"], t[prefix + "lr_basis"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = self.q.dequantize(torch.float32) + self.a.float() @ self.basis.float()
        return out.to(dtype or torch.float32)

    def cat(self, other: "GearTensor") -> "GearTensor":
        """``other``'s tokens after these, their error moved onto this basis (one basis per head: a
        decode step's few tokens would not fit one of their own well)."""
        if other.basis.shape != self.basis.shape:
            raise ValueError("cannot concatenate GEAR tensors of different ranks or shapes")
        a = other.a.float() @ (other.basis.float() @ self.basis.float().transpose(-1, -2))
        return GearTensor(self.q.cat(other.q), torch.cat([self.a, a.to(self.a.dtype)], dim=-2), self.basis)

    def prefix(self, n: int) -> "GearTensor":
        return GearTensor(self.q.prefix(n), self.a[:, :, :n].clone(), self.basis)


STORED["gear"] = GearTensor


@dataclass(frozen=True)
class GEAR(OnKIVI):
    """GEAR: ``bits``-bit KIVI codes, the ``outliers`` fraction of elements kept exactly, and a
    rank-``rank`` float16 approximation of the remaining error per head (see the module docstring)."""

    bits: int = 2
    group: int = 64
    residual: int = 128
    rank: int = 4
    outliers: float = 0.01
    pre_rope: bool = field(default=False, metadata={"spec": "if-set"})

    def __post_init__(self) -> None:
        self._check_kivi("gear")  # KIVI's checks on bits, group, residual and outliers
        if self.rank < 1:
            raise ValueError(f"gear: rank must be >= 1, got {self.rank}")

    @property
    def kivi(self) -> KIVI:
        return KIVI(self.bits, self.group, self.residual, self.outliers, self.pre_rope)

    def _fit(self, x: torch.Tensor, q: QTensor) -> GearTensor:
        if self.rank >= x.shape[-1]:
            raise ValueError(f"gear: rank {self.rank} must be below head_dim {x.shape[-1]}")
        return GearTensor.fit(x, q, self.rank)

    def quantize_keys(self, k: torch.Tensor) -> GearTensor:
        return self._fit(k, self.kivi.quantize_keys(k))

    def quantize_values(self, v: torch.Tensor) -> GearTensor:
        return self._fit(v, self.kivi.quantize_values(v))

    def token_bytes(self, d: int) -> float:
        return kivi_token_bytes(self.bits, d, self.group, self.value_group(d), self.outliers) + 2 * 2 * self.rank

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 2 * heads * self.rank * d * 2  # a float16 basis per head for keys and for values
