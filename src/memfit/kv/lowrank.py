"""Low-rank keys: each layer's keys (all KV heads together) projected onto a basis found from the
context itself, storing ``rank`` coefficients per token instead of ``heads * head_dim`` values.

Keys are far from full rank (their spectrum decays fast; ShadowKV, Palu, Loki build on this), and
the basis is fitted per layer to the very context it will serve, so no calibration is needed. The
coefficients can be quantized like keys (per channel, in groups of tokens): ``lowrank(rank=64)+kivi(bits=4)``.

``layers=G`` is xKV's cross-layer SVD (Chang et al., 2025): the keys of ``G`` adjacent layers share
their dominant directions, so the context's keys of a group of layers, side by side ([N, G*H*D]),
get one decomposition ``X ~ A V^T``: the token coefficients ``A`` [N, rank] are stored once for the
group and each layer keeps its block of ``V`` [H*D, rank] (layer ``l``'s keys are ``A V_l^T``). A
rank-``r`` group then costs ``r`` values a token for ``G`` layers instead of ``r`` each. The
coefficients are the whole context's, unquantized (no eviction, which keeps different tokens in
each layer, and no quantizer: the spec parser refuses both); later tokens stay in the 16-bit window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class LowRank:
    """Keep the top ``rank`` directions of each layer's keys (concatenated over KV heads)."""

    rank: int = 64
    # adjacent layers sharing one set of token coefficients (xKV); 1: a basis per layer
    layers: int = field(default=1, metadata={"spec": "if-set"})

    def __post_init__(self) -> None:
        if self.rank < 8 or self.rank % 8:
            raise ValueError(f"lowrank: rank must be a positive multiple of 8, got {self.rank}")
        if self.layers < 1:
            raise ValueError(f"lowrank: layers must be >= 1, got {self.layers}")

    def check(self, heads: int, head_dim: int) -> None:
        if self.rank >= heads * head_dim:
            raise ValueError(f"lowrank: rank {self.rank} saves nothing for keys of {heads} heads x {head_dim} "
                             f"channels ({heads * head_dim} per token); use a smaller rank")

    def basis(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, H, N, D] -> orthonormal basis [B, H*D, rank] (the top right singular vectors of
        the [N, H*D] key matrix of each row), in the keys' dtype."""
        self.check(keys.shape[1], keys.shape[3])
        return _top_directions(_flat(keys), self.rank).contiguous().to(keys.dtype)

    def shared(self, keys: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """xKV: the keys [B, H, N, D] of adjacent layers -> token coefficients [B, 1, N, rank] shared by
        them (the top directions of their keys side by side, ``X V``) and each layer's block of ``V``
        [B, H*D, rank], so that layer ``l``'s keys are ``reconstruct(coef, blocks[l], H)``."""
        h, d = keys[0].shape[1], keys[0].shape[3]
        if self.rank >= len(keys) * h * d:
            raise ValueError(f"lowrank: rank {self.rank} saves nothing for {len(keys)} layers of {h} heads x {d} "
                             "channels")
        flat = torch.cat([_flat(k) for k in keys], dim=-1)
        v = _top_directions(flat, self.rank)
        dt = keys[0].dtype
        return (flat @ v).to(dt).unsqueeze(1), [blk.contiguous().to(dt) for blk in v.split(h * d, dim=1)]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()  # 16-bit in, float32 math


def _flat(keys: torch.Tensor) -> torch.Tensor:
    """keys [B, H, N, D] -> [B, N, H*D] (each token's heads side by side), upcast."""
    b, h, n, d = keys.shape
    return _upcast(keys.transpose(1, 2).reshape(b, n, h * d))


def _top_directions(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` right singular vectors of each row's ``flat`` [B, N, C] -> [B, C, rank], largest
    first: the eigenvectors of ``flat^T flat``, one small [C, C] problem however long the context."""
    _, vecs = torch.linalg.eigh(flat.transpose(1, 2) @ flat)
    return vecs[..., -rank:].flip(-1)


def project(keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """keys [B, H, N, D], basis [B, H*D, r] -> coefficients [B, 1, N, r]."""
    return (_flat(keys) @ _upcast(basis)).to(keys.dtype).unsqueeze(1)


def reconstruct(coef: torch.Tensor, basis: torch.Tensor, heads: int) -> torch.Tensor:
    """coefficients [B, 1, N, r] -> keys [B, H, N, D] (their projection onto the basis)."""
    b, _, n, _ = coef.shape
    flat = _upcast(coef[:, 0]) @ _upcast(basis).transpose(1, 2)
    return flat.reshape(b, n, heads, -1).transpose(1, 2).to(coef.dtype)
