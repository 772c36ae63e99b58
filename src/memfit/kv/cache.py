"""CompressedCache: a transformers ``Cache`` whose storage is the compressed form itself.

Each layer holds, per row and KV head, the tokens that survived eviction: the oldest of them as
KIVI-packed codes (uint8) with float16 scales and zero points, the most recent ones in a 16-bit
window. Evicted tokens are gone from storage. RoPE was applied before the keys were stored, so
kept keys keep their original positions; the cache reports the *logical* length (every token it
has seen) to the model, so that new tokens get the right positions, and tells the mask builder
where its stored entries sit (``kv_offset``) so that causality among new tokens still holds.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memfit.kernels.decode_attention import decode_attention
from memfit.kv.attention import ATTN_IMPLEMENTATION, pop_scores, push_head_mask, push_packed, request_scores
from memfit.kv.decode import DecodeBudget
from memfit.kv.evict import Observation, select_global, select_topk
from memfit.kv.lowrank import LowRank, project, reconstruct
from memfit.kv.policy import Policy, parse_policy
from memfit.kv.quant import KIVI, LayerBits, QTensor, attention_error, dequantize, quantize_keys, quantize_values
from memfit.kv.rope import RoPE
from memfit.kv.static import StaticKIVI

FULL_BYTES_PER_ELEMENT = 2  # the reference: an uncompressed 16-bit cache


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


class Ragged:
    """Per-head token counts that differ (adaptive eviction), stored without padding: every head's
    tokens back to back, as one flat [1, 1, T, D] sequence. With a quantizer each head's oldest
    tokens are quantized in whole key groups (so no group spans two heads) and the rest kept in
    16-bit, as the uniform window would be. Batch size 1."""

    def __init__(self, lens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: QTensor | None = None,
                 qv: QTensor | None = None):
        self.lens = lens  # int32 [2, H]: tokens per head, of which quantized
        self.k, self.v, self.qk, self.qv = k, v, qk, qv

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, idx: list[torch.Tensor], quant: KIVI | None) -> "Ragged":
        ks = [keys[0, h, i] for h, i in enumerate(idx)]
        vs = [values[0, h, i] for h, i in enumerate(idx)]
        lens = [len(i) for i in idx]
        nq = [quant.spilled(n) if quant is not None else 0 for n in lens]
        flat = lambda parts: torch.cat(parts).unsqueeze(0).unsqueeze(0)  # noqa: E731
        qk = qv = None
        if sum(nq):
            qk = quantize_keys(flat([k[:q] for k, q in zip(ks, nq)]), quant.bits, quant.group, outliers=quant.outliers)
            qv = quantize_values(flat([v[:q] for v, q in zip(vs, nq)]), quant.bits, quant.value_group(keys.shape[-1]),
                                 outliers=quant.outliers)
        lens_t = torch.tensor([lens, nq], dtype=torch.int32, device=keys.device)
        return cls(lens_t, flat([k[q:] for k, q in zip(ks, nq)]), flat([v[q:] for v, q in zip(vs, nq)]), qk, qv)

    @property
    def max_len(self) -> int:
        return int(self.lens[0].max())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"r_lens": self.lens, "r_k": self.k, "r_v": self.v}
        if self.qk is not None:
            out.update({f"r_k_{n}": t for n, t in self.qk.tensors().items()})
            out.update({f"r_v_{n}": t for n, t in self.qv.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], q: dict | None) -> "Ragged":
        qk = qv = None
        if "r_k_codes" in t:
            qk = QTensor.from_tensors(t, "r_k_", q["bits"], "token", q["kgroup"])
            qv = QTensor.from_tensors(t, "r_v_", q["bits"], "channel", q["vgroup"])
        return cls(t["r_lens"], t["r_k"], t["r_v"], qk, qv)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded [1, H, max_len, D] keys and values and the [1, H, max_len] mask of real entries."""
        lens, nq = self.lens[0].tolist(), self.lens[1].tolist()
        qk = dequantize(self.qk, dtype)[0, 0].split(nq) if self.qk is not None else [None] * len(lens)
        qv = dequantize(self.qv, dtype)[0, 0].split(nq) if self.qv is not None else [None] * len(lens)
        wk = self.k[0, 0].split([n - q for n, q in zip(lens, nq)])
        wv = self.v[0, 0].split([n - q for n, q in zip(lens, nq)])
        m, d = max(lens), self.k.shape[-1]
        k = self.k.new_zeros(1, len(lens), m, d, dtype=dtype)
        v = self.v.new_zeros(1, len(lens), m, self.v.shape[-1], dtype=dtype)
        mask = torch.zeros(1, len(lens), m, dtype=torch.bool, device=self.k.device)
        for h, n in enumerate(lens):
            k[0, h, :n] = torch.cat([t for t in (qk[h], wk[h]) if t is not None])
            v[0, h, :n] = torch.cat([t for t in (qv[h], wv[h]) if t is not None])
            mask[0, h, :n] = True
        return k, v, mask


class _Packed:
    """A layer's packed KV for one decode step (see ``attention.push_packed``)."""

    def __init__(self, layer: "CompressedLayer"):
        self.layer = layer

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        la = self.layer
        out = decode_attention(query[:, :, 0], la.qk.codes, la.qk.scale, la.qk.zero, la.qv.codes, la.qv.scale,
                               la.qv.zero, la.keys, la.values, la.qk.num_tokens, la.keys.shape[-2], la.qk.bits,
                               scale=scaling, out_dtype=query.dtype)
        return out.unsqueeze(1)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.materialize()


class _StaticPacked:
    """A static layer's packed KV for one decode step: the kernel or nothing (no dequantization
    into tensors whose sizes would be fixed into a recorded graph)."""

    def __init__(self, static: StaticKIVI):
        self.attend = static.attend

    def materialize(self):
        raise ValueError("a static cache attends one new token with no attention mask and no observer "
                         "(convert back with to_dynamic() for anything else)")


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed KV storage. ``parent`` is a frozen layer shared by forks (read only)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, quant: KIVI | None = None, parent: "CompressedLayer | None" = None, defer: bool = False,
                 decode: DecodeBudget | None = None, lowrank: LowRank | None = None, rope: RoPE | None = None):
        super().__init__()
        self.quant = quant
        self.rope = rope  # the model's RoPE, for keys quantized before it (kivi(pre_rope=true))
        self.lowrank = lowrank
        # low-rank keys: the layer's basis [B, H*D, r] (a fork reads its parent's), and without a
        # quantizer the context's key coefficients and values in the compute dtype
        self.basis: torch.Tensor | None = parent.basis if parent is not None else None
        self.kc: torch.Tensor | None = None
        self.vc: torch.Tensor | None = None
        self.decode = decode
        self.kernels = False  # read packed KV with the decode kernel (CUDA, memfit attention): set by the cache
        self._acc: torch.Tensor | None = None  # decode budget: attention received by each own token
        self.parent = parent
        self.defer = defer  # keep every token in the window until compress() (evict, then quantize)
        self.qk: QTensor | None = None
        self.qv: QTensor | None = None
        self.ragged: Ragged | None = None  # the compressed context, when its heads keep different counts
        self.pending_mask: torch.Tensor | None = None  # per-head validity of the last update's keys
        self.packed: _Packed | None = None  # set by a fast decode step, handed to the attention function
        self.dense: tuple | None = None  # see CompressedCache.keep_dense
        self._parent_kv: tuple | None = None  # parent dequantized once per fork: (keys, values, mask)
        self.seen = parent.get_seq_length() if parent is not None else 0  # logical tokens, evicted ones included
        self.static: StaticKIVI | None = None  # fixed buffers for graph-captured decoding (to_static)

    # -- sizes -----------------------------------------------------------------------------------
    def _own_stored(self) -> int:
        if self.static is not None:
            return self.static.nq + self.static.w
        q = self.qk.num_tokens if self.qk is not None else 0
        w = self.keys.shape[-2] if self.is_initialized else 0
        r = self.ragged.max_len if self.ragged is not None else 0  # padded length, as attention sees it
        c = self.kc.shape[-2] if self.kc is not None else 0
        return r + c + q + w

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
        st = self.static  # static decode: its buffers, allocated for the whole generation
        qk, qv = (st.qk, st.qv) if st is not None else (self.qk, self.qv)
        out: dict[str, torch.Tensor] = dict(self.ragged.tensors()) if self.ragged is not None else {}
        if st is not None:
            out["k_window"], out["v_window"] = st.keys, st.values
        elif self.is_initialized:
            out["k_window"], out["v_window"] = self.keys, self.values
        if self.basis is not None and (self.parent is None or self.basis is not self.parent.basis):
            out["k_basis"] = self.basis
        if self.kc is not None:
            out["k_coef"], out["v_coef"] = self.kc, self.vc
        if qk is not None:
            out.update({f"k_{n}": t for n, t in qk.tensors().items()})
            out.update({f"v_{n}": t for n, t in qv.tensors().items()})
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
        """Everything stored, dequantized to the compute dtype: [B, H, stored, D] keys and values
        (ragged heads padded; :meth:`materialize_masked` also says which entries are real)."""
        k, v, _ = self.materialize_masked(batch_size)
        return k, v

    def materialize_masked(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ks, vs, ms = [], [], []
        if self.parent is not None:
            # the parent is read-only while forks exist: dequantize it once, not at every step
            if self._parent_kv is None:
                self._parent_kv = self.parent.dense or self.parent.materialize_masked()
            pk, pv, pm = self._parent_kv
            if batch_size is not None and pk.shape[0] != batch_size:
                pk, pv = pk.expand(batch_size, -1, -1, -1), pv.expand(batch_size, -1, -1, -1)
                pm = pm.expand(batch_size, -1, -1) if pm is not None else None
            ks.append(pk)
            vs.append(pv)
            ms.append(pm)
        if self.ragged is not None:
            rk, rv, rm = self.ragged.dense(self.dtype)
            ks.append(rk)
            vs.append(rv)
            ms.append(rm)
        if self.kc is not None:
            ks.append(reconstruct(self.kc, self.basis, self.keys.shape[1]))
            vs.append(self.vc)
            ms.append(None)
        if self.qk is not None:
            ks.append(self._quantized_keys())
            vs.append(dequantize(self.qv, self.dtype))
            ms.append(None)
        if self.is_initialized:
            ks.append(self.keys)
            vs.append(self.values)
            ms.append(None)
        mask = None
        if any(m is not None for m in ms):
            b, h = ks[0].shape[0], ks[0].shape[1]
            mask = torch.cat([m.expand(b, -1, -1) if m is not None else torch.ones(b, h, k.shape[-2], dtype=torch.bool,
                              device=k.device) for m, k in zip(ms, ks)], dim=-1)
        if len(ks) == 1:
            return ks[0], vs[0], mask
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), mask

    @property
    def pre_rope(self) -> bool:
        """Whether this layer quantizes keys before RoPE: only a layer that holds its own tokens in
        order from position 0 (not a fork, whose rows may be padded at different positions)."""
        return bool(getattr(self.quant, "pre_rope", False)) and self.parent is None

    def _positions(self, start: int, n: int) -> torch.Tensor:
        if self.rope is None:
            raise ValueError("kivi(pre_rope=true) needs the model's RoPE: build the cache with "
                             "CompressedCache.for_model(model, policy)")
        return torch.arange(start, start + n, device=self.device)

    def _quantized_keys(self) -> torch.Tensor:
        if self.pre_rope:  # the quantized tokens are the layer's first ones: positions 0..n-1
            k = dequantize(self.qk, torch.float32)
            return self.rope.rotate(k, self._positions(0, k.shape[-2])).to(self.dtype)
        k = dequantize(self.qk, self.dtype)
        return k if self.basis is None else reconstruct(k, self.basis, self.keys.shape[1])

    def not_one_segment(self) -> str | None:
        """Why this layer's storage is not one plain quantized segment plus a window, as the decode
        kernel reads it (None when it is)."""
        checks = ((self.parent is not None, "a fork"), (self.ragged is not None, "ragged heads"),
                  (self.basis is not None, "low-rank keys"), (self.defer, "deferred compression"),
                  (self.pre_rope, "pre-RoPE keys"),  # the kernel reads post-RoPE keys ...
                  (self.qk is not None and self.qk.out_idx is not None, "outliers"))  # ... and no sparse outliers
        return next((why for bad, why in checks if bad), None)

    def fast_decode(self, key_states: torch.Tensor) -> bool:
        """Whether this step can attend over the packed bytes directly (one new token, one plain
        quantized segment and a window, on CUDA)."""
        return (self.kernels and key_states.is_cuda and key_states.shape[-2] == 1 and self.qk is not None
                and self.qk.bits in (2, 4) and self.not_one_segment() is None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static is not None:  # device work only: the step may be recorded as a CUDA graph
            if key_states.shape[-2] != 1:
                raise ValueError("a static cache decodes one token a step (convert back with to_dynamic())")
            self.static.append(key_states, value_states)
            self.packed = _StaticPacked(self.static)
            return key_states, value_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.fast_decode(key_states):
            self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
            self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
            self.seen += 1
            self._spill()
            self.pending_mask = None
            self.packed = _Packed(self)
            return key_states, value_states  # not read: the attention function takes self.packed
        past_k, past_v, past_m = self.materialize_masked(batch_size=key_states.shape[0])
        if past_k.shape[0] != key_states.shape[0]:
            raise ValueError(f"cache holds batch size {past_k.shape[0]}, got new states of batch size {key_states.shape[0]}")
        keys = torch.cat([past_k, key_states], dim=-2)
        values = torch.cat([past_v, value_states], dim=-2)
        self.pending_mask = None
        if past_m is not None:
            new = torch.ones(*past_m.shape[:2], key_states.shape[-2], dtype=torch.bool, device=past_m.device)
            self.pending_mask = torch.cat([past_m, new], dim=-1)
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        self._spill()
        return keys, values

    def _spill(self) -> None:
        """Quantize the oldest window tokens, in whole key groups, once the window exceeds ``residual``."""
        if self.quant is None or self.defer:
            return
        f = self.quant.spilled(self.keys.shape[-2])
        if f == 0:
            return
        if self.lowrank is not None and self.basis is None:  # no compress() (plain generate): fit it to the window
            self.basis = self.lowrank.basis(self.keys)
        k = self.keys[:, :, :f] if self.basis is None else project(self.keys[:, :, :f], self.basis)
        if self.pre_rope:  # the window's first token sits at position seen - window
            k = self._rope_off(k, self.seen - self.keys.shape[-2])
        kq = quantize_keys(k, self.quant.bits, self.quant.group, outliers=self.quant.outliers)
        vq = quantize_values(self.values[:, :, :f], self.quant.bits, self.quant.value_group(self.keys.shape[-1]),
                             outliers=self.quant.outliers)
        self.qk = kq if self.qk is None else self.qk.cat(kq)
        self.qv = vq if self.qv is None else self.qv.cat(vq)
        # clone: a slice would keep the whole old window alive
        self.keys = self.keys[:, :, f:].clone()
        self.values = self.values[:, :, f:].clone()

    def _rope_off(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """``k`` (keys at positions start, start+1, ...) with RoPE taken off."""
        positions = self._positions(start, k.shape[-2])
        self.rope.check(k.shape[-1])
        return self.rope.unrotate(k, positions)

    def _evict_uniform(self, evictions, obs: Observation, layer: int, num_layers: int):
        """The window's keys, values and observation after ``evictions`` (uniform heads)."""
        k, v = self.keys, self.values
        for ev in evictions:
            keep = ev.budget(k.shape[-2], ev.layer_keep(layer, num_layers))
            if keep >= k.shape[-2]:
                continue
            idx = ev.select(ev.score(k, v, obs), keep)
            k, v = _gather_tokens(k, idx), _gather_tokens(v, idx)
            # what a later method reads must follow the kept tokens
            obs = Observation(obs.queries, *(None if t is None else t.gather(-1, idx) for t in
                                             (obs.attention_sum, obs.reconstruction)))
        return k, v, obs

    def last_scores(self, policy: Policy, obs: Observation | None, layer: int, num_layers: int) -> tuple[torch.Tensor, int]:
        """Scores of the policy's last eviction on what the earlier ones keep, and its budget per
        head (for a selection across layers, ``heads=global``)."""
        *first, last = policy.evictions
        k, v, obs = self._evict_uniform(first, obs or Observation(), layer, num_layers)
        return last.score(k, v, obs), last.budget(k.shape[-2], last.layer_keep(layer, num_layers))

    def compress(self, policy: Policy, obs: Observation | None = None, layer: int = 0, num_layers: int = 1,
                 picks: list[torch.Tensor] | None = None) -> None:
        """End of prefill: apply the policy's evictions to the window, then quantize (evict, then
        quantize). ``obs``: what the prefill recorded for this layer; ``layer``/``num_layers`` set
        depth-dependent budgets; ``picks``: the kept tokens of each head chosen for the last
        eviction by the cache (``heads=global``)."""
        if self.is_initialized and self.qk is None and self.ragged is None:
            k, v = self.keys, self.values
            if policy.evictions:
                *first, last = policy.evictions
                k, v, obs = self._evict_uniform(first, obs or Observation(), layer, num_layers)
                keep = last.budget(k.shape[-2], last.layer_keep(layer, num_layers))
                idx = picks if picks is not None else (
                    last.select(last.score(k, v, obs), keep) if keep < k.shape[-2] else None)
                if isinstance(idx, list):  # ragged heads (the parser keeps them to the last eviction)
                    self.ragged = Ragged.build(k, v, idx, policy.quant)
                    k, v = k[:, :, :0], v[:, :, :0]
                elif idx is not None:
                    k, v = _gather_tokens(k, idx), _gather_tokens(v, idx)
            if policy.lowrank is not None and k.shape[-2]:
                self.basis = policy.lowrank.basis(k)  # fitted to the kept context keys
                if policy.quant is None:  # no quantizer to spill into: the context becomes coefficients now
                    self.kc, self.vc = project(k, self.basis), v.contiguous()
                    k, v = k[:, :, :0], v[:, :, :0]
            self.keys, self.values = k.contiguous(), v.contiguous()
        self.defer = False
        self._spill()

    # -- compression during decoding -----------------------------------------------------------------
    def own_tokens(self) -> int:
        """Tokens this layer added after its context (a fork's new tokens; all, without a parent)."""
        return (self.qk.num_tokens if self.qk is not None else 0) + (self.keys.shape[-2] if self.is_initialized else 0)

    def add_scores(self, scores: torch.Tensor) -> None:
        """Accumulate the attention the last query gave this layer's own tokens (the trailing keys)."""
        n = self.own_tokens()
        s = scores[..., scores.shape[-1] - n :].float()
        if self._acc is not None and self._acc.shape[-1] < n:
            pad = s.new_zeros(*s.shape[:-1], n - self._acc.shape[-1])
            self._acc = torch.cat([self._acc.expand(s.shape[0], -1, -1), pad], dim=-1)
        self._acc = s if self._acc is None else self._acc[..., :n] + s

    def evict_own(self) -> None:
        """Keep ``decode.keep`` own tokens: the ``recent`` newest, then the most attended; re-quantize."""
        n, budget = self.own_tokens(), self.decode
        if n <= budget.max_tokens or self.defer:
            return
        k, v = self.keys, self.values
        if self.qk is not None:
            k = torch.cat([self._quantized_keys(), k], dim=-2)
            v = torch.cat([dequantize(self.qv, self.dtype), v], dim=-2)
        acc = self._acc if self._acc is not None else k.new_zeros(k.shape[0], k.shape[1], 0, dtype=torch.float32)
        acc = torch.cat([acc.expand(k.shape[0], k.shape[1], -1),
                         acc.new_zeros(k.shape[0], k.shape[1], n - acc.shape[-1])], dim=-1)
        rank = acc.clone()
        if budget.recent:
            rank[..., -budget.recent :] = float("inf")
        idx = select_topk(rank, budget.keep)
        self.keys, self.values = _gather_tokens(k, idx).contiguous(), _gather_tokens(v, idx).contiguous()
        self.qk = self.qv = None
        self._acc = acc.gather(-1, idx)
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
        self.ragged = None
        self.kc = self.vc = None
        self.basis = self.parent.basis if self.parent is not None else None
        self._acc = None
        self.seen = self.parent.get_seq_length() if self.parent is not None else 0


class CompressedCache(Cache):
    """A KV cache that stores the compressed form only.

    ``CompressedCache("kivi(bits=4)")`` quantizes as tokens arrive and works with
    ``model.generate(past_key_values=...)`` or a manual forward loop. Evictions need the whole
    context (and, for SnapKV, its last queries): ``memfit.LM.prefill`` applies them at the end of
    prefill through :meth:`compress`.
    """

    def __init__(self, policy: "str | Policy" = "none", num_layers: int | None = None, *, defer: bool = False,
                 rope: RoPE | None = None, _layers: list[CompressedLayer] | None = None):
        self.policy = parse_policy(policy)
        if _layers is None:
            if num_layers is None:
                raise ValueError("CompressedCache needs num_layers (model.config.num_hidden_layers)")
            q = self.policy.quant
            q = q.uniform() if isinstance(q, LayerBits) else q  # until compress() measures each layer
            _layers = [CompressedLayer(q, defer=defer, decode=self.policy.decode,
                                       lowrank=self.policy.lowrank, rope=rope) for _ in range(num_layers)]
        super().__init__(layers=_layers)

    @property
    def rope(self) -> RoPE | None:
        return self.layers[0].rope if self.layers else None

    @classmethod
    def for_model(cls, model: torch.nn.Module, policy: "str | Policy" = "none", **kwargs) -> "CompressedCache":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kwargs.setdefault("rope", RoPE.from_model(model))
        cache = cls(policy, cfg.num_hidden_layers, **kwargs)
        # the packed-KV decode kernel is used only where memfit's attention function will take it
        cache.use_kernels(getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION)
        return cache

    def use_kernels(self, on: bool = True) -> "CompressedCache":
        """Attend over packed KV with the Triton decode kernel on CUDA (needs the model's attention
        implementation to be memfit's, which ``for_model`` checks)."""
        for layer in self.layers:
            layer.kernels = on
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        budgeted = layer.decode is not None and not layer.defer
        if budgeted:
            scores = pop_scores(layer_idx)
            if scores is not None:
                layer.add_scores(scores)
            layer.evict_own()  # before this step's keys: attention then reads the kept ones
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer.packed is not None:
            push_packed(layer_idx, layer.packed)
            layer.packed = None
        if budgeted:
            request_scores(layer_idx)
        mask = layer.pending_mask
        if mask is not None:  # ragged heads: memfit's attention function masks the padding
            push_head_mask(layer_idx, mask)
        return keys, values

    def compress(self, obs: dict[int, Observation] | None = None) -> None:
        """Apply the policy's evictions and quantization to everything prefilled so far. ``obs``:
        layer -> what the prefill recorded, for methods that score with it."""
        q, obs = self.policy.quant, obs or {}
        if isinstance(q, LayerBits):
            self._assign_layer_bits(q, obs)
        picks = self._global_picks(obs)
        for i, layer in enumerate(self.layers):
            policy = dataclasses.replace(self.policy, quant=layer.quant) if isinstance(q, LayerBits) else self.policy
            layer.compress(policy, obs.get(i), i, len(self.layers), picks[i])

    def _global_picks(self, obs: dict[int, Observation]) -> list:
        """Per layer, the tokens each head keeps when the last eviction selects across layers
        (``heads=global``); None where a layer selects on its own."""
        n = len(self.layers)
        evs = self.policy.evictions
        ready = [layer.is_initialized and layer.defer and layer.qk is None and layer.ragged is None
                 for layer in self.layers]
        if not evs or evs[-1].heads != "global" or not all(ready):
            return [None] * n
        scored = [layer.last_scores(self.policy, obs.get(i), i, n) for i, layer in enumerate(self.layers)]
        return select_global([s for s, _ in scored], [k for _, k in scored])

    def _assign_layer_bits(self, q: LayerBits, obs: dict[int, Observation]) -> None:
        """Bits per layer from each layer's attention error on its own context (KVTuner-style)."""
        errors = []
        for i, layer in enumerate(self.layers):
            o = obs.get(i)
            if not (layer.is_initialized and layer.qk is None and layer.ragged is None and o is not None
                    and o.queries is not None):
                return  # nothing measured (e.g. extending a restored prefix): the layers keep their bits
            errors.append({b: attention_error(o.queries, layer.keys, layer.values, q.kivi(b)) for b in q.CHOICES})
        for layer, bits in zip(self.layers, q.assign(errors)):
            layer.quant = q.kivi(bits)

    def derive(self, policy: "str | Policy", obs: dict[int, Observation] | None = None) -> "CompressedCache":
        """Compress a copy of this uncompressed (deferred) cache with ``policy``: one prefill, many
        policies. Tensors are shared until compression replaces them; this cache is unchanged."""
        if not all(layer.defer and layer.qk is None for layer in self.layers):
            raise RuntimeError("derive() needs a cache prefilled with defer=True and not compressed yet")
        out = CompressedCache(policy, len(self.layers), defer=True, rope=self.rope).use_kernels(self.layers[0].kernels)
        for mine, theirs in zip(out.layers, self.layers):
            if theirs.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
                mine.keys, mine.values, mine.seen = theirs.keys, theirs.values, theirs.seen
        out.compress(obs)
        return out

    def fork(self, batch_size: int = 1) -> "CompressedCache":
        """A new cache that reads this one as a shared, read-only prefix (no copy) and stores new
        tokens for ``batch_size`` rows itself. This cache is left unchanged."""
        if any(layer.defer for layer in self.layers):
            raise RuntimeError("compress() the cache before forking it")
        rows = {layer.keys.shape[0] for layer in self.layers if layer.is_initialized}
        if any(layer.ragged is not None for layer in self.layers):
            rows.add(1)
        if rows and rows != {1} and rows != {batch_size}:
            raise ValueError(f"cannot fork a cache of batch size {rows.pop()} into {batch_size} rows")
        layers = [CompressedLayer(layer.quant, parent=layer, decode=self.policy.decode, lowrank=self.policy.lowrank,
                                  rope=layer.rope) for layer in self.layers]
        return CompressedCache(self.policy, _layers=layers)

    def keep_dense(self) -> "CompressedCache":
        """Keep a dequantized copy of every layer for the forks to read (a server answering many
        questions on one context skips the per-question dequantization). It costs that memory
        beside ``nbytes``; drop the cache object to free it."""
        for layer in self.layers:
            if layer.is_initialized and layer.dense is None:
                layer.dense = layer.materialize_masked()
        return self

    # -- static decode (see memfit.kv.static) --------------------------------------------------------
    def to_static(self, max_new_tokens: int) -> "CompressedCache":
        """Move every layer's KIVI storage into buffers with room for ``max_new_tokens`` more tokens,
        so that decode steps can be replayed as a CUDA graph (:class:`memfit.kv.static.GraphDecoder`).
        Plain KIVI caches only: no evictions in flight, outliers, low rank, pre-RoPE keys or forks."""
        for i, layer in enumerate(self.layers):
            # beyond what the kernel reads now, what the policy would add while decoding
            why = ("no KIVI quantizer" if layer.quant is None else "low-rank keys" if layer.lowrank is not None
                   else "outliers" if layer.quant.outliers else "a decode budget" if layer.decode is not None
                   else layer.not_one_segment() or ("nothing stored" if not layer.is_initialized else None))
            if why:
                raise ValueError(f"to_static: layer {i} has {why}; static decode takes plain kivi(...) caches")
        for layer in self.layers:
            layer.static = StaticKIVI(layer.quant, layer.qk, layer.qv, layer.keys, layer.values,
                                      capacity=layer._own_stored() + max_new_tokens)
            layer.qk = layer.qv = None
            layer.keys, layer.values = layer.keys[:, :, :0], layer.values[:, :, :0]
        return self

    @property
    def static_layers(self) -> list[StaticKIVI] | None:
        if not self.layers or self.layers[0].static is None:
            return None
        return [layer.static for layer in self.layers]

    def after_static_step(self) -> None:
        """Host bookkeeping of a step that ran on the device (maybe as a replayed graph)."""
        for layer in self.layers:
            layer.static.after_step()
            layer.seen += 1

    def to_dynamic(self) -> "CompressedCache":
        """Back from :meth:`to_static` (to store, fork or prefill more)."""
        for layer in self.layers:
            if layer.static is not None:
                layer.qk, layer.qv, layer.keys, layer.values = layer.static.dynamic()
                layer.static = None
        return self

    # -- (de)serialization: plain tensors + a JSON-able description ----------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor held, named ``l{layer}.{name}``, and what is needed to rebuild the cache."""
        if any(layer.defer or layer.parent is not None for layer in self.layers):
            raise RuntimeError("only a compressed cache that is not a fork can be serialized")
        if self.static_layers is not None:
            raise RuntimeError("a static cache is serialized after to_dynamic()")
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            tensors.update({f"l{i}.{n}": t.contiguous() for n, t in layer.tensors().items()})
            q, qv = (layer.qk, layer.qv) if layer.qk is not None else (
                (layer.ragged.qk, layer.ragged.qv) if layer.ragged is not None else (None, None))
            layers.append({"seen": layer.seen, "dtype": str(layer.dtype).removeprefix("torch.") if layer.is_initialized else None,
                           "q": None if q is None else {"bits": q.bits, "kgroup": q.group, "vgroup": qv.group}})
        if self.rope is not None and getattr(self.policy.quant, "pre_rope", False):
            # what puts RoPE back on the stored keys (and takes it off those a restored cache reads later)
            tensors["rope.inv_freq"] = self.rope.inv_freq
        return tensors, {"policy": self.policy.spec, "layers": layers,
                         **({"rope_scaling": self.rope.scaling} if "rope.inv_freq" in tensors else {})}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict, device: "torch.device | str" = "cpu") -> "CompressedCache":
        rope = RoPE(tensors["rope.inv_freq"].float(), float(state.get("rope_scaling", 1.0))) \
            if "rope.inv_freq" in tensors else None
        cache = cls(state["policy"], len(state["layers"]), rope=rope)
        for i, (layer, info) in enumerate(zip(cache.layers, state["layers"])):
            layer.seen = int(info["seen"])
            if info["dtype"] is None:
                continue
            t = {n.split(".", 1)[1]: v.to(device) for n, v in tensors.items() if n.startswith(f"l{i}.")}
            layer.keys, layer.values = t["k_window"], t["v_window"]
            layer.dtype, layer.device, layer.is_initialized = getattr(torch, info["dtype"]), layer.keys.device, True
            if "r_lens" in t:
                layer.ragged = Ragged.from_tensors(t, info["q"])
            if isinstance(cache.policy.quant, LayerBits) and info["q"]:
                layer.quant = cache.policy.quant.kivi(info["q"]["bits"])
            layer.basis = t.get("k_basis")
            layer.kc, layer.vc = t.get("k_coef"), t.get("v_coef")
            if "k_codes" in t:
                q = info["q"]
                layer.qk = QTensor.from_tensors(t, "k_", q["bits"], "token", q["kgroup"])
                layer.qv = QTensor.from_tensors(t, "v_", q["bits"], "channel", q["vgroup"])
        return cache

    def truncate_(self, num_tokens: int) -> "CompressedCache":
        """Keep only the first ``num_tokens`` tokens, in place (prefix reuse of a cache without
        eviction). ``num_tokens`` must not cut a key group of the quantized part."""
        if self.policy.evictions or self.policy.lowrank is not None:
            raise ValueError("an evicted or low-rank cache is a function of its whole context: its prefix cannot be reused")
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
