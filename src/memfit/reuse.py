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
With ``recompute=1.0`` every token is recomputed and the result is a full prefill's.

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

DEFAULT_RECOMPUTE = 0.05  # fraction of reused tokens recomputed: >= 5x lower TTFT at 4K on a CPU (memfit bench reuse)


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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
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


BLOCK = 256  # rows per layer call: later blocks see more keys, earlier ones fewer (causal, in blocks)


def _run(layer, hidden, rows, rotary, cache, arg):
    """One decoder layer on ``rows`` (ascending; their hidden states ``hidden`` [1, R, D]), in
    blocks, each attending over the keys up to its last row only."""
    outs = []
    for i in range(0, rows.numel(), BLOCK):
        r, h = rows[i : i + BLOCK], hidden[:, i : i + BLOCK]
        pos = r.unsqueeze(0)
        mask = (torch.arange(int(r[-1]) + 1, device=r.device) <= r.unsqueeze(-1))[None, None]  # [1, 1, R, seen]
        cache.rows = r
        try:
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary(h, pos),
                        use_cache=True, **{arg: cache})
        except _Stop:
            continue
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs, dim=1) if outs else None


@torch.no_grad()
def compute_rows(model: torch.nn.Module, input_ids: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Run ``rows`` (every row from some start on, or any set whose earlier rows' KV is exact)
    through all layers, writing their KV into ``keys``/``values``."""
    embed, rotary, layers = decoder_parts(model)
    cache = _Rows(keys, values)
    arg = cache_arg_name(type(layers[0]))
    if rows.numel() == 0:
        return
    h = embed(input_ids[:, rows])
    for layer in layers:
        h = _run(layer, h, rows, rotary, cache, arg)


@torch.no_grad()
def recompute_rows(model: torch.nn.Module, input_ids: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor], start: int, fresh: torch.Tensor, fraction: float,
                   correct: "Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None" = None) -> Blended:
    """Repair an assembled KV in place. ``input_ids`` [1, N]; ``keys``/``values`` per layer
    [1, H, N, D] in the compute dtype: rows before ``start`` are exact, the others hold reused KV
    (already moved to their positions) except where ``fresh`` [N] is set (no KV yet: always
    computed). ``fraction`` of the reused rows after ``start``, those whose layer-1 KV deviates most
    once layer 0 has run over them, are recomputed through every layer. ``correct(old_k1, old_v1)``
    (layer 1's reused KV of every row from ``start``, its exact KV now in ``keys[1]``/``values[1]``)
    may correct the deeper layers' reused KV and returns the rows [N - start] it has corrected,
    which are then not recomputed (anchors, see :class:`AnchorPool`)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"recompute must be a fraction in [0, 1], got {fraction}")
    embed, rotary, layers = decoder_parts(model)
    n = input_ids.shape[1]
    dev = input_ids.device
    rows = torch.arange(start, n, device=dev)
    if rows.numel() == 0:
        return Blended(0, 0)
    if fraction == 0.0 or len(layers) == 1:  # naive concatenation: only the rows without KV are computed
        compute_rows(model, input_ids, keys, values, rows[fresh[rows]])
        return Blended(0, int((~fresh[rows]).sum()))
    cache = _Rows(keys, values)
    arg = cache_arg_name(type(layers[0]))
    h = _run(layers[0], embed(input_ids[:, rows]), rows, rotary, cache, arg)  # exact, as its KV is
    old_k, old_v = keys[1][:, :, rows].float(), values[1][:, :, rows].float()
    cache.stop_at = 1  # layer 1's exact KV for every row (its attention and MLP are not needed for the rest)
    _run(layers[1], h, rows, rotary, cache, arg)
    cache.stop_at = None
    new_k, new_v = keys[1][:, :, rows].float(), values[1][:, :, rows].float()
    # squared deviation per row, each of K and V relative to its own mean square (keys are larger)
    dev_k = (new_k - old_k).pow(2).sum((0, 1, 3)) / new_k.pow(2).sum((0, 1, 3)).mean().clamp_min(1e-12)
    dev_v = (new_v - old_v).pow(2).sum((0, 1, 3)) / new_v.pow(2).sum((0, 1, 3)).mean().clamp_min(1e-12)
    score = dev_k + dev_v
    is_fresh = fresh[rows]
    reused = int((~is_fresh).sum())
    if correct is not None:
        done = correct(old_k, old_v) & ~is_fresh
        score[done] = float("-inf")
        reused -= int(done.sum())
    score[is_fresh] = float("inf")
    k = min(rows.numel(), int(is_fresh.sum()) + math.ceil(fraction * reused))
    pick = score.topk(k).indices.sort().values if k < rows.numel() else torch.arange(rows.numel(), device=dev)
    if k:
        rows, h = rows[pick], h[:, pick]
        for layer in layers[1:]:  # layer 1 again: its KV is rewritten with the same values
            h = _run(layer, h, rows, rotary, cache, arg)
    return Blended(k - int(is_fresh.sum()), reused)


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
