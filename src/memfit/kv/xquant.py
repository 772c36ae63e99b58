"""XQuant: cache the layer input's coordinates, quantized, and rematerialize K and V from them.

Every key and value a layer stores is a linear image of its input: ``K = X W_k^T + b_k`` (before
RoPE), ``V = X W_v^T + b_v``. XQuant (Tomar et al., 2025) quantizes X instead of K and V and
recomputes them on read, trading a matmul for memory. On a GQA model X is wider than K or V
(SmolLM2: 576 against 3 KV heads of 64; Llama-3.1-8B: 4,096 against 1,024), so, as the paper does
for GQA, each of ``W_k``, ``W_v`` is factored by SVD, ``W = U S Vt``, and what is cached is X's
coordinates on the right-singular vectors ``W`` reads, ``z = X Vt^T`` (the rest of X never reaches K
or V). memfit's cache is handed K and V, not X, and needs no hook in the model: the same ``z``
follows from them exactly, ``z = (K - b) U S^-1``, and ``K = z S U^T + b`` rematerializes them.

``z_k`` is quantized per channel over groups of ``group`` tokens and ``z_v`` per token (KIVI's
axes, KIVI's codes and grids: the bytes of ``kivi(bits)``), keys before RoPE (put back on read).
The factors come from the model's weights (``CompressedCache.for_model``; a restored cache takes the
model again) and are not counted as cache bytes, as the weights are not. A token's X is shared by
all its heads, so XQuant cannot follow an eviction that keeps different tokens per head. XQuant-CL
(deltas of X between layers) needs the residual stream itself, which on a GQA model is wider than
K and V together: not built.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from memfit.kv.quant import STORED, OnKIVI, QTensor, Stored, kivi_token_bytes, quantize_keys, quantize_values
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass
class Factors:
    """One projection's SVD factors: ``down`` [H*D, r] = U S^-1 takes a flat K (or V) to ``z``,
    ``up`` [r, H*D] = S U^T brings it back; ``bias`` [H*D] or None."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, proj: torch.nn.Module) -> "Factors":
        """From a ``Linear`` or anything that gives its weight back (a quantized layer's ``dequantize()``)."""
        w = proj.dequantize() if hasattr(proj, "dequantize") else getattr(proj, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"xquant: cannot read the weight of {type(proj).__name__} (a Linear, or a layer with "
                             "dequantize())")
        dev = w.device
        u, s, _ = torch.linalg.svd(w.detach().to("cpu", torch.float64), full_matrices=False)  # u [H*D, r]
        inv = torch.where(s > s.max() * 1e-6, 1 / s, torch.zeros_like(s))  # directions W never writes: z = 0
        bias = proj.bias.detach().to(dev, torch.float32) if getattr(proj, "bias", None) is not None else None
        return cls((u * inv).to(dev, torch.float32), (u * s).T.contiguous().to(dev, torch.float32), bias)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] keys (before RoPE) or values -> their coordinates z [B, 1, N, r]."""
        b, h, n, d = x.shape
        flat = x.float().transpose(1, 2).reshape(b, n, h * d)
        if self.bias is not None:
            flat = flat - self.bias
        return (flat @ self.down).unsqueeze(1)

    def remat(self, z: torch.Tensor, heads: int) -> torch.Tensor:
        """z [B, 1, N, r] -> [B, H, N, D]."""
        flat = z[:, 0].float() @ self.up
        if self.bias is not None:
            flat = flat + self.bias
        b, n, hd = flat.shape
        return flat.reshape(b, n, heads, hd // heads).transpose(1, 2)


@dataclass
class Remat:
    """A layer's factors for keys and values (from its attention's ``k_proj`` / ``v_proj``)."""

    k: Factors
    v: Factors

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "list[Remat]":
        """One per decoder layer, in order: every module with ``k_proj`` and ``v_proj`` (Llama, Qwen,
        Mistral and their kin name them so). Factored once per model (each prefill derives caches)."""
        if model not in _FACTORED:
            _FACTORED[model] = cls._factor(model)
        return _FACTORED[model]

    @classmethod
    def _factor(cls, model: torch.nn.Module) -> "list[Remat]":
        attns = [m for m in model.modules() if isinstance(getattr(m, "k_proj", None), torch.nn.Module)
                 and isinstance(getattr(m, "v_proj", None), torch.nn.Module)]
        if not attns:
            raise ValueError("xquant rematerializes K and V from the attention's k_proj and v_proj weights; "
                             f"{type(model).__name__} has no such modules")
        return [cls(Factors.of(a.k_proj), Factors.of(a.v_proj)) for a in attns]


_FACTORED: "weakref.WeakKeyDictionary[torch.nn.Module, list[Remat]]" = weakref.WeakKeyDictionary()


@dataclass
class XLatent(Stored):
    """A run of ``z`` codes (KIVI's ``QTensor`` [B, 1, N, r]) standing for keys or values [B, H, N, D]
    (``which``), rematerialized with ``factors`` (the model's, attached by the layer: not stored)."""

    q: QTensor
    heads: int
    which: str
    factors: Factors | None = None

    @property
    def num_tokens(self) -> int:
        return self.q.num_tokens

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, _, n, r = self.q.shape
        return b, self.heads, n, r // self.heads

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.factors is None:
            raise ValueError("xquant: rematerializing K and V needs the model's k_proj / v_proj: build the cache "
                             "with CompressedCache.for_model(model, policy), restore it with "
                             "from_state(..., model=model)")
        return self.factors.remat(self.q.dequantize(torch.float32), self.heads).to(dtype or torch.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.q.tensors()

    def meta(self) -> dict:
        return {"kind": "xquant", "which": self.which, "heads": self.heads, "q": self.q.meta()}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "XLatent":
        return cls(QTensor.from_meta(t, prefix, meta["q"]), meta["heads"], meta["which"])

    def attach(self, remat: Remat) -> None:
        self.factors = remat.k if self.which == "k" else remat.v

    def cat(self, other: "XLatent") -> "XLatent":
        return XLatent(self.q.cat(other.q), self.heads, self.which, self.factors)

    def prefix(self, n: int) -> "XLatent":
        return XLatent(self.q.prefix(n), self.heads, self.which, self.factors)


STORED["xquant"] = XLatent


@dataclass(frozen=True)
class XQuant(OnKIVI):
    """K and V cached as the layer input's ``bits``-bit coordinates and rematerialized on read (see
    the module docstring); the newest ``residual`` tokens in 16-bit, as KIVI's window."""

    bits: int = 4
    group: int = 64
    residual: int = 128

    pre_rope = True  # z is X's: keys come off RoPE before, and RoPE goes back on after rematerializing
    rope_in_forks = True  # a fork's runs are z of its own tokens, RoPE off and on at its own positions
    needs_model = True  # the layer hands its factors (``Remat``) to quantize_keys / quantize_values

    def __post_init__(self) -> None:
        self._check_kivi("xquant")

    @staticmethod
    def model_parts(model: torch.nn.Module) -> "list[Remat]":
        return Remat.of_model(model)

    def quantize_keys(self, k: torch.Tensor, model_part: Remat | None = None, **_) -> XLatent:
        f = self._need(model_part).k
        return XLatent(quantize_keys(f.latent(k), self.bits, self.group), k.shape[1], "k", f)

    def quantize_values(self, v: torch.Tensor, model_part: Remat | None = None, **_) -> XLatent:
        f = self._need(model_part).v
        z = f.latent(v)
        return XLatent(quantize_values(z, self.bits, self.value_group(v.shape[-1])), v.shape[1], "v", f)

    @staticmethod
    def _need(remat: Remat | None) -> Remat:
        if remat is None:
            raise ValueError("xquant needs the model's k_proj / v_proj weights: build the cache with "
                             "CompressedCache.for_model(model, policy)")
        return remat

    def token_bytes(self, d: int) -> float:
        """KIVI's: z has as many coordinates as K (or V) has elements (fewer where W is rank-deficient)."""
        return kivi_token_bytes(self.bits, d, self.group, self.value_group(d))

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 0.0  # the factors are the model's weights, recomputed from them
