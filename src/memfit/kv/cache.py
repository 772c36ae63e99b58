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
from transformers.cache_utils import Cache

from memfit.kv.attention import ATTN_IMPLEMENTATION, pop_scores, push_head_mask, push_packed, request_scores
from memfit.kv.evict import Observation, key_only, select_global
from memfit.kv.layer import CompressedLayer
from memfit.kv.lowrank import LowRank
from memfit.kv.policy import Policy, parse_policy
from memfit.kv.quant import KIVI, LayerBits, QTensor, attention_error, load_pair, pair_info
from memfit.kv.ragged import Ragged
from memfit.kv.rope import RoPE
from memfit.kv.rotate import Hadamard, RotatedTensor
from memfit.kv.static import StaticKIVI

FULL_BYTES_PER_ELEMENT = 2  # the reference: an uncompressed 16-bit cache


# a layer's own tensors under the "k_" prefix; any other "k_" name is its quantizer's
_LAYER_OWN = ("k_window", "k_basis", "k_coef")


class CompressedCache(Cache):
    """A KV cache that stores the compressed form only.

    ``CompressedCache("kivi(bits=4)")`` quantizes as tokens arrive and works with
    ``model.generate(past_key_values=...)`` or a manual forward loop. Evictions need the whole
    context (and, for SnapKV, its last queries): ``memfit.LM.prefill`` applies them at the end of
    prefill through :meth:`compress`.
    """

    def __init__(self, policy: "str | Policy" = "none", num_layers: int | None = None, *, defer: bool = False,
                 rope: RoPE | None = None, dtype: torch.dtype | None = None, model: torch.nn.Module | None = None,
                 _layers: list[CompressedLayer] | None = None):
        """``dtype``: what unquantized entries are stored in (default: the model's compute dtype);
        ``model``: the model, for a quantizer that reads its weights (xquant) and for the caches
        :meth:`derive` makes of this one (kept by reference, not stored)."""
        self.policy = parse_policy(policy)
        self.model = model
        if _layers is None:
            if num_layers is None:
                raise ValueError("CompressedCache needs num_layers (model.config.num_hidden_layers)")
            q = self.policy.quant
            q = q.uniform() if isinstance(q, LayerBits) else q  # until compress() measures each layer
            _layers = [CompressedLayer(q, defer=defer, decode=self.policy.decode,
                                       lowrank=self.policy.lowrank, rope=rope, dtype=dtype) for _ in range(num_layers)]
        super().__init__(layers=_layers)
        if model is not None:
            self.attach_model(model)

    @property
    def rope(self) -> RoPE | None:
        return self.layers[0].rope if self.layers else None

    @classmethod
    def for_model(cls, model: torch.nn.Module, policy: "str | Policy" = "none", **kwargs) -> "CompressedCache":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kwargs.setdefault("rope", RoPE.from_model(model))
        kwargs.setdefault("model", model)
        cache = cls(policy, cfg.num_hidden_layers, **kwargs)
        # the packed-KV decode kernel is used only where memfit's attention function will take it
        cache.use_kernels(getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION)
        return cache

    def attach_model(self, model: torch.nn.Module) -> "CompressedCache":
        """Give a quantizer that reads the model (xquant: k_proj / v_proj; oscar: its calibration)
        what it reads, on this cache's layers and the runs they already hold (a restored cache).
        No-op otherwise."""
        self.model = model
        if not getattr(self.policy.quant, "needs_model", False):
            return self
        parts = self.policy.quant.model_parts(model)
        if len(parts) != len(self.layers):
            raise ValueError(f"{type(model).__name__} gives {self.policy.quant.__class__.__name__.lower()} "
                             f"{len(parts)} layers, this cache has {len(self.layers)}")
        for layer, part in zip(self.layers, parts):
            layer.model_part = part
            for run in (layer.qk, layer.qv):
                if run is not None:
                    run.attach(part)
        return self

    def use_kernels(self, on: bool = True) -> "CompressedCache":
        """Attend over packed KV with the Triton decode kernel on CUDA (needs the model's attention
        implementation to be memfit's, which ``for_model`` checks)."""
        for layer in self.layers:
            layer.kernels = on
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.static is not None:
            return _static_update(layer, layer_idx, key_states, value_states)
        budgeted = layer.decode is not None and not layer.defer
        if budgeted:
            scores = pop_scores(layer_idx, self)
            if scores is not None:
                layer.add_scores(scores)
            layer.evict_own()  # before this step's keys: attention then reads the kept ones
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer.packed is not None:
            push_packed(layer_idx, layer.packed)
            layer.packed = None
        if budgeted:
            request_scores(layer_idx, self)
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
        picks, tiers = self._global_picks(obs)
        if self.policy.lowrank is not None and self.policy.lowrank.layers > 1:
            self._share_coefficients(self.policy.lowrank)
        for i, layer in enumerate(self.layers):
            policy = dataclasses.replace(self.policy, quant=layer.quant) if isinstance(q, LayerBits) else self.policy
            layer.compress(policy, obs.get(i), i, len(self.layers), picks[i], tiers[i])

    def _share_coefficients(self, lowrank: LowRank) -> None:
        """xKV: each group of ``lowrank.layers`` adjacent layers gets one set of token coefficients for
        its context keys (held by the group's first layer, read by the others) and a basis per layer."""
        for g in range(0, len(self.layers), lowrank.layers):
            group = [(i, la) for i, la in enumerate(self.layers[g : g + lowrank.layers], g)
                     if la.is_initialized and la.defer and la.qk is None and la.kc is None and la.keys.shape[-2]]
            if not group:
                continue
            coef, blocks = lowrank.shared([la.keys for _, la in group])
            for (_, la), basis in zip(group, blocks):
                la.basis, la.kc, la.vc, la.coef_from = basis, coef, la.values.contiguous(), group[0][0]
                la.keys, la.values = la.keys[:, :, :0], la.values[:, :, :0]
            group[0][1].coef_from = None  # the owner

    def _global_picks(self, obs: dict[int, Observation]) -> tuple[list, list]:
        """Per layer, the tokens each head keeps when the last eviction selects across layers
        (``heads=global``), and its key-only tokens (``keys=``); None where a layer selects on its own."""
        n = len(self.layers)
        evs = self.policy.evictions
        ready = [layer.is_initialized and layer.defer and layer.qk is None and layer.ragged is None
                 for layer in self.layers]
        if not evs or evs[-1].heads != "global" or not all(ready):
            return [None] * n, [None] * n
        scored = [layer.last_scores(self.policy, obs.get(i), i, n) for i, layer in enumerate(self.layers)]
        unit = self.policy.token_group
        picks = select_global([s for s, _ in scored], [k for _, k in scored], unit)
        if not evs[-1].keys:
            return picks, [None] * n
        wide = select_global([s for s, _ in scored], [evs[-1].keys_budget(s.shape[-1], i, n)
                                                      for i, (s, _) in enumerate(scored)], unit)
        return picks, [key_only(w, p) for w, p in zip(wide, picks)]

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

    @classmethod
    def from_dense(cls, keys: list[torch.Tensor], values: list[torch.Tensor], *, rope: RoPE | None = None,
                   dtype: torch.dtype | None = None, model: torch.nn.Module | None = None) -> "CompressedCache":
        """An uncompressed (deferred) cache holding ``keys``/``values`` [B, H, N, D] per layer, stored
        in ``dtype``: :meth:`derive` then compresses it with any policy."""
        out = cls("none", len(keys), defer=True, rope=rope, dtype=dtype, model=model)
        for layer, k, v in zip(out.layers, keys, values):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values, layer.seen = k.to(layer.dtype), v.to(layer.dtype), k.shape[-2]
        return out

    def derive(self, policy: "str | Policy", obs: dict[int, Observation] | None = None) -> "CompressedCache":
        """Compress a copy of this uncompressed (deferred) cache with ``policy``: one prefill, many
        policies. Tensors are shared until compression replaces them; this cache is unchanged."""
        if not all(layer.defer and layer.qk is None for layer in self.layers):
            raise RuntimeError("derive() needs a cache prefilled with defer=True and not compressed yet")
        out = CompressedCache(policy, len(self.layers), defer=True, rope=self.rope, dtype=self.layers[0].store_dtype,
                              model=self.model).use_kernels(self.layers[0].kernels)
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
        for mine, theirs in zip(layers, self.layers):
            mine.kernels = theirs.kernels
        return CompressedCache(self.policy, _layers=layers)

    @classmethod
    def stack(cls, caches: "list[CompressedCache]") -> "CompressedCache":
        """Contexts compressed one by one, as one batch to decode together (a server batching
        requests): each layer's rows side by side; evicted (ragged) contexts keep their own lengths
        per row and head, read through offsets without padding. Contexts of different lengths keep
        their own positions (:meth:`positions`: decode with ``position_ids`` from it, as
        ``GraphDecoder`` does). The contexts must have the same policy, and the same numbers of
        quantized and window tokens beyond what eviction kept (true right after prefill, and for
        evicted contexts with the same 16-bit tail); no forks, outliers, pre-RoPE keys or low rank."""
        if not caches:
            raise ValueError("stack() needs at least one cache")
        first = caches[0]
        for c in caches:
            if c.policy.spec != first.policy.spec or len(c.layers) != len(first.layers):
                raise ValueError(f"cannot stack caches of different policies or depths: {c.policy.spec!r} vs "
                                 f"{first.policy.spec!r}")
        layers = []
        for i, parts in enumerate(zip(*(c.layers for c in caches))):
            p0 = parts[0]
            bad = next((why for la in parts for bad, why in (
                (la.parent is not None or la.static is not None, "a fork or a static cache"),
                (any(q is not None and not isinstance(q, (QTensor, RotatedTensor))
                     for q in (la.qk, la.ragged and la.ragged.qk)), "a quantizer other than KIVI or Hadamard, or tokens at two widths"),
                (la.defer or not la.is_initialized, "nothing compressed"),
                (la.basis is not None or la.kc is not None, "low-rank keys"),
                (any(isinstance(q, QTensor) and q.out_idx is not None for q in (la.qk, la.ragged and la.ragged.qk)),
                 "outliers"),
                (la.seen != p0.seen and la.ragged is None, f"{la.seen} tokens against {p0.seen} in uniform storage"),
                (la.pre_rope, "pre-RoPE keys"),
                ((la.ragged is None) != (p0.ragged is None), "ragged and uniform storage"),
                (la.keys.shape[2:] != p0.keys.shape[2:] or (la.qk is None) != (p0.qk is None)
                 or (la.qk is not None and la.qk.num_tokens != p0.qk.num_tokens), "different uniform lengths"),
            ) if bad), None)
            if bad:
                raise ValueError(f"stack(): layer {i} has {bad}")
            layer = CompressedLayer(p0.quant, decode=p0.decode, rope=p0.rope, dtype=p0.store_dtype)
            layer.lazy_initialization(p0.keys, p0.values)
            layer.keys = torch.cat([la.keys for la in parts])
            layer.values = torch.cat([la.values for la in parts])
            layer.seen, layer.kernels = max(la.seen for la in parts), p0.kernels
            lag = [layer.seen - la.seen for la in parts for _ in range(la.keys.shape[0])]
            layer.row_lag = lag if any(lag) else None
            if isinstance(p0.qk, RotatedTensor):
                layer.qk, layer.qv = (RotatedTensor.batch([getattr(la, n) for la in parts]) for n in ("qk", "qv"))
            elif p0.qk is not None:
                layer.qk, layer.qv = (QTensor.batch([getattr(la, n) for la in parts]) for n in ("qk", "qv"))
            if p0.ragged is not None:
                layer.ragged = Ragged.stack([la.ragged for la in parts])
            layers.append(layer)
        return cls(first.policy, _layers=layers)

    def warm_kernels(self, query_heads: int) -> "CompressedCache":
        """Compile (or load from Triton's cache) the decode kernels this cache's steps will run, now
        rather than in a first request (CUDA layers the kernel reads only; see :meth:`warm_runs`)."""
        from memfit.kernels.decode_attention import decode_attention_runs

        for q, runs in self.warm_runs(query_heads):
            if q.is_cuda:
                decode_attention_runs(q, runs, out_dtype=q.dtype)
        return self

    def warm_runs(self, query_heads: int) -> list:
        """(query, runs) of the decode steps a fork of this cache meets, for every layer (evicted
        layers differ in length, so in how a step is split): what a layer stores plus the fork's
        first tokens, then plus tokens its window has spilled (none where the kernel cannot read
        the layer)."""
        from memfit.kernels.decode_attention import PackedRun

        out, made = [], {}  # the fork's made-up runs, built once per shape (layers mostly share one)
        for layer in self.layers:
            if not layer.is_initialized or layer.not_packed() is not None:
                continue
            k, qt = layer.keys, layer.quant
            h, d, dev = k.shape[1], k.shape[-1], k.device
            shape = (h, d, k.dtype, dev, qt.bits, qt.vbits, qt.group)
            if shape not in made:
                q = torch.zeros(1, query_heads, d, dtype=k.dtype, device=dev)
                codes = torch.zeros(1, h, qt.group, d * qt.bits // 8, dtype=torch.uint8, device=dev)
                vcodes = torch.zeros(1, h, qt.group, d * qt.vbits // 8, dtype=torch.uint8, device=dev)
                ks = torch.ones(1, h, 1, d, dtype=torch.float16, device=dev)
                vs = torch.ones(1, h, qt.group, d // qt.value_group(d), dtype=torch.float16, device=dev)
                window = torch.zeros(1, h, 1, d, dtype=k.dtype, device=dev)
                made[shape] = (q, PackedRun.window_only(window, window, 1, qt.bits, qt.group),
                               PackedRun(codes, ks, ks, vcodes, vs, vs, window, window, qt.group, 1, qt.bits, qt.group,
                                         vbits=qt.vbits))
            q, fresh, spilled = made[shape]
            out += [(q, [*layer.runs(1), fresh]), (q, [*layer.runs(1), spilled])]
        return out

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
        Caches the decode kernel reads (KIVI or Hadamard at 2/4 bits, pre-RoPE keys, sparse outliers,
        evicted or ragged, forks of such caches, a decode budget); not low rank. With a decode budget
        (``decode(max_tokens=...)``) the buffers hold at most ``max_tokens + 1`` own tokens whatever
        ``max_new_tokens`` is: each step adds the attention they receive, and between steps the
        layer keeps the best as the dynamic cache does (:meth:`before_static_step`)."""
        for i, layer in enumerate(self.layers):
            # beyond what the kernel reads now, what the policy would add while decoding
            why = ("no KIVI quantizer" if not isinstance(layer.quant, (KIVI, Hadamard))
                   else "low-rank keys" if layer.lowrank is not None
                   else layer.not_packed())
            if why:
                raise ValueError(f"to_static: layer {i} has {why}; static decode takes caches the decode "
                                 "kernel reads (kivi or hadamard at 2/4 bits, evicted or not)")
        for i, layer in enumerate(self.layers):
            if layer.decode is not None and (scores := pop_scores(i, self)) is not None:
                layer.add_scores(scores)  # the last dynamic step's, as the next dynamic step would add them
            rows = layer.keys.shape[0]
            prefix = layer.parent.runs(rows) if layer.parent is not None else []
            if layer.ragged is not None:
                prefix.extend(layer.ragged.runs(rows, layer.quant))
            # a decode budget's scores so far (what the dynamic steps accumulated)
            received = None if layer._acc is None else layer.own_scores(rows, layer.keys.shape[1], layer.own_tokens())
            layer.static = StaticKIVI(layer.quant, layer.qk, layer.qv, layer.keys, layer.values,
                                      capacity=layer.own_tokens() + max_new_tokens, prefix=prefix,
                                      first=layer.parent is None and layer.ragged is None, base=layer.grid_base(),
                                      rope=layer.rope if layer.pre_rope else None, budget=layer.decode,
                                      received=received)
            layer._acc = None
            layer.qk = layer.qv = None
            layer.keys, layer.values = layer.keys[:, :, :0], layer.values[:, :, :0]
        return self

    @property
    def static_layers(self) -> list[StaticKIVI] | None:
        if not self.layers or self.layers[0].static is None:
            return None
        return [layer.static for layer in self.layers]

    def before_static_step(self) -> None:
        """Host work between static steps, in place: a decode budget's eviction, then the window's
        spill of what the next token pushes out."""
        for layer in self.layers:
            layer.evict_static()
            layer.static.before_step()

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
                if layer.static.received is not None:  # a decode budget's scores go on accumulating
                    layer._acc = layer.static.scores()
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
            # a ragged context's codes and the layer's own after it may be of two kinds (klt: heads' runs, then one run)
            both = layer.qk is not None and layer.ragged is not None and layer.ragged.qk is not None
            layers.append({"seen": layer.seen, **({"row_lag": layer.row_lag} if layer.row_lag else {}),
                           **({"rq": pair_info(layer.ragged.qk, layer.ragged.qv)} if both else {}),
                           **({"tier": layer.ragged.tier.meta()} if layer.ragged is not None
                              and layer.ragged.tier is not None else {}),
                           **({"coef_from": layer.coef_from} if layer.coef_from is not None else {}),
                           "dtype": str(layer.dtype).removeprefix("torch.") if layer.is_initialized else None,
                           "q": None if q is None else pair_info(q, qv)})
        if self.rope is not None and getattr(self.policy.quant, "pre_rope", False):
            # what puts RoPE back on the stored keys (and takes it off those a restored cache reads later)
            tensors["rope.inv_freq"] = self.rope.inv_freq
        return tensors, {"policy": self.policy.spec, "layers": layers,
                         **({"rope_scaling": self.rope.scaling} if "rope.inv_freq" in tensors else {})}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict, policy: Policy | None = None,
                   device: "torch.device | str" = "cpu", model: torch.nn.Module | None = None) -> "CompressedCache":
        """Rebuild a cache from :meth:`to_state`. ``policy``: the state's policy, when the caller has
        already parsed it; ``model``: the model it was made with (xquant reads its weights)."""
        rope = RoPE(tensors["rope.inv_freq"].float(), float(state.get("rope_scaling", 1.0))) \
            if "rope.inv_freq" in tensors else None
        cache = cls(state["policy"] if policy is None else policy, len(state["layers"]), rope=rope)
        for i, (layer, info) in enumerate(zip(cache.layers, state["layers"])):
            layer.seen = int(info["seen"])
            layer.row_lag = info.get("row_lag")
            if info["dtype"] is None:
                continue
            t = {n.split(".", 1)[1]: v.to(device) for n, v in tensors.items() if n.startswith(f"l{i}.")}
            layer.keys, layer.values = t["k_window"], t["v_window"]
            layer.dtype, layer.device, layer.is_initialized = getattr(torch, info["dtype"]), layer.keys.device, True
            if "r_lens" in t:
                layer.ragged = Ragged.from_tensors(t, info.get("rq", info["q"]), rows=layer.keys.shape[0],
                                                   tier=info.get("tier"))
            if isinstance(cache.policy.quant, LayerBits) and info["q"]:
                layer.quant = cache.policy.quant.kivi(info["q"]["bits"])
            layer.basis = t.get("k_basis")
            layer.kc, layer.vc = t.get("k_coef"), t.get("v_coef")
            if info["q"] is not None and any(n.startswith("k_") and n not in _LAYER_OWN for n in t):  # quantized tokens
                layer.qk, layer.qv = load_pair(t, "k_", "v_", info["q"])
            if "coef_from" in info:  # xKV: the group's coefficients, held by its first layer
                owner = int(info["coef_from"])
                if not 0 <= owner < i or cache.layers[owner].kc is None:
                    raise ValueError(f"layer {i} reads the key coefficients of layer {owner}, which holds none")
                layer.kc, layer.coef_from = cache.layers[owner].kc, owner
        if model is not None:
            cache.attach_model(model)
        return cache

    def truncate_(self, num_tokens: int) -> "CompressedCache":
        """Keep only the first ``num_tokens`` tokens, in place (prefix reuse of a cache without
        eviction). ``num_tokens`` must not cut a key group of the quantized part."""
        if not self.policy.prefix_reusable:
            raise ValueError(f"a {self.policy.short_spec} cache is a function of its whole context (eviction, "
                             "low rank, saliency): its prefix cannot be reused")
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            nq = layer.qk.num_tokens if layer.qk is not None else 0
            if num_tokens < nq:
                layer.qk, layer.qv = layer.qk.prefix(num_tokens), layer.qv.prefix(num_tokens)
            layer.trim(max(0, num_tokens - nq))
            layer.seen = num_tokens
        return self

    def reserve(self, tokens: int) -> "CompressedCache":
        """Room for ``tokens`` more entries per layer, appended in place until :meth:`release` (see
        :meth:`CompressedLayer.reserve`): for passes that are cut back with :meth:`truncate_`."""
        for layer in self.layers:
            layer.reserve(tokens)
        return self

    def release(self) -> "CompressedCache":
        for layer in self.layers:
            layer.release()
        return self

    # -- figures -----------------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """[B] position of each row's next token (its logical length): rows of a stacked cache whose
        contexts differ in length differ; ``get_seq_length`` is the longest."""
        layer = self.layers[0]
        dev = layer.keys.device if layer.is_initialized else None
        pos = torch.full((layer.keys.shape[0] if layer.is_initialized else 1,), layer.seen, dtype=torch.long, device=dev)
        if layer.row_lag is not None:
            pos -= torch.tensor(layer.row_lag, dtype=torch.long, device=dev)
        return pos

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
                total += 2 * h * (b * own - sum(layer.row_lag or [])) * d * FULL_BYTES_PER_ELEMENT
        return total


@torch.compiler.disable
def _static_update(layer, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
    """A static step's append (device work only), outside a compiled step's trace: it hands the
    layer's packed KV to the attention function through Python-side state."""
    keys, values = layer.update(key_states, value_states)
    push_packed(layer_idx, layer.packed)
    layer.packed = None
    return keys, values
