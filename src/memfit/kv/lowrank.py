"""Low-rank keys: each layer's keys (all KV heads together) projected onto a basis found from the
context itself, storing ``rank`` coefficients per token instead of ``heads * head_dim`` values.

Keys are far from full rank (their spectrum decays fast; ShadowKV, Palu, Loki build on this), and
the basis is fitted per layer to the very context it will serve, so no calibration is needed. The
coefficients can be quantized like keys (per channel, in groups of tokens): ``lowrank(rank=64)+kivi(bits=4)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class LowRank:
    """Keep the top ``rank`` directions of each layer's keys (concatenated over KV heads)."""

    rank: int = 64

    def __post_init__(self) -> None:
        if self.rank < 8 or self.rank % 8:
            raise ValueError(f"lowrank: rank must be a positive multiple of 8, got {self.rank}")

    def check(self, heads: int, head_dim: int) -> None:
        if self.rank >= heads * head_dim:
            raise ValueError(f"lowrank: rank {self.rank} saves nothing for keys of {heads} heads x {head_dim} "
                             f"channels ({heads * head_dim} per token); use a smaller rank")

    def basis(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, H, N, D] -> orthonormal basis [B, H*D, rank] (the top right singular vectors of
        the [N, H*D] key matrix of each row), in the keys' dtype."""
        b, h, n, d = keys.shape
        self.check(h, d)
        flat = _upcast(keys.transpose(1, 2).reshape(b, n, h * d))
        # the eigenvectors of K^T K: one small [H*D, H*D] problem however long the context
        _, vecs = torch.linalg.eigh(flat.transpose(1, 2) @ flat)
        return vecs[..., -self.rank :].flip(-1).contiguous().to(keys.dtype)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()  # 16-bit in, float32 math


def project(keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """keys [B, H, N, D], basis [B, H*D, r] -> coefficients [B, 1, N, r]."""
    b, h, n, d = keys.shape
    flat = keys.transpose(1, 2).reshape(b, n, h * d)
    return (_upcast(flat) @ _upcast(basis)).to(keys.dtype).unsqueeze(1)


def reconstruct(coef: torch.Tensor, basis: torch.Tensor, heads: int) -> torch.Tensor:
    """coefficients [B, 1, N, r] -> keys [B, H, N, D] (their projection onto the basis)."""
    b, _, n, _ = coef.shape
    flat = _upcast(coef[:, 0]) @ _upcast(basis).transpose(1, 2)
    return flat.reshape(b, n, heads, -1).transpose(1, 2).to(coef.dtype)
