"""One layer's compressed KV storage (a transformers ``CacheLayerMixin``): the quantized segment,
the 16-bit window, ragged heads, low-rank keys, a fork's shared parent, and the compression that
runs at the end of prefill and while decoding."""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import CacheLayerMixin

from memfit.kernels.decode_attention import PackedRun, decode_attention_runs
from memfit.kv import rotate
from memfit.kv.decode import DecodeBudget
from memfit.kv.evict import Observation, key_only, select_topk
from memfit.kv.klt import KLTHeads, query_weight
from memfit.kv.lowrank import LowRank, project, reconstruct
from memfit.kv.policy import Policy, not_packed
from memfit.kv.quant import KIVI, QTensor, kernel_outliers
from memfit.kv.ragged import Ragged
from memfit.kv.rope import RoPE
from memfit.kv.rotate import RotatedTensor
from memfit.kv.static import StaticKIVI


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


class _Packed:
    """A layer's packed KV for one decode step (see ``attention.push_packed``)."""

    def __init__(self, layer: "CompressedLayer", batch_size: int):
        self.layer, self.batch_size = layer, batch_size

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        out = decode_attention_runs(query[:, :, 0], self.layer.runs(query.shape[0]), scale=scaling,
                                    out_dtype=query.dtype)
        return out.unsqueeze(1)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and the mask of real entries (ragged heads are padded), for every row of
        the step (a fork's rows read its one parent)."""
        return self.layer.materialize_masked(self.batch_size)


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
                 decode: DecodeBudget | None = None, lowrank: LowRank | None = None, rope: RoPE | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.quant = quant
        # what unquantized entries are stored in (None: the compute dtype). A model computing in
        # float32 on a CPU without bf16 arithmetic still keeps a 16-bit cache: 16-bit is what the
        # compression figures are measured against, and what a bf16 model would store.
        self.store_dtype = dtype if dtype is not None else (parent.store_dtype if parent is not None else None)
        self.rope = rope  # the model's RoPE, for keys quantized before it (kivi(pre_rope=true))
        # what a quantizer reads of the model (xquant: k_proj / v_proj factors; oscar: its calibration), not stored
        self.model_part = parent.model_part if parent is not None else None
        self.lowrank = lowrank
        # low-rank keys: the layer's basis [B, H*D, r] (a fork reads its parent's), and without a
        # quantizer the context's key coefficients and values in the compute dtype
        self.basis: torch.Tensor | None = parent.basis if parent is not None else None
        self.kc: torch.Tensor | None = None
        self.vc: torch.Tensor | None = None
        self.coef_from: int | None = None  # xKV: the layer whose key coefficients ``kc`` are (not counted here)
        self.decode = decode
        self.kernels = False  # read packed KV with the decode kernel (CUDA, memfit attention): set by the cache
        self._acc: torch.Tensor | None = None  # decode budget: attention received by each own token
        self._scores: torch.Tensor | None = None  # a quantizer's saliency of the window's tokens, until they spill
        self._qweight: torch.Tensor | None = None  # klt: the context's queries' mean square per channel, until then
        self.parent = parent
        self.defer = defer  # keep every token in the window until compress() (evict, then quantize)
        self.qk: QTensor | None = None
        self.qv: QTensor | None = None
        self.ragged: Ragged | None = None  # the compressed context, when its heads keep different counts
        self.pending_mask: torch.Tensor | None = None  # per-head validity of the last update's keys
        self.packed: _Packed | None = None  # set by a fast decode step, handed to the attention function
        self.dense: tuple | None = None  # see CompressedCache.keep_dense
        self._parent_kv: tuple | None = None  # parent dequantized once per fork: (keys, values, mask)
        self._view: tuple | None = None  # a fork's attention buffer: the parent, then its own tokens
        self.seen = parent.get_seq_length() if parent is not None else 0  # logical tokens, evicted ones included
        self.origin = self.seen  # the position of this layer's first own token
        self.row_lag: list[int] | None = None  # per row, tokens fewer than ``seen`` (stacked contexts)
        self.static: StaticKIVI | None = None  # fixed buffers for graph-captured decoding (to_static)
        self._rotated_run = None  # (codes, rows, run): rotated codes as the kernel reads them, until a spill
        self._outlier_lists = None  # (key codes, rows, {kout, vout}): their outliers as the kernel adds them
        self._room: tuple | None = None  # reserve(): window buffers with room to append in place

    # -- sizes -----------------------------------------------------------------------------------
    def _own_stored(self) -> int:
        r = self.ragged.max_len if self.ragged is not None else 0  # padded length, as attention sees it
        if self.static is not None:
            return r + self.static.nq + self.static.w
        q = self.qk.num_tokens if self.qk is not None else 0
        w = self.keys.shape[-2] if self.is_initialized else 0
        c = self.kc.shape[-2] if self.kc is not None else 0
        return r + c + q + w

    def stored_tokens(self) -> int:
        """Tokens actually held (per row and head), parent included."""
        return self._own_stored() + (self.parent.stored_tokens() if self.parent is not None else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same question, under its name in transformers 5.0
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
            if st.rotated and st.sinks[0] is not None:  # a rotated layer's exact first tokens
                out["k_sink"], out["v_sink"] = st.sinks
        elif self.is_initialized:
            out["k_window"], out["v_window"] = self.keys, self.values
        if self.basis is not None and (self.parent is None or self.basis is not self.parent.basis):
            out["k_basis"] = self.basis
        if self.kc is not None:
            out["v_coef"] = self.vc
            if self.coef_from is None:
                out["k_coef"] = self.kc
        if qk is not None:
            out.update({f"k_{n}": t for n, t in qk.tensors().items()})
            out.update({f"v_{n}": t for n, t in qv.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- reading and writing ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.store_dtype or key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d, dtype=self.dtype)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1], dtype=self.dtype)
        if self.quant is not None:
            self.quant.value_group(d)  # fail early on a head_dim the config cannot group
        self.is_initialized = True

    def materialize(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything stored, dequantized to the compute dtype: [B, H, stored, D] keys and values
        (ragged heads padded; :meth:`materialize_masked` also says which entries are real)."""
        k, v, _ = self.materialize_masked(batch_size)
        return k, v

    def materialize_masked(self, batch_size: int | None = None, dtype: torch.dtype | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Like :meth:`materialize`, with the mask of real entries (None: all are). ``dtype``: what a
        fork reads its parent in (the compute dtype), converted once, not at every step."""
        parts = self._own_parts()
        if self.parent is not None:
            pk, pv, pm = self._parent_dense(dtype)
            if batch_size is not None and pk.shape[0] != batch_size:
                pk, pv = pk.expand(batch_size, -1, -1, -1), pv.expand(batch_size, -1, -1, -1)
                pm = pm.expand(batch_size, -1, -1) if pm is not None else None
            parts.insert(0, (pk, pv, pm))
        ks, vs, ms = zip(*parts)
        mask = None
        if any(m is not None for m in ms):
            b, h = ks[0].shape[0], ks[0].shape[1]
            mask = torch.cat([m.expand(b, -1, -1) if m is not None else torch.ones(b, h, k.shape[-2], dtype=torch.bool,
                              device=k.device) for m, k in zip(ms, ks)], dim=-1)
        if len(ks) == 1:
            return ks[0], vs[0], mask
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), mask

    def _parent_dense(self, dtype: torch.dtype | None) -> tuple:
        """The parent's entries, dequantized once per fork (the parent is read-only while forks exist)."""
        if self._parent_kv is None:
            pk, pv, pm = self.parent.dense or self.parent.materialize_masked()
            self._parent_kv = (pk.to(dtype or pk.dtype), pv.to(dtype or pv.dtype), pm)
        return self._parent_kv

    def _own_parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """This layer's own stored segments, oldest first, dequantized: (keys, values, mask or None)."""
        parts = []
        if self.ragged is not None:
            parts.append(self.ragged.dense(self.dtype, self.rope))
        if self.kc is not None:
            parts.append((reconstruct(self.kc, self.basis, self.keys.shape[1]), self.vc, None))
        if self.qk is not None:
            parts.append((self._quantized_keys(), self.qv.dequantize(self.dtype), None))
        if self.is_initialized:
            parts.append((self.keys, self.values, None))
        return parts

    def _fork_view(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What a fork attends over (its parent, its own entries, the new states) as views of one
        buffer that took the parent once: a decode step then copies only the fork's own tokens, not
        the whole shared context expanded to every row."""
        b, dtype = key_states.shape[0], key_states.dtype
        pk, pv, pm = self._parent_dense(dtype)
        if pk.shape[0] not in (1, b):
            raise ValueError(f"cache holds batch size {pk.shape[0]}, got new states of batch size {b}")
        own = [(k, v) for k, v, _ in self._own_parts()] + [(key_states, value_states)]
        start = pk.shape[-2]
        n = start + sum(k.shape[-2] for k, _ in own)
        buf = self._view
        if buf is None or buf[0].shape[0] != b or buf[0].shape[-2] < n or buf[0].dtype != dtype:
            cap = n + 256  # room for the next steps
            kb = key_states.new_empty(b, pk.shape[1], cap, pk.shape[-1])
            vb = value_states.new_empty(b, pv.shape[1], cap, pv.shape[-1])
            kb[:, :, :start], vb[:, :, :start] = pk, pv
            self._view = buf = (kb, vb)
        kb, vb = buf
        at = start
        for k, v in own:
            kb[:, :, at : at + k.shape[-2]], vb[:, :, at : at + k.shape[-2]] = k, v
            at += k.shape[-2]
        mask = None
        if pm is not None:
            mask = torch.cat([pm.expand(b, -1, -1), pm.new_ones(b, pm.shape[1], n - start)], dim=-1)
        return kb[:, :, :n], vb[:, :, :n], mask

    @property
    def pre_rope(self) -> bool:
        """Whether this layer quantizes keys before RoPE: a layer that holds its own tokens in order
        from position ``origin``; not a fork (whose rows may be padded at different positions) unless
        its quantizer says ``rope_in_forks`` (klt, whose spills must meet its parent's pre-RoPE basis:
        RoPE comes off and goes back on at the same positions, so a padded row reads its keys right)."""
        return bool(getattr(self.quant, "pre_rope", False)) and (
            self.parent is None or getattr(self.quant, "rope_in_forks", False))

    def _positions(self, start: int, n: int) -> torch.Tensor:
        if self.rope is None:
            raise ValueError("keys quantized before RoPE (kivi(pre_rope=true), klt, xquant) need the model's RoPE: "
                             "build the cache with CompressedCache.for_model(model, policy)")
        return torch.arange(start, start + n, device=self.device)

    def _quantized_keys(self) -> torch.Tensor:
        if self.pre_rope:  # the layer's first own tokens, or those after its ragged context: positions from there
            k = self.qk.dequantize(torch.float32)
            start = self.ragged.end if self.ragged is not None and self.ragged.end is not None else self.origin
            return self.rope.rotate(k, self._positions(start, k.shape[-2])).to(self.dtype)
        k = self.qk.dequantize(self.dtype)
        return k if self.basis is None else reconstruct(k, self.basis, self.keys.shape[1])

    def not_packed(self) -> str | None:
        """Why the decode kernel cannot read this layer's storage (None when it can): runs of 2/4-bit
        KIVI codes and 16-bit windows, its own (uniform or ragged) and its parents'. The quantizer's
        checks are ``policy.not_packed``'s; here also the tensors it stored."""
        if self.ragged is not None and self.ragged.tier is not None:
            return "a key-only tier (keys=)"
        why = not_packed(self.quant)
        if why is not None:
            return why
        qs = [q.q if isinstance(q, RotatedTensor) else q
              for q in (self.qk, self.ragged.qk if self.ragged is not None else None) if q is not None]
        checks = ((any(q.bits not in (2, 4) for q in qs), "codes of other than 2 or 4 bits"),
                  (self.basis is not None or self.kc is not None, "low-rank keys"),
                  (self.defer, "deferred compression"),
                  (not self.is_initialized, "nothing stored"))
        why = next((why for bad, why in checks if bad), None)
        if why is None and self.parent is not None:
            why = self.parent.not_packed()
            return f"a parent with {why}" if why else None
        return why

    def runs(self, rows: int) -> list[PackedRun]:
        """What a decode step reads, oldest first, as the kernel takes it (see :meth:`not_packed`):
        the parent's runs (read by every row), the ragged context, the quantized tokens and window."""
        out = self.parent.runs(rows) if self.parent is not None else []
        if self.ragged is not None:
            out.extend(self.ragged.runs(rows, self.quant))
        k, v = self.keys, self.values
        if k.shape[0] != rows:  # a parent's window, shared by the rows of its fork
            k, v = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
        if isinstance(self.qk, RotatedTensor):  # the rotated codes, then the (unrotated) window
            cached = self._rotated_run
            if cached is None or cached[0] is not self.qk or cached[1] != rows:  # new codes after a spill
                self._rotated_run = cached = (self.qk, rows, rotate.packed_run(self.qk, self.qv, rows, self.dtype))
            out.append(cached[2])
            if k.shape[-2]:
                out.append(PackedRun.window_only(k, v, k.shape[-2], self.quant.bits, self.quant.group))
        elif self.qk is not None:
            qk, qv = self.qk, self.qv
            t = [qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero]
            if t[0].shape[0] != rows:
                t = [x.expand(rows, *x.shape[1:]) for x in t]
            rope = self.rope.kernel_args(self.device) if self.pre_rope else {}  # codes stored before RoPE
            out.append(PackedRun(*t, k, v, qk.num_tokens, k.shape[-2], qk.bits, qk.group, **rope,
                                 **self._kernel_outliers(rows, rope or None)))
        elif k.shape[-2] or not out:
            out.append(PackedRun.window_only(k, v, k.shape[-2], self.quant.bits, self.quant.group))
        return out

    def _kernel_outliers(self, rows: int, rope: dict | None) -> dict:
        """The own codes' sparse outliers as the kernel adds them (``kout`` / ``vout``), built once a spill."""
        if getattr(self.qk, "out_idx", None) is None and getattr(self.qv, "out_idx", None) is None:
            return {}  # (codes without sparse outliers, or of a kind that holds none)
        cached = self._outlier_lists
        if cached is None or cached[0] is not self.qk or cached[1] != rows:
            lists = {"kout": kernel_outliers(self.qk, rows, self.qk.group, rope),
                     "vout": kernel_outliers(self.qv, rows, self.qk.group)}
            self._outlier_lists = cached = (self.qk, rows, lists)
        return cached[2]

    def fast_decode(self, key_states: torch.Tensor) -> bool:
        """Whether this step can attend over the packed bytes directly (one new token, storage the
        kernel reads, on CUDA)."""
        return self.kernels and key_states.is_cuda and key_states.shape[-2] == 1 and self.not_packed() is None

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
            self._spill(appended=True)
            self.pending_mask = None
            self.packed = _Packed(self, key_states.shape[0])
            return key_states, value_states  # not read: the attention function takes self.packed
        if self._room is not None and self._append_in_place(key_states, value_states):
            return self.keys, self.values
        if self.parent is not None:
            keys, values, self.pending_mask = self._fork_view(key_states, value_states)
        else:
            past_k, past_v, past_m = self.materialize_masked()
            if past_k.shape[0] != key_states.shape[0]:
                raise ValueError(f"cache holds batch size {past_k.shape[0]}, got new states of batch size "
                                 f"{key_states.shape[0]}")
            keys = torch.cat([past_k.to(key_states.dtype), key_states], dim=-2)  # attention reads the compute dtype
            values = torch.cat([past_v.to(value_states.dtype), value_states], dim=-2)
            self.pending_mask = None
            if past_m is not None:
                new = torch.ones(*past_m.shape[:2], key_states.shape[-2], dtype=torch.bool, device=past_m.device)
                self.pending_mask = torch.cat([past_m, new], dim=-1)
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        self._spill(appended=True)
        return keys, values

    def reserve(self, tokens: int) -> None:
        """Hold the window in buffers with room for ``tokens`` more entries, appended in place until
        :meth:`release`: a pass that reads the cache and is then cut back (KVzip's repeat pass)
        copies only its own tokens, not the whole context at every layer. Only a layer that holds
        nothing but its window (deferred or uncompressed, not a fork); ``nbytes`` does not count the
        spare room while it lasts."""
        if (not self.is_initialized or self.parent is not None or self.qk is not None or self.ragged is not None
                or self.kc is not None or self.static is not None or (self.quant is not None and not self.defer)):
            return  # (a quantizing layer spills its window as it grows: not a plain window)
        b, h, n, d = self.keys.shape
        kb = self.keys.new_empty(b, h, n + tokens, d)
        vb = self.values.new_empty(b, h, n + tokens, self.values.shape[-1])
        kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
        self._room = (kb, vb)
        self.keys, self.values = kb[:, :, :n], vb[:, :, :n]

    def _live_room(self) -> tuple | None:
        """The reserved buffers while the window still lives in them (whatever replaced the window,
        compression or a spill, has given them up)."""
        if self._room is not None and self.keys.data_ptr() != self._room[0].data_ptr():
            self._room = None
        return self._room

    def release(self) -> None:
        """Back to exact-size storage after :meth:`reserve`."""
        if self._live_room() is not None:
            self._room = None
            self.keys, self.values = self.keys.clone(), self.values.clone()

    def trim(self, n: int) -> None:
        """Keep the first ``n`` window entries (in the reserved buffers, without a copy, if any)."""
        if (room := self._live_room()) is not None:
            self.keys, self.values = room[0][:, :, :n], room[1][:, :, :n]
        else:  # clone: a slice would keep the whole old window alive
            self.keys, self.values = self.keys[:, :, :n].clone(), self.values[:, :, :n].clone()

    def _append_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Append into the reserved room when the states fit as they are (the storage dtype, the
        same rows), so that the attention can read the buffers themselves; else give the room up."""
        if self._live_room() is None:
            return False
        kb, vb = self._room
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > kb.shape[-2] or key_states.dtype != kb.dtype or key_states.shape[0] != kb.shape[0]:
            self.release()
            return False
        kb[:, :, n : n + m], vb[:, :, n : n + m] = key_states, value_states
        self.keys, self.values = kb[:, :, : n + m], vb[:, :, : n + m]
        self.seen += m
        self.pending_mask = None
        return True

    def _spill(self, appended: bool = False) -> None:
        """Quantize the oldest window tokens, in whole key groups, once the window exceeds ``residual``.
        ``appended``: right after new tokens, the newest is never among them (with key groups longer
        than the residual, a full window would otherwise spill whole): a static step, which cannot
        quantize the token it is computing, spills exactly the same tokens."""
        if self.quant is None or self.defer:
            return
        n = self.keys.shape[-2]
        f = self.quant.spilled(n)
        if appended:
            f = min(f, (n - 1) // self.quant.group * self.quant.group)
        if f == 0:
            return
        if self.lowrank is not None and self.basis is None:  # no compress() (plain generate): fit it to the window
            self.basis = self.lowrank.basis(self.keys)
        k = self.keys[:, :, :f] if self.basis is None else project(self.keys[:, :, :f], self.basis)
        if self.pre_rope:  # the window's first token sits at position seen - window
            k = self._rope_off(k, self.seen - self.keys.shape[-2])
        # a quantizer with sinks keeps them for the layer's first tokens only (not a fork's, nor
        # those after a ragged context)
        first = {"first": self.qk is None and self.parent is None and self.ragged is None} \
            if getattr(self.quant, "sinks", 0) else {}
        if getattr(self.quant, "needs_model", False):
            first["model_part"] = self.model_part
        if self._qweight is not None:  # the context's first spill: its fit weighted by the queries
            first["weight"], self._qweight = self._qweight, None
        if self._scores is not None:  # the context's saliency, scored at compress(): its first spill only,
            if self._scores.shape[-1] >= f:  # where every spilled token is a scored context token
                first["scores"] = self._scores[..., :f]
            self._scores = None
        base = self.grid_base()
        if base is not None and base[0] is self.qk:  # encoded on what the layer already fitted
            self.qk, self.qv = self.qk.extend(k), self.qv.extend(self.values[:, :, :f])
        elif base is not None:  # a fork's first spill: on its parent's (or after a ragged context: its heads')
            self.qk = base[0].like(k)
            self.qv = base[1].like(self.values[:, :, :f]) if base[1] is not None else \
                self.quant.quantize_values(self.values[:, :, :f], **first)
        else:
            kq, vq = self.quant.quantize_keys(k, **first), self.quant.quantize_values(self.values[:, :, :f], **first)
            self.qk = kq if self.qk is None else self.qk.cat(kq)
            self.qv = vq if self.qv is None else self.qv.cat(vq)
        # clone: a slice would keep the whole old window alive
        self.keys = self.keys[:, :, f:].clone()
        self.values = self.values[:, :, f:].clone()

    def grid_base(self) -> tuple | None:
        """The stored keys and values whose fitted grid (MILLION's codebook, 8-bit grids' ranges) the
        window's spills are encoded on: this layer's own, else, before a fork's first spill, its
        parent's; None: each spill fits its own."""
        if self.qk is not None:
            return (self.qk, self.qv) if getattr(self.qk, "extends", False) else None
        p = self.parent
        if p is not None and getattr(p.qk, "extends", False) and hasattr(p.qk, "like"):
            return p.qk, p.qv
        # after a ragged context whose heads' fits take the new keys (klt: this layer's or a fork's
        # parent's); the values are quantized on their own (None)
        r = self.ragged if self.ragged is not None else (p.ragged if p is not None and p.qk is None else None)
        if r is not None and isinstance(r.qk, KLTHeads) and r.qk.fit is not None:
            return r.qk, None
        return None

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
            obs = obs.kept(idx)  # what a later method reads must follow the kept tokens
        return k, v, obs

    def last_scores(self, policy: Policy, obs: Observation | None, layer: int, num_layers: int) -> tuple[torch.Tensor, int]:
        """Scores of the policy's last eviction on what the earlier ones keep, and its budget per
        head (for a selection across layers, ``heads=global``)."""
        *first, last = policy.evictions
        k, v, obs = self._evict_uniform(first, obs or Observation(), layer, num_layers)
        return last.score(k, v, obs), last.budget(k.shape[-2], last.layer_keep(layer, num_layers))

    def compress(self, policy: Policy, obs: Observation | None = None, layer: int = 0, num_layers: int = 1,
                 picks: list[torch.Tensor] | None = None, tier: list[torch.Tensor] | None = None) -> None:
        """End of prefill: apply the policy's evictions to the window, then quantize (evict, then
        quantize). ``obs``: what the prefill recorded for this layer; ``layer``/``num_layers`` set
        depth-dependent budgets; ``picks``: the kept tokens of each head chosen for the last
        eviction by the cache (``heads=global``), ``tier``: its key-only tokens (``keys=``)."""
        if self.is_initialized and self.qk is None and self.ragged is None and self.kc is None:
            k, v = self.keys, self.values
            obs = obs or Observation()
            saliency = getattr(policy.quant, "saliency", None)  # a quantizer's own scores (ZipCache)
            if saliency is not None:
                obs = dataclasses.replace(obs, saliency=saliency(k, obs, self.seen - k.shape[-2]))
            if getattr(policy.quant, "queries", 0) and obs.queries is not None:  # klt's query-weighted fit
                self._qweight = query_weight(obs.queries[..., -policy.quant.queries :, :], k.shape[1])
            if policy.evictions:
                *first, last = policy.evictions
                start = self.seen - k.shape[-2]  # the window's first position
                if self.pre_rope:  # keys coded before RoPE: each kept token's position goes with it
                    obs = dataclasses.replace(obs, positions=torch.arange(
                        start, self.seen, device=k.device).expand(k.shape[0], k.shape[1], -1))
                k, v, obs = self._evict_uniform(first, obs, layer, num_layers)
                keep = last.budget(k.shape[-2], last.layer_keep(layer, num_layers))
                idx = picks
                if picks is None and keep < k.shape[-2]:
                    scores = last.score(k, v, obs)
                    idx = last.select(scores, keep, policy.token_group)
                    if last.keys and isinstance(idx, list):  # the key-only tier: selected at ``keys``, less those kept
                        wide = last.select(scores, last.keys_budget(k.shape[-2], layer, num_layers), policy.token_group)
                        tier = key_only(wide, idx)
                if self.pre_rope and not isinstance(idx, list) and (idx is not None or k.shape[-2] < self.keys.shape[-2]):
                    if k.shape[0] != 1:  # ragged storage, which records positions, holds one row
                        raise ValueError("keys coded before RoPE after an eviction are stored ragged, one context "
                                         f"at a time: compress a batch of 1, got {k.shape[0]}")
                    idx = list(idx[0]) if idx is not None else [torch.arange(k.shape[-2], device=k.device)] * k.shape[1]
                if isinstance(idx, list):  # ragged heads (the parser keeps them to the last eviction)
                    where = {"positions": obs.positions, "span": (start, self.keys.shape[-2]),
                             "rope": self.rope} if self.pre_rope else {}
                    self.ragged = Ragged.build(k, v, idx, policy.quant, obs.saliency, self._qweight, tier=tier, **where)
                    self._qweight = None
                    k, v = k[:, :, :0], v[:, :, :0]
                    obs = dataclasses.replace(obs, saliency=None)
                elif idx is not None:
                    k, v = _gather_tokens(k, idx), _gather_tokens(v, idx)
                    obs = obs.kept(idx)
            self._scores = obs.saliency  # for the first spill, which quantizes the window's oldest tokens
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

    def own_scores(self, b: int, h: int, n: int) -> torch.Tensor:
        """[B, H, n] attention the ``n`` own tokens received so far (0 for those no step scored yet)."""
        acc = self._acc if self._acc is not None else torch.zeros(b, h, 0, device=self.device)
        return torch.cat([acc.expand(b, h, -1), acc.new_zeros(b, h, n - acc.shape[-1])], dim=-1)

    def evict_own(self) -> None:
        """Keep ``decode.keep`` own tokens: the ``recent`` newest, then the most attended; re-quantize."""
        n, budget = self.own_tokens(), self.decode
        if n <= budget.max_tokens or self.defer:
            return
        k, v = self.keys, self.values
        if self.qk is not None:
            k = torch.cat([self._quantized_keys(), k], dim=-2)
            v = torch.cat([self.qv.dequantize(self.dtype), v], dim=-2)
        acc = self.own_scores(k.shape[0], k.shape[1], n)
        rank = acc.clone()
        if budget.recent:
            rank[..., -budget.recent :] = float("inf")
        idx = select_topk(rank, budget.keep)
        self.keys, self.values = _gather_tokens(k, idx).contiguous(), _gather_tokens(v, idx).contiguous()
        self.qk = self.qv = None
        self._acc = acc.gather(-1, idx)
        self._spill()

    def evict_static(self) -> None:
        """:meth:`evict_own` for a static layer (between steps): its buffers back to dynamic storage,
        evicted and re-quantized as the dynamic layer does, and loaded back in place."""
        st = self.static
        if self.decode is None or st.nq + st.w <= self.decode.max_tokens or self.defer:
            return
        self.qk, self.qv, self.keys, self.values = st.dynamic()
        self._acc = st.scores()
        self.evict_own()
        st.load(self.qk, self.qv, self.keys, self.values, self.grid_base(), self._acc)
        self.qk = self.qv = self._acc = None
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]

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
        self.coef_from = None
        self.basis = self.parent.basis if self.parent is not None else None
        self._acc = None
        self._scores = None
        self._view = None
        self.seen = self.parent.get_seq_length() if self.parent is not None else 0
