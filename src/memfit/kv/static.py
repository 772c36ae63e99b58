"""Static decode: KIVI storage in fixed buffers, so that a decode step can be one CUDA graph.

A decode step in eager mode costs the host a Python call and a kernel launch per operation, for
every layer: on a slow host that, not the GPU, sets the step time. CUDA graphs replay a recorded
step with no host work, but need every buffer at a fixed address and every length on the device.
:class:`StaticKIVI` holds one layer's codes, scales and 16-bit window in buffers sized for the
whole generation, with the lengths in device tensors; a decode step writes the new token into the
window in place and attends with the packed-KV kernel, reading the lengths on the device. Window
spills (whole key groups, exactly as :meth:`memfit.kv.cache.CompressedLayer.update` does them)
run between steps, in place. :class:`GraphDecoder` drives the steps: it captures the model's
forward once and replays it (on CUDA), or runs it eagerly (elsewhere), with the same bookkeeping.

``cache.to_static(max_new_tokens)`` converts a cache whose storage the decode kernel reads (KIVI at
2 or 4 bits, pre-RoPE keys too; evicted, ragged and forked caches too: what eviction kept, and a
fork's parent, are read-only runs before the layer's own buffers); ``cache.to_dynamic()`` converts
it back, e.g. to store it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from memfit.hfcompat import with_cache
from memfit.kernels import window_append
from memfit.kernels.decode_attention import Outliers, PackedRun, attention_received, decode_attention_runs
from memfit.kv.decode import DecodeBudget
from memfit.kv.quant import (
    KIVI,
    MetaQTensor,
    QTensor,
    _index_dtype,
    kernel_outliers,
    moved_outliers,
    quantize_keys,
    quantize_values,
)
from memfit.kv.rope import RoPE
from memfit.kv.rotate import Hadamard, RotatedTensor, first_group, hadamard, past_first_group


class StaticKIVI:
    """One layer's KIVI storage in fixed buffers: room for ``capacity`` quantized tokens and a
    window of ``residual + group`` tokens (more than the window ever holds: it spills whole key groups
    once past ``residual``, and none while it holds less than one group); ``nq`` / ``w`` (host) and ``qlen`` / ``wlen`` (device, [B, H])
    say how much of each is filled."""

    def __init__(self, quant: KIVI | Hadamard, qk: QTensor | RotatedTensor | None, qv: QTensor | RotatedTensor | None,
                 keys: torch.Tensor, values: torch.Tensor, capacity: int, prefix: list[PackedRun] = (),
                 first: bool = True, base: tuple | None = None, rope: RoPE | None = None,
                 budget: DecodeBudget | None = None, received: torch.Tensor | None = None):
        b, h, w, d = keys.shape
        g, r = quant.group, quant.residual
        self.quant, self.bits = quant, quant.bits
        self.vbits = quant.vbits  # the Hadamard quantizer's values may be narrower
        # pre-RoPE codes (kivi(pre_rope=true)): spills take RoPE off at the tokens' positions (the
        # layer's own, from 0: nq is the window's first), the kernel puts it back as it reads them
        self.rope = rope
        # rotated codes (the Hadamard quantizer): read as KIVI's with the query rotated; the first key
        # group, with the sinks, as 16-bit tokens (see rotate.packed_run); ``first``: whether this
        # layer's first codes are its first tokens (then they keep sinks; not a fork's or after a
        # ragged context)
        self.rotated, self.first = isinstance(quant, Hadamard), first
        # a decode budget (decode(max_tokens=...)): the layer's own tokens never pass max_tokens + 1,
        # so no more room than that; each step adds the attention they receive to ``received`` (which
        # starts from the scores the dynamic steps gave them, if any)
        nq0 = qk.num_tokens if qk is not None else 0
        if budget is not None:
            capacity = min(capacity, budget.max_tokens + 1)
        cap = math.ceil(max(capacity, nq0) / g) * g
        dev, vgroup = keys.device, quant.value_group(d)
        codes = torch.zeros(b, h, cap, d * self.bits // 8, dtype=torch.uint8, device=dev)
        ks = torch.ones(b, h, cap // g, d, dtype=torch.float16, device=dev)
        vs = torch.ones(b, h, cap, d // vgroup, dtype=torch.float16, device=dev)
        # the quantized part over the whole capacity (its first nq tokens are filled)
        self.qk = QTensor(codes, ks, torch.zeros_like(ks), self.bits, "token", g)
        vcodes = torch.zeros(b, h, cap, d * self.vbits // 8, dtype=torch.uint8, device=dev)
        self.qv = QTensor(vcodes, vs, torch.zeros_like(vs), self.vbits, "channel", vgroup)
        # sparse outliers (kivi(outliers=...)): the kernel's lists in fixed buffers with room for those of
        # every spill up to the capacity (KVQuant's split takes a fixed fraction of each head's elements)
        self.outliers = 0.0 if self.rotated else float(getattr(quant, "outliers", 0.0))
        self.out = None
        if self.outliers:
            per = 2 if rope is not None else 1  # entries an outlier (pre-RoPE: its channel and its partner)
            extra = math.ceil(self.outliers * (cap - nq0) * d) * per
            self.out = [_OutlierBuffers(b, h, cap // g, _most_per_row_head(x, b, h) + extra + 1, dev)
                        for x in (qk, qv)]
        if self.rotated:  # the first key group in 16-bit (rotated), and how many tokens of it are real
            self.head = [keys.new_zeros(b, h, g, d), values.new_zeros(b, h, g, values.shape[-1])]
            self.hlen = torch.zeros(b, h, dtype=torch.int32, device=dev)
            self.rqlen = torch.zeros(b, h, dtype=torch.int32, device=dev)  # codes read: from the second group
        self.keys = keys.new_zeros(b, h, r + g, d)
        self.values = values.new_zeros(b, h, r + g, values.shape[-1])
        self.qlen = torch.zeros(b, h, dtype=torch.int32, device=dev)
        self.wlen = torch.zeros(b, h, dtype=torch.int32, device=dev)  # also where the next token goes
        # the attention each own token received (H2O's score), by slot: codes, then window
        self.received = None if budget is None else (torch.zeros(b, h, cap, device=dev),
                                                     torch.zeros(b, h, r + g, device=dev))
        self.load(qk, qv, keys, values, base, received)
        # what a step reads: the fixed runs before this layer's own tokens (a ragged context, a
        # parent), then its buffers, whose lengths the device holds
        k, v = self.qk, self.qv
        if self.rotated:
            own = [PackedRun(*past_first_group(k, v), *self.head, self.rqlen, self.hlen, self.bits, g,
                             rotation=hadamard(d, dev), vbits=self.vbits),
                   PackedRun.window_only(self.keys, self.values, self.wlen, self.bits, g)]
        else:
            lists = {"kout": self.out[0].lists, "vout": self.out[1].lists} if self.out is not None else {}
            own = [PackedRun(k.codes, k.scale, k.zero, v.codes, v.scale, v.zero, self.keys, self.values, self.qlen,
                             self.wlen, self.bits, g, **(rope.kernel_args(dev) if rope is not None else {}), **lists)]
        self.own = own
        self.runs = [*prefix, *own]

    def load(self, qk: QTensor | RotatedTensor | None, qv: QTensor | RotatedTensor | None, keys: torch.Tensor,
             values: torch.Tensor, base: tuple | None = None, received: torch.Tensor | None = None) -> None:
        """Fill the buffers (in place: a captured graph keeps reading them) with a dynamic layer's
        storage: codes, then a window of ``keys`` / ``values``. ``base``: the stored run whose grid
        later spills are encoded on (``CompressedLayer.grid_base``: 8-bit grids), None: each spill
        fits its own. ``received``: [B, H, own tokens] attention scores, with a decode budget."""
        g, r = self.quant.group, self.quant.residual
        w = keys.shape[-2]
        if w >= r + g:
            raise ValueError(f"static decode: the window holds {w} tokens, residual + group = {r + g} or more")
        self.base = base
        self.sinks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if isinstance(qk, RotatedTensor):
            if qk.sink_at is not None:
                raise ValueError("static decode: rotated codes with per-head sinks (a ragged run) are read-only runs")
            self.sinks = (qk.sink, qv.sink)
        self.nq = qk.num_tokens if qk is not None else 0
        for o in self.out or ():
            o.clear()
        if qk is not None:
            self._write(qk, qv, 0)
        if self.rotated:
            self.hlen.zero_()
            self.rqlen.zero_()
            if qk is not None:
                self._set_head(qk, qv)
                self.rqlen.fill_(self.nq - g)
        self.keys.zero_()
        self.values.zero_()
        self.keys[:, :, :w], self.values[:, :, :w] = keys, values
        self.w = w
        self.qlen.fill_(self.nq)
        self.wlen.fill_(w)
        if self.received is not None:
            for t in self.received:
                t.zero_()
            if received is not None:
                self.received[0][..., : self.nq] = received[..., : self.nq]
                self.received[1][..., :w] = received[..., self.nq : self.nq + w]

    def scores(self) -> torch.Tensor:
        """[B, H, own tokens] attention received so far (a decode budget), oldest first."""
        q, win = self.received
        return torch.cat([q[..., : self.nq], win[..., : self.w]], dim=-1)

    @property
    def capacity(self) -> int:
        return self.qk.num_tokens

    def _set_head(self, qk: RotatedTensor, qv: RotatedTensor) -> None:
        for buf, x in zip(self.head, first_group(qk, qv, self.head[0].dtype)):
            buf.copy_(x)
        self.hlen.fill_(self.quant.group)

    def _write(self, qk: QTensor | RotatedTensor, qv: QTensor | RotatedTensor, at: int) -> None:
        if isinstance(qk, RotatedTensor):
            qk, qv = qk.q, qv.q
        n, g = qk.num_tokens, self.quant.group
        if at + n > self.capacity:
            raise RuntimeError(f"static decode: {at + n} quantized tokens exceed the capacity of {self.capacity} "
                               "(to_static's max_new_tokens)")
        self.qk.codes[:, :, at : at + n] = qk.codes
        self.qk.scale[:, :, at // g : (at + n) // g] = qk.scale
        self.qk.zero[:, :, at // g : (at + n) // g] = qk.zero
        self.qv.codes[:, :, at : at + n] = qv.codes
        self.qv.scale[:, :, at : at + n] = qv.scale
        self.qv.zero[:, :, at : at + n] = qv.zero
        if self.out is not None:  # their outliers after those before them
            rope = self.rope.kernel_args(qk.codes.device) if self.rope is not None else None
            rows = self.qk.codes.shape[0]
            self.out[0].write(qk, kernel_outliers(qk, rows, g, rope, start=at), at, g)
            self.out[1].write(qv, kernel_outliers(qv, rows, g), at, g)

    def before_step(self) -> None:
        """Spill the oldest window tokens that the next token pushes out (what the dynamic cache
        does right after appending it, ``CompressedLayer._spill(appended=True)``: the new token is
        never among them)."""
        f = min(self.quant.spilled(self.w + 1), self.w // self.quant.group * self.quant.group)
        if f == 0:
            return
        if self.rotated:  # as the dynamic layer spills: sinks for the layer's first tokens only
            first = self.first and self.nq == 0
            if self.base is not None and not first:
                kq, vq = self.base[0].like(self.keys[:, :, :f]), self.base[1].like(self.values[:, :, :f])
            else:
                kq = self.quant.quantize_keys(self.keys[:, :, :f], first=first)
                vq = self.quant.quantize_values(self.values[:, :, :f], first=first)
                if getattr(kq, "extends", False):  # the layer's first run: later spills on its ranges
                    self.base = (kq, vq)
            if self.nq == 0:
                self.sinks = (kq.sink, vq.sink)
                self._set_head(kq, vq)
        else:
            k = self.keys[:, :, :f]
            if self.rope is not None:
                k = self.rope.unrotate(k, torch.arange(self.nq, self.nq + f, device=k.device))
            kq = quantize_keys(k, self.bits, self.quant.group, outliers=self.outliers)
            vq = quantize_values(self.values[:, :, :f], self.bits, self.quant.value_group(self.keys.shape[-1]),
                                 outliers=self.outliers)
        self._write(kq, vq, self.nq)
        rest = self.w - f
        self.keys[:, :, :rest] = self.keys[:, :, f : self.w].clone()
        self.values[:, :, :rest] = self.values[:, :, f : self.w].clone()
        if self.received is not None:  # the spilled tokens' scores to their code slots
            acc_q, acc_w = self.received
            acc_q[..., self.nq : self.nq + f] = acc_w[..., :f]
            acc_w[..., :rest] = acc_w[..., f : self.w].clone()
            acc_w[..., rest:] = 0.0
        self.nq, self.w = self.nq + f, rest
        self.qlen.fill_(self.nq)
        if self.rotated:
            self.rqlen.fill_(self.nq - self.quant.group)
        self.wlen.fill_(self.w)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Device work only (recorded into a graph): the new token into the window, lengths + 1 (one
        kernel on CUDA)."""
        window_append.append(self.keys, self.values, key, value, self.wlen)

    def after_step(self) -> None:
        self.w += 1

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        q = query[:, :, 0]
        if self.received is None:
            return decode_attention_runs(q, self.runs, scale=scaling, out_dtype=query.dtype).unsqueeze(1)
        out, lse = decode_attention_runs(q, self.runs, scale=scaling, out_dtype=query.dtype, lse=True)
        acc_q, acc_w = self.received
        if self.rotated:  # its codes run holds the codes from the second key group (if any), then the first group
            g = self.quant.group
            *codes, head = attention_received(q, self.own[0], lse, scaling)
            if codes:
                acc_q[..., g:] += codes[0]
            acc_q[..., :g] += head
            acc_w += attention_received(q, self.own[1], lse, scaling)[-1]
        else:
            codes, window = attention_received(q, self.own[0], lse, scaling)
            acc_q += codes
            acc_w += window
        return out.unsqueeze(1)

    def dynamic(self) -> tuple[QTensor | None, QTensor | None, torch.Tensor, torch.Tensor]:
        """(qk, qv, window keys, window values) as the dynamic layer holds them (copies)."""
        if not self.nq:
            qk = qv = None
        else:
            qk, qv = self.qk.prefix(self.nq), self.qv.prefix(self.nq)
            if self.out is not None:  # the outliers as each run's quantization set them aside
                qk, qv = (dataclasses.replace(x, **o.exact(x.shape)) for x, o in zip((qk, qv), self.out))
            clip = None
            if self.base is not None:  # 8-bit grids: their codes back on the ranges they were encoded on
                qk, qv = (MetaQTensor.from_grid(x, b.q.ranges) for x, b in zip((qk, qv), self.base))
                clip = self.base[0].clip
            if self.rotated:
                qk, qv = (RotatedTensor(x, None if s is None else s.clone(), clip=clip)
                          for x, s in zip((qk, qv), self.sinks))
        return qk, qv, self.keys[:, :, : self.w].clone(), self.values[:, :, : self.w].clone()


def _most_per_row_head(q: QTensor | None, b: int, h: int) -> int:
    """The most outliers one row and head of ``q`` holds (0 without)."""
    if q is None or q.out_idx is None:
        return 0
    _, _, n, d = q.shape
    return int(torch.bincount(q.out_idx.long() // (n * d), minlength=b * h).max()) * 2  # x2: RoPE's partners


class _OutlierBuffers:
    """One tensor's sparse outliers (keys or values) as the decode kernel reads them (``Outliers``), in
    fixed buffers: each row and head a segment of ``room`` entries filled in token order, a spill's
    after those before it; ``ptr`` [B, H, tiles + 1] says where each key group's entries start (tiles
    not yet filled point at their segment's end; the kernel reads only filled ones). Also the exact
    values and places as quantization set them aside, for :meth:`exact` (back to the dynamic cache)."""

    def __init__(self, b: int, h: int, tiles: int, room: int, device: torch.device):
        self.room = room
        self.start = torch.arange(b * h, device=device, dtype=torch.int32).reshape(b, h, 1) * room
        self.ptr = self.start.expand(b, h, tiles + 1).contiguous()
        self.tok = torch.zeros(b * h * room, dtype=torch.int32, device=device)
        self.ch = torch.zeros_like(self.tok)
        self.val = torch.zeros(b * h * room, dtype=torch.float32, device=device)
        self.used = torch.zeros(b * h, dtype=torch.long, device=device)
        self.lists = Outliers(self.ptr, self.tok, self.ch, self.val)
        self.parts: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []  # (tokens, idx, values) a write

    def clear(self) -> None:
        """Empty (in place), as built."""
        self.ptr.copy_(self.start.expand_as(self.ptr))
        self.used.zero_()
        self.parts.clear()

    def write(self, q: QTensor, o: Outliers | None, at: int, group: int) -> None:
        """The outliers ``o`` (``kernel_outliers`` of ``q``, whose first token is token ``at``, which
        starts a key group of ``group`` tokens)."""
        self.parts.append((q.num_tokens, q.out_idx, q.out_val))
        if o is None:
            return
        tile = at // group
        b, h, nt1 = o.ptr.shape
        rh, tok, ch, val = o.per_row_head(b, h)
        counts = (o.ptr[..., -1] - o.ptr[..., 0]).reshape(-1).long()
        if bool((self.used + counts > self.room).any()):  # never past the fraction KVQuant's split takes
            raise RuntimeError(f"static decode: more outliers than the {self.room} a row and head has room for")
        first = torch.cumsum(counts, 0) - counts
        base = torch.arange(b * h, device=rh.device) * self.room + self.used
        pos = base[rh] + torch.arange(len(rh), device=rh.device) - first[rh]
        self.tok[pos], self.ch[pos], self.val[pos] = (tok + at).int(), ch.int(), val
        starts = base.reshape(b, h, 1) + (o.ptr - o.ptr[..., :1]).long()
        self.ptr[:, :, tile : tile + nt1] = starts.to(torch.int32)
        self.ptr[:, :, tile + nt1 :] = starts[..., -1:].to(torch.int32)
        self.used += counts

    def exact(self, shape: tuple[int, int, int, int]) -> dict:
        """``out_idx`` / ``out_val`` of the first ``shape[2]`` tokens, as a ``QTensor`` of ``shape`` holds them."""
        b, h, n, d = shape
        parts, at = [], 0
        for m, i, v in self.parts:
            if i is not None:
                parts.append(moved_outliers(i, v, m, d, n, at))
            at += m
        if not parts:
            return {"out_idx": None, "out_val": None}
        return {"out_idx": torch.cat([p[0] for p in parts]).to(_index_dtype(b * h * n * d)),
                "out_val": torch.cat([p[1] for p in parts])}


def allow_recompiles(n: int) -> None:
    """Let torch.compile compile a function ``n`` times before it falls back to eager: the resume
    points of a decoder layer's forward are compiled once per layer (dynamo guards on its index),
    and the default limit (8) would leave the layers past the eighth uncompiled."""
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed between torch releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))


class GraphDecoder:
    """One-token decode steps of ``model`` over ``cache`` (converted with ``to_static``): on CUDA
    the forward is captured once as a CUDA graph and replayed, after a first eager step (which
    compiles the kernels); elsewhere, or with ``graph=False``, it runs eagerly. ``step(tokens)``
    ([B, 1] ids) returns the logits [B, vocab] (a buffer the next step overwrites).

    ``compile``: the step is torch.compile'd before it is captured (as gpt-fast does): inductor fuses
    the small kernels between the matmuls (norms, RoPE, casts, residual adds, SiLU; on the H200 about
    1,450 of them and 2.6 ms of an 8B step at 8 x 32K), while the cache's append and the packed-KV
    attention stay outside the trace (``torch.compiler.disable``: they read Python-side state)."""

    def __init__(self, model: torch.nn.Module, cache, graph: bool | None = None, compile: bool = False):
        if getattr(cache, "static_layers", None) is None:
            raise ValueError("GraphDecoder needs a cache converted with cache.to_static(max_new_tokens)")
        self.model, self.cache = model, cache
        dev = cache.static_layers[0].keys.device
        self.graph = dev.type == "cuda" if graph is None else graph
        b = cache.static_layers[0].keys.shape[0]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._warm = 0  # steps run eagerly so far: the first compiles the kernels
        self._kw = with_cache(model, cache)  # looked up here, outside what torch.compile traces
        self._run = self._forward
        # every slot is filled and visible: a 4D mask is taken as given, so transformers builds none
        # (memfit's attention drops it in a static step)
        self.mask = torch.ones(b, 1, 1, 1, dtype=torch.bool, device=dev)
        if compile:
            allow_recompiles(4 * len(cache.static_layers))
            self._run = torch.compile(self._forward, dynamic=False)
        self._eager_steps = 2 if compile else 1  # before capture: compile, then run what was compiled

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, position_ids=self.pos, cache_position=self.cache_pos,
                          attention_mask=self.mask, **self._kw, use_cache=True, memfit_static_step=True).logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.before_static_step()
        seen = self.cache.get_seq_length()
        self.ids.copy_(tokens.reshape(self.ids.shape))
        self.pos.copy_(self.cache.positions().reshape(self.pos.shape))  # per row: stacked contexts may differ
        self.cache_pos.fill_(seen)
        if not self.graph or self._warm < self._eager_steps:
            logits = self._run()
            self._warm += 1
        else:
            if self._graph is None:
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._logits = self._run()
            self._graph.replay()
            logits = self._logits
        self.cache.after_static_step()
        return logits
