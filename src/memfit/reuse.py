"""Stored documents reused anywhere, not only as a prefix (CacheBlend / KVShare-style selective recompute).

A document is stored once, with the KV it has right after the chat's opening (the template's
default system prompt and the start of the user turn), at the positions it was computed at. To
reuse it behind another system prompt or after other documents:

1. its keys are moved to their new positions by composing RoPE rotations (exact, ``RoPE.shift``);
2. what RoPE cannot fix, that its tokens never attended to what now precedes them, is repaired by
   recomputing a fraction of the tokens. Layer 0's KV depends only on each token and its position,
   so it is exact after the move; one pass of layer 0 over every reused token (attention over that
   exact KV) gives each token's exact layer-1 KV. The tokens whose layer-1 KV deviates most from
   the reused one are recomputed through the remaining layers (their queries attend over the
   whole assembled KV); the others keep their reused KV from layer 2 on.

Cost: about one layer of a full prefill for every reused token, plus ``recompute`` of the rest.
With ``recompute=1.0`` every token is recomputed and the result is a full prefill's. The last token
is always computed, through the whole of the last layer: its output gives the next-token logits, so
that an answer starts without a pass of its own (as a server answers a plain prompt).

The decoder layers are called one by one on the rows being computed; a stand-in cache writes
their KV into the assembled tensors. This works for the models whose decoder layers follow
transformers' Llama layout (``model.model.layers``, ``embed_tokens``, ``rotary_emb``: Llama,
Mistral, Qwen2/3, SmolLM).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memfit.hfcompat import cache_arg_name
from memfit.kv.attention import ATTN_IMPLEMENTATION

DEFAULT_RECOMPUTE = 0.05  # fraction of reused tokens recomputed (measured: memfit bench reuse, docs/store.md)


class _Stop(Exception):
    """Raised by the stand-in cache once the probed layer has written its KV: the rest of that
    layer (its attention and MLP) is not needed."""


class _Rows:
    """A stand-in for a transformers Cache while decoder layers run on some rows of a sequence whose
    KV tensors [1, H, N, D] (one pair per layer) hold every row: each layer's new KV is written at
    ``rows`` and the layer attends over the rows up to the last of them (the mask hides the rest)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.rows: torch.Tensor | None = None
        self.stop_at: int | None = None
        self.write = True  # False: the rows' KV is already there (a row run again for its output)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.write:
            k[:, :, self.rows] = key_states.to(k.dtype)
            v[:, :, self.rows] = value_states.to(v.dtype)
        if layer_idx == self.stop_at:
            raise _Stop
        seen = int(self.rows[-1]) + 1
        return k[:, :, :seen], v[:, :, :seen]


def decoder_parts(model: torch.nn.Module):
    """(embed_tokens, rotary_emb, layers) of a causal LM with transformers' Llama layout."""
    inner = getattr(model, "model", None)
    parts = [getattr(inner, n, None) for n in ("embed_tokens", "rotary_emb", "layers")]
    if any(p is None for p in parts):
        raise NotImplementedError(f"{type(model).__name__} does not have the Llama-style layout (model.model."
                                  "embed_tokens, rotary_emb, layers) that selective recompute calls layer by layer")
    return parts


@dataclass
class Blended:
    """What :func:`recompute_rows` did: rows recomputed through every layer, of those after ``start``."""

    recomputed: int
    candidates: int
    hidden: torch.Tensor | None = None  # with ``last``: the sequence's last row's output of the last layer


BLOCK = 1024  # scattered rows per layer call: each block attends over the keys up to its last row (causal, in blocks)
MASK_ELEMENTS = 1 << 24  # a block's mask (rows x keys) at most: over long contexts blocks take fewer rows
CACHED_MASKS = 64 << 20  # bytes of masks built once for every layer; beyond that each layer call builds its own
CAUSAL = 8192  # rows 0..n-1 up to this many: one call with SDPA's causal kernel (no mask, nothing computed twice)


def _unmasked_is_causal(model: torch.nn.Module) -> bool:
    """Whether the model's attention reads a missing mask as causal (SDPA's and memfit's do; eager's
    attends to everything)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", ATTN_IMPLEMENTATION)


def _query_heads_per_kv(model: torch.nn.Module) -> int:
    c = model.config
    heads = getattr(c, "num_attention_heads", 1)
    return heads // (getattr(c, "num_key_value_heads", None) or heads)


@dataclass
class _Call:
    """One decoder layer call of a pass: ``rows`` (hidden states ``[:, a:b]`` of the pass) and their
    rotary embeddings, the same in every layer; unless ``causal`` (rows 0..n-1 under the model's
    causal attention), the mask they attend under and, for memfit's attention, the same attention
    in parts (see :func:`_parts`), built once if ``keep`` (small enough), else in every layer."""

    a: int
    b: int
    rows: torch.Tensor
    pos: torch.Tensor
    rotary: tuple
    causal: bool
    n_rep: int  # query heads stacked over a KV head in the parts; 0: no parts (memfit's GPU attention reads none)
    keep: bool
    _built: tuple | None = None

    def attention(self) -> tuple[torch.Tensor | None, list | None]:
        if self.causal:
            return None, None
        if self._built is not None:
            return self._built
        dtype = self.rotary[0].dtype
        parts = _parts(self.rows, dtype, self.n_rep) if self.n_rep else None
        built = (_additive_mask(self.rows, int(self.rows[-1]) + 1, dtype), parts)
        if self.keep:
            self._built = built
        return built


def _additive_mask(rows: torch.Tensor, seen: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, R, seen]: 0 where row r sees key j (j <= r), the dtype's minimum elsewhere (SDPA would
    convert a boolean mask in every layer)."""
    hidden_keys = torch.arange(seen, device=rows.device) > rows.unsqueeze(-1)
    mask = torch.zeros(hidden_keys.shape, dtype=dtype, device=rows.device)
    return mask.masked_fill_(hidden_keys, torch.finfo(dtype).min)[None, None]


def _parts(rows: torch.Tensor, dtype: torch.dtype, n_rep: int) -> list | None:
    """A masked block's attention as a few calls, each over a group of consecutive rows and only
    the keys up to its last one, its query heads stacked as rows over their shared KV head (a CPU's
    fused kernel rereads K and V once per block of query rows: stacked, groups keep blocks as large
    as one call's), as (first row, end, keys read, mask [1, 1, n_rep * rows, keys]); None for a
    block too small to gain. One masked call makes every row pay for every key: most of the work
    where many rows see few keys (a new system prompt, the first documents)."""
    g = min(GROUPS, rows.numel() // GROUP_ROWS)
    if g < 2:
        return None
    step = -(-rows.numel() // g)
    out = []
    for a in range(0, rows.numel(), step):
        r = rows[a : a + step]
        seen = int(r[-1]) + 1
        mask = _additive_mask(r, seen, dtype).expand(1, n_rep, r.numel(), seen)
        out.append((a, a + r.numel(), seen, mask.reshape(1, 1, n_rep * r.numel(), seen)))
    return out


GROUPS, GROUP_ROWS = 4, 64  # measured on a 2-core CPU: 259 rows over 4K keys 5.9 -> 4.4 ms, 337 over 2.3K 4.2 -> 2.5 ms


def _calls(rows: torch.Tensor, hidden: torch.Tensor, rotary, causal: bool, n_rep: int) -> list[_Call]:
    """The layer calls of a pass over ``rows`` (ascending, distinct; ``hidden`` [1, R, D] theirs):
    every row from 0 in one unmasked call when ``causal`` (the model reads that as causal) and they
    are few enough, otherwise blocks of rows, each with its additive mask (row r sees the keys up
    to r)."""
    n, seen = rows.numel(), int(rows[-1]) + 1
    one = causal and seen == n and n <= CAUSAL  # ascending and distinct, ending at n - 1: rows 0..n-1
    step = n if one else min(BLOCK, max(64, MASK_ELEMENTS // seen))
    spans = [(i, min(n, i + step)) for i in range(0, n, step)]
    n_rep = n_rep if rows.device.type == "cpu" else 0  # the parts are read by memfit's CPU attention only
    masks = sum((b - a) * (int(rows[b - 1]) + 1) for a, b in spans) * hidden.element_size() * (1 + n_rep)
    out = []
    for a, b in spans:
        pos = rows[a:b].unsqueeze(0)
        out.append(_Call(a, b, rows[a:b], pos, rotary(hidden[:, a:b], pos), one, n_rep, masks <= CACHED_MASKS))
    return out


def _run(layer, hidden, calls: list[_Call], cache, arg):
    """One decoder layer on the rows of ``calls`` (their hidden states ``hidden`` [1, R, D]), each
    call attending over the keys up to its last row only."""
    outs = []
    for c in calls:
        cache.rows = c.rows
        mask, parts = c.attention()
        try:
            out = layer(hidden[:, c.a : c.b], attention_mask=mask, position_ids=c.pos, position_embeddings=c.rotary,
                        use_cache=True, **{arg: cache}, **({"memfit_attention_parts": parts} if parts else {}))
        except _Stop:
            continue
        outs.append(out[0] if isinstance(out, tuple) else out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)) if outs else None


@torch.no_grad()
def compute_rows(model: torch.nn.Module, input_ids: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor], rows: torch.Tensor, last: bool = False) -> torch.Tensor | None:
    """Run ``rows`` (every row from some start on, or any set whose earlier rows' KV is exact)
    through all layers, writing their KV into ``keys``/``values``. ``last``: the sequence's last row
    is among them; its output of the last layer [1, 1, D] is returned (see :func:`next_logits`)."""
    embed, rotary, layers = decoder_parts(model)
    cache = _Rows(keys, values)
    arg, causal = cache_arg_name(type(layers[0])), _unmasked_is_causal(model)
    if last and (rows.numel() == 0 or int(rows[-1]) != input_ids.shape[1] - 1):
        raise ValueError("the last row's output needs the sequence's last row among those computed")
    if rows.numel() == 0:
        return None
    h = embed(input_ids[:, rows])
    return _through(layers, h, _calls(rows, h, rotary, causal, _query_heads_per_kv(model)), cache, arg, last)


def _through(layers, hidden, calls: list[_Call], cache, arg, last: bool = False) -> torch.Tensor | None:
    """``layers`` in turn on the rows of ``calls``; only KV is kept, so the last layer stops once
    its KV is written (its attention and MLP would feed nothing), except with ``last`` for the
    final row, whose output [1, 1, D] is returned."""
    for i, layer in enumerate(layers):
        cache.stop_at = layer.self_attn.layer_idx if i == len(layers) - 1 else None
        final = hidden[:, -1:]
        hidden = _run(layer, hidden, calls, cache, arg)
    cache.stop_at = None
    if not last:
        return None
    c = calls[-1]  # the final row alone, over every key up to it (its KV, written above, is kept)
    row = c.rows[-1:]
    one = _Call(0, 1, row, row.unsqueeze(0), tuple(x[:, -1:] for x in c.rotary), False, 0, False)
    cache.write = False
    try:
        return _run(layers[-1], final, [one], cache, arg)
    finally:
        cache.write = True


def next_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The next-token logits [1, V] (float32) from a row's output of the last layer [1, 1, D]."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise NotImplementedError(f"{type(model).__name__} has no model.norm / output embeddings (Llama layout)")
    return head(norm(hidden))[:, -1].float()


def _deviation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Squared deviation of each row of ``new`` [1, H, N, D] from ``old``, relative to ``new``'s mean
    square (keys and values weigh the same though keys are larger)."""
    new = new.float()
    per_row = new.square().sum((0, 1, 3))
    return (new - old.float()).square().sum((0, 1, 3)) / per_row.mean().clamp_min(1e-12)


@torch.no_grad()
def recompute_rows(model: torch.nn.Module, input_ids: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor], start: int, fresh: torch.Tensor, fraction: float,
                   correct: "Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None" = None,
                   last: bool = False) -> Blended:
    """Repair an assembled KV in place. ``input_ids`` [1, N]; ``keys``/``values`` per layer
    [1, H, N, D] in the compute dtype: rows before ``start`` are exact, the others hold reused KV
    (already moved to their positions) except where ``fresh`` [N] is set (no KV yet: always
    computed). ``fraction`` of the reused rows after ``start``, those whose layer-1 KV deviates most
    once layer 0 has run over them, are recomputed through every layer. ``correct(old_k1, old_v1)``
    (layer 1's reused KV of every row from ``start``, its exact KV now in ``keys[1]``/``values[1]``)
    may correct the deeper layers' reused KV and returns the rows [N - start] it has corrected,
    which are then not recomputed (anchors, see :class:`AnchorPool`). ``last``: the last row is
    fresh; its output of the last layer is returned in ``Blended.hidden``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"recompute must be a fraction in [0, 1], got {fraction}")
    if last and not bool(fresh[-1]):
        raise ValueError("the last row's output needs the last row fresh (computed whatever the fraction)")
    embed, rotary, layers = decoder_parts(model)
    n = input_ids.shape[1]
    dev = input_ids.device
    rows = torch.arange(start, n, device=dev)
    if rows.numel() == 0:
        return Blended(0, 0)
    if fraction == 0.0 or len(layers) == 1:  # naive concatenation: only the rows without KV are computed
        hidden = compute_rows(model, input_ids, keys, values, rows[fresh[rows]], last)
        return Blended(0, int((~fresh[rows]).sum()), hidden)
    cache = _Rows(keys, values)
    arg, causal = cache_arg_name(type(layers[0])), _unmasked_is_causal(model)
    h = embed(input_ids[:, rows])
    calls = _calls(rows, h, rotary, causal, _query_heads_per_kv(model))
    h = _run(layers[0], h, calls, cache, arg)  # exact, as its KV is
    old_k, old_v = keys[1][:, :, start:].clone(), values[1][:, :, start:].clone()
    cache.stop_at = 1  # layer 1's exact KV for every row (its attention and MLP are not needed for the rest)
    _run(layers[1], h, calls, cache, arg)
    cache.stop_at = None
    new_k, new_v = keys[1][:, :, start:], values[1][:, :, start:]
    score = _deviation(new_k, old_k) + _deviation(new_v, old_v)
    is_fresh = fresh[rows]
    reused = int((~is_fresh).sum())
    if correct is not None:
        done = correct(old_k.float(), old_v.float()) & ~is_fresh
        score[done] = float("-inf")
        reused -= int(done.sum())
    score[is_fresh] = float("inf")
    k = min(rows.numel(), int(is_fresh.sum()) + math.ceil(fraction * reused))
    pick = score.topk(k).indices.sort().values if k < rows.numel() else torch.arange(rows.numel(), device=dev)
    hidden = None
    if k:
        rows, h = rows[pick], h[:, pick]
        # from layer 1 again: its KV is rewritten with the same values
        hidden = _through(layers[1:], h, _calls(rows, h, rotary, causal, _query_heads_per_kv(model)), cache, arg,
                          last)
    return Blended(k - int(is_fresh.sum()), reused, hidden)


@dataclass
class Anchor:
    """What a document's KV turned out to be behind one prefix (KVCOMM): the offsets from its
    stored KV, keys taken back to the stored positions. ``probe``: the layer-1 offset, flattened and
    of unit length, which a new prefix's layer-1 offset is compared with."""

    probe: torch.Tensor
    keys: list[torch.Tensor]  # per layer from 2: [1, H, n, D]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.probe, *self.keys, *self.values))


@dataclass
class AnchorPool:
    """KVCOMM-style anchors: per stored document, the KV offsets seen behind earlier prefixes. A new
    prefix whose layer-1 offset (exact, from the probe every assembly runs) is close to anchors'
    (cosine >= ``threshold``) gets their offsets, weighted by similarity, on its deeper layers and
    no recompute; otherwise its tokens are recomputed as usual and what that gave becomes a new
    anchor. At most ``per_document`` anchors a document and ``max_bytes`` in all (least recently
    used first out); offsets are kept in float16."""

    # close means nearly the same prefix: behind different system prompts SmolLM2's layer-1 offsets
    # still agree to 0.95-0.98, but its deeper offsets do not carry over (anchored KV then deviates
    # from a full prefill's as much as naive concatenation's)
    threshold: float = 0.995
    per_document: int = 4
    max_bytes: int = 256 << 20
    sharpness: float = 20.0  # softmax(similarity * sharpness) weights matching anchors
    skip_recompute: bool = True  # anchored tokens are not recomputed (False: recomputed on top)
    _anchors: "OrderedDict[str, list[Anchor]]" = field(default_factory=OrderedDict)

    def match(self, key: str, probe: torch.Tensor) -> list[tuple[float, Anchor]]:
        found = [(float(a.probe.float() @ probe), a) for a in self._anchors.get(key, [])]
        found = [(s, a) for s, a in found if s >= self.threshold]
        if found:
            self._anchors.move_to_end(key)
        return found

    def add(self, key: str, anchor: Anchor) -> None:
        mine = self._anchors.setdefault(key, [])
        mine.append(anchor)
        del mine[: -self.per_document]
        self._anchors.move_to_end(key)
        while self.nbytes > self.max_bytes and len(self._anchors) > 1:
            self._anchors.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for anchors in self._anchors.values() for a in anchors)

    def offsets(self, found: list[tuple[float, Anchor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The matching anchors' offsets, weighted: per layer from 2, keys and values (float32)."""
        w = (torch.tensor([s for s, _ in found]) * self.sharpness).softmax(0).tolist()
        n = len(found[0][1].keys)
        return ([sum(wi * a.keys[i].float() for wi, (_, a) in zip(w, found)) for i in range(n)],
                [sum(wi * a.values[i].float() for wi, (_, a) in zip(w, found)) for i in range(n)])


def probe_vector(dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """A document's layer-1 KV offset [1, H, n, D] each (keys at the stored positions) as one unit vector."""
    x = torch.cat([dk.flatten(), dv.flatten()]).float()
    return x / x.norm().clamp_min(1e-12)


class Anchoring:
    """An :class:`AnchorPool` at work in one assembly: called by :func:`recompute_rows` with layer 1's
    reused KV (its exact KV already in ``keys[1]``/``values[1]``), it applies the close anchors'
    offsets to each document's deeper layers and returns the rows it corrected; :meth:`learn` then
    keeps what the recompute gave the other documents as their anchors. ``placed``: per document
    (store key, (start, end) where it sits, the position it was stored at); ``rope`` moves keys."""

    def __init__(self, pool: AnchorPool, rope, keys: list[torch.Tensor], values: list[torch.Tensor],
                 placed: list[tuple[str, tuple[int, int], int]], start: int):
        self.pool, self.rope, self.keys, self.values, self.start = pool, rope, keys, values, start
        self.placed = placed
        self.anchored = [False] * len(placed)
        self._learn: dict[int, tuple] = {}

    def _move(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        return self.rope.shift(k, delta) if delta else k.float()

    def __call__(self, old_k: torch.Tensor, old_v: torch.Tensor) -> torch.Tensor:
        keys, values, s0 = self.keys, self.values, self.start
        done = torch.zeros(keys[0].shape[-2] - s0, dtype=torch.bool, device=keys[0].device)
        for j, (key, (a, b), at) in enumerate(self.placed):
            probe = probe_vector(self._move(keys[1][:, :, a:b].float() - old_k[:, :, a - s0 : b - s0], at - a),
                                 values[1][:, :, a:b].float() - old_v[:, :, a - s0 : b - s0])
            close = self.pool.match(key, probe)
            if not close:
                self._learn[j] = (probe, [k[:, :, a:b].clone() for k in keys[2:]],
                                  [v[:, :, a:b].clone() for v in values[2:]])
                continue
            dk, dv = self.pool.offsets(close)
            for i in range(2, len(keys)):
                keys[i][:, :, a:b] += self._move(dk[i - 2], a - at).to(keys[i].dtype)
                values[i][:, :, a:b] += dv[i - 2].to(values[i].dtype)
            done[a - s0 : b - s0] = self.pool.skip_recompute
            self.anchored[j] = True
        return done

    def learn(self) -> None:
        for j, (probe, old_k, old_v) in self._learn.items():
            key, (a, b), at = self.placed[j]
            self.pool.add(key, Anchor(
                probe.half(),
                [self._move(k[:, :, a:b].float() - o.float(), at - a).half() for k, o in zip(self.keys[2:], old_k)],
                [(v[:, :, a:b].float() - o.float()).half() for v, o in zip(self.values[2:], old_v)]))
        self._learn.clear()
