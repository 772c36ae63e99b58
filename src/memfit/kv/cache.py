"""CompressedCache: a transformers ``Cache`` whose storage is the compressed form itself.

Each layer holds, per row and KV head, the tokens that survived eviction: the oldest of them as
KIVI-packed codes (uint8) with float16 scales and zero points, the most recent ones in a 16-bit
window. Evicted tokens are gone from storage. RoPE was applied before the keys were stored, so
kept keys keep their original positions; the cache reports the *logical* length (every token it
has seen) to the model, so that new tokens get the right positions, and tells the mask builder
where its stored entries sit (``kv_offset``) so that causality among new tokens still holds.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memfit.kv.evict import select_topk
from memfit.kv.policy import Policy, parse_policy
from memfit.kv.quant import KIVI, QTensor, dequantize, quantize_keys, quantize_values

FULL_BYTES_PER_ELEMENT = 2  # the reference: an uncompressed 16-bit cache


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed KV storage. ``parent`` is a frozen layer shared by forks (read only)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, quant: KIVI | None = None, parent: "CompressedLayer | None" = None, defer: bool = False):
        super().__init__()
        self.quant = quant
        self.parent = parent
        self.defer = defer  # keep every token in the window until compress() (evict, then quantize)
        self.qk: QTensor | None = None
        self.qv: QTensor | None = None
        self._parent_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # parent dequantized once per fork
        self.seen = parent.get_seq_length() if parent is not None else 0  # logical tokens, evicted ones included

    # -- sizes -----------------------------------------------------------------------------------
    def _own_stored(self) -> int:
        q = self.qk.num_tokens if self.qk is not None else 0
        w = self.keys.shape[-2] if self.is_initialized else 0
        return q + w

    def stored_tokens(self) -> int:
        """Tokens actually held (per row and head), parent included."""
        return self._own_stored() + (self.parent.stored_tokens() if self.parent is not None else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_tokens()
        # Stored entries stand for the last `stored` logical slots before the query: causal masking
        # among the new tokens stays right, and every stored entry is visible to them.
        return stored + query_length, self.seen - stored

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer owns (not its parent's)."""
        out: dict[str, torch.Tensor] = {}
        if self.is_initialized:
            out["k_window"], out["v_window"] = self.keys, self.values
        if self.qk is not None:
            out.update({f"k_{n}": t for n, t in self.qk.tensors().items()})
            out.update({f"v_{n}": t for n, t in self.qv.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- reading and writing ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        if self.quant is not None:
            self.quant.value_group(d)  # fail early on a head_dim the config cannot group
        self.is_initialized = True

    def materialize(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything stored, dequantized to the compute dtype: [B, H, stored, D] keys and values."""
        ks, vs = [], []
        if self.parent is not None:
            # the parent is read-only while forks exist: dequantize it once, not at every step
            if self._parent_kv is None:
                self._parent_kv = self.parent.materialize()
            pk, pv = self._parent_kv
            if batch_size is not None and pk.shape[0] != batch_size:
                pk, pv = pk.expand(batch_size, -1, -1, -1), pv.expand(batch_size, -1, -1, -1)
            ks.append(pk)
            vs.append(pv)
        if self.qk is not None:
            ks.append(dequantize(self.qk, self.dtype))
            vs.append(dequantize(self.qv, self.dtype))
        if self.is_initialized:
            ks.append(self.keys)
            vs.append(self.values)
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.materialize(batch_size=key_states.shape[0])
        if past_k.shape[0] != key_states.shape[0]:
            raise ValueError(f"cache holds batch size {past_k.shape[0]}, got new states of batch size {key_states.shape[0]}")
        keys = torch.cat([past_k, key_states], dim=-2)
        values = torch.cat([past_v, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        self._spill()
        return keys, values

    def _spill(self) -> None:
        """Quantize the oldest window tokens, in whole key groups, once the window exceeds ``residual``."""
        if self.quant is None or self.defer:
            return
        n, g, r = self.keys.shape[-2], self.quant.group, self.quant.residual
        if n <= r:
            return
        f = min(math.ceil((n - r) / g) * g, (n // g) * g)
        if f == 0:
            return
        kq = quantize_keys(self.keys[:, :, :f], self.quant.bits, g)
        vq = quantize_values(self.values[:, :, :f], self.quant.bits, self.quant.value_group(self.keys.shape[-1]))
        self.qk = kq if self.qk is None else self.qk.cat(kq)
        self.qv = vq if self.qv is None else self.qv.cat(vq)
        # clone: a slice would keep the whole old window alive
        self.keys = self.keys[:, :, f:].clone()
        self.values = self.values[:, :, f:].clone()

    def compress(self, policy: Policy, queries: torch.Tensor | None = None) -> None:
        """End of prefill: apply the policy's evictions to the window, then quantize (evict, then quantize)."""
        if self.is_initialized and self.qk is None:
            k, v = self.keys, self.values
            for ev in policy.evictions:
                n = k.shape[-2]
                keep = ev.budget(n)
                if keep < n:
                    idx = select_topk(ev.score(k, v, queries), keep)
                    k, v = _gather_tokens(k, idx), _gather_tokens(v, idx)
            self.keys, self.values = k.contiguous(), v.contiguous()
        self.defer = False
        self._spill()

    # -- unsupported generation features: say so instead of silently corrupting ----------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("CompressedCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CompressedCache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("CompressedCache does not support num_return_sequences > 1; use fork(batch_size)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("CompressedCache does not support selecting batch rows")

    def reset(self) -> None:
        super().reset()
        self.keys = self.values = None
        self.is_initialized = False
        self.qk = self.qv = None
        self.seen = self.parent.get_seq_length() if self.parent is not None else 0


class CompressedCache(Cache):
    """A KV cache that stores the compressed form only.

    ``CompressedCache("kivi(bits=4)")`` quantizes as tokens arrive and works with
    ``model.generate(past_key_values=...)`` or a manual forward loop. Evictions need the whole
    context (and, for SnapKV, its last queries): ``memfit.LM.prefill`` applies them at the end of
    prefill through :meth:`compress`.
    """

    def __init__(self, policy: "str | Policy" = "none", num_layers: int | None = None, *, defer: bool = False,
                 _layers: list[CompressedLayer] | None = None):
        self.policy = parse_policy(policy)
        if _layers is None:
            if num_layers is None:
                raise ValueError("CompressedCache needs num_layers (model.config.num_hidden_layers)")
            _layers = [CompressedLayer(self.policy.quant, defer=defer) for _ in range(num_layers)]
        super().__init__(layers=_layers)

    @classmethod
    def for_model(cls, model: torch.nn.Module, policy: "str | Policy" = "none", **kwargs) -> "CompressedCache":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(policy, cfg.num_hidden_layers, **kwargs)

    def compress(self, queries: dict[int, torch.Tensor] | None = None) -> None:
        """Apply the policy's evictions and quantization to everything prefilled so far."""
        for i, layer in enumerate(self.layers):
            layer.compress(self.policy, (queries or {}).get(i))

    def derive(self, policy: "str | Policy", queries: dict[int, torch.Tensor] | None = None) -> "CompressedCache":
        """Compress a copy of this uncompressed (deferred) cache with ``policy``: one prefill, many
        policies. Tensors are shared until compression replaces them; this cache is unchanged."""
        if not all(layer.defer and layer.qk is None for layer in self.layers):
            raise RuntimeError("derive() needs a cache prefilled with defer=True and not compressed yet")
        out = CompressedCache(policy, len(self.layers), defer=True)
        for mine, theirs in zip(out.layers, self.layers):
            if theirs.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
                mine.keys, mine.values, mine.seen = theirs.keys, theirs.values, theirs.seen
        out.compress(queries)
        return out

    def fork(self, batch_size: int = 1) -> "CompressedCache":
        """A new cache that reads this one as a shared, read-only prefix (no copy) and stores new
        tokens for ``batch_size`` rows itself. This cache is left unchanged."""
        if any(layer.defer for layer in self.layers):
            raise RuntimeError("compress() the cache before forking it")
        rows = {layer.keys.shape[0] for layer in self.layers if layer.is_initialized}
        if rows and rows != {1} and rows != {batch_size}:
            raise ValueError(f"cannot fork a cache of batch size {rows.pop()} into {batch_size} rows")
        layers = [CompressedLayer(self.policy.quant, parent=layer) for layer in self.layers]
        return CompressedCache(self.policy, _layers=layers)

    # -- (de)serialization: plain tensors + a JSON-able description ----------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor held, named ``l{layer}.{name}``, and what is needed to rebuild the cache."""
        if any(layer.defer or layer.parent is not None for layer in self.layers):
            raise RuntimeError("only a compressed cache that is not a fork can be serialized")
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            tensors.update({f"l{i}.{n}": t.contiguous() for n, t in layer.tensors().items()})
            q = layer.qk
            layers.append({"seen": layer.seen, "dtype": str(layer.dtype).removeprefix("torch.") if layer.is_initialized else None,
                           "q": None if q is None else {"bits": q.bits, "kgroup": q.group, "vgroup": layer.qv.group}})
        return tensors, {"policy": self.policy.spec, "layers": layers}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict, device: "torch.device | str" = "cpu") -> "CompressedCache":
        cache = cls(state["policy"], len(state["layers"]))
        for i, (layer, info) in enumerate(zip(cache.layers, state["layers"])):
            layer.seen = int(info["seen"])
            if info["dtype"] is None:
                continue
            t = {n.split(".", 1)[1]: v.to(device) for n, v in tensors.items() if n.startswith(f"l{i}.")}
            layer.keys, layer.values = t["k_window"], t["v_window"]
            layer.dtype, layer.device, layer.is_initialized = getattr(torch, info["dtype"]), layer.keys.device, True
            if info["q"] is not None:
                q = info["q"]
                layer.qk = QTensor(t["k_codes"], t["k_scale"], t["k_zero"], q["bits"], "token", q["kgroup"])
                layer.qv = QTensor(t["v_codes"], t["v_scale"], t["v_zero"], q["bits"], "channel", q["vgroup"])
        return cache

    def truncate_(self, num_tokens: int) -> "CompressedCache":
        """Keep only the first ``num_tokens`` tokens, in place (prefix reuse of a cache without
        eviction). ``num_tokens`` must not cut a key group of the quantized part."""
        if self.policy.evictions:
            raise ValueError("an evicted cache is a function of its whole context: its prefix cannot be reused")
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            nq = layer.qk.num_tokens if layer.qk is not None else 0
            if num_tokens < nq:
                layer.qk, layer.qv = layer.qk.prefix(num_tokens), layer.qv.prefix(num_tokens)
            keep = max(0, num_tokens - nq)
            layer.keys, layer.values = layer.keys[:, :, :keep].clone(), layer.values[:, :, :keep].clone()
            layer.seen = num_tokens
        return self

    # -- figures -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Logical tokens seen (evicted ones included)."""
        return self.get_seq_length()

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds (a fork's shared prefix is not counted)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes an uncompressed 16-bit cache of the same tokens would take."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                own = layer.seen - (layer.parent.seen if layer.parent is not None else 0)
                total += 2 * b * h * own * d * FULL_BYTES_PER_ELEMENT
        return total
