"""memfit's attention function, registered with transformers' attention interface as ``"memfit"``.

It runs SDPA and adds two things transformers' own functions cannot do:

- **observation** (:func:`observe`): during prefill it records what eviction methods score with:
  the last query states of each layer (SnapKV, TOVA), or the attention each key receives, summed
  (H2O) or maxed (KVzip) over the queries and the query heads of its GQA group;
- **ragged heads**: a cache whose KV heads hold different numbers of tokens hands over a per-head
  validity mask with :func:`push_head_mask`; the padded slots are masked out here, so attention over
  the ragged storage is exact.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memfit.kernels import max_attention as kernel
from memfit.kv.evict.base import Observation

ATTN_IMPLEMENTATION = "memfit"
_ROWS = 128  # query rows per block when attention probabilities are reduced (bounds memory)
_TILE = (256, 1024)  # max_attention's blocks of query rows x keys (measured fastest on a 2-core CPU)
_TILE16 = (256, 6144)  # the same in bfloat16, keys x query rows (see _max_attention_16)


@dataclass
class Observer:
    """What one forward pass records. ``window``: last queries kept per layer; ``reduce``: "sum" or
    "max" of the attention probabilities each of the first ``num_keys`` keys receives; ``probe``: the
    fraction of the other queries kept too, a random sample of each forward call's rows, with their
    positions (ZipCache's probe)."""

    window: int = 0
    reduce: str | None = None
    num_keys: int | None = None
    probe: float = 0.0
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, Hq, window, D]
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, H, keys]
    probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # ([P], [B, Hq, P, D])

    _layout: tuple | None = field(default=None, repr=False)  # (mask, nq, nk) -> layout, see mask_layout

    def mask_layout(self, mask: torch.Tensor | None, nq: int, nk: int) -> tuple[bool, bool]:
        """(every query sees each of the first ``num_keys`` keys, the keys after them are the
        queries' own causal square): checked once per mask, which transformers builds once for all
        layers of a forward pass."""
        if self._layout is None or self._layout[0] is not mask or self._layout[1:3] != (nq, nk):
            visible = _all_visible(mask, nq, nk, self.num_keys)
            split = visible and nk - nq == self.num_keys and _causal_tail(mask, nq, nk)
            self._layout = (mask, nq, nk, (visible, split))
        return self._layout[3]

    @property
    def wants_lse(self) -> bool:
        """Whether a log-sum-exp of each query's logits from the attention kernel saves work: the
        max of probabilities over the first ``num_keys`` keys is then one matmul and a max."""
        return self.reduce == "max" and self.num_keys is not None

    def add(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
            scaling: float, lse: torch.Tensor | None = None) -> None:
        layer = module.layer_idx
        if self.probe:
            self._add_probe(layer, query, key.shape[2])
        if self.window:
            q = query[:, :, -self.window :].detach()
            prev = self.queries.get(layer)
            if prev is not None and q.shape[2] < self.window:
                q = torch.cat([prev, q], dim=2)[:, :, -self.window :]
            self.queries[layer] = q.clone()
        if self.reduce:
            if lse is not None and self.mask_layout(mask, query.shape[2], key.shape[2])[0]:
                a = max_attention(query, key[:, :, : self.num_keys], lse, scaling)
            else:
                a = reduce_attention(query, key, mask, scaling, self.reduce)
            if self.num_keys is not None:
                a = a[..., : self.num_keys]
            prev = self.attention.get(layer)
            if prev is None:
                self.attention[layer] = a
            else:  # keys grow chunk by chunk: combine over the keys both have seen
                n = min(prev.shape[-1], a.shape[-1])
                head = torch.maximum(prev[..., :n], a[..., :n]) if self.reduce == "max" else prev[..., :n] + a[..., :n]
                self.attention[layer] = torch.cat([head, a[..., n:], prev[..., a.shape[-1]:]], dim=-1)

    def _add_probe(self, layer: int, query: torch.Tensor, nk: int) -> None:
        """Keep a random ``probe`` fraction of this call's query rows (the last ``nq`` of ``nk``
        positions), the same rows in every layer (seeded by the position)."""
        nq = query.shape[2]
        m = math.ceil(self.probe * nq)
        rows = torch.randperm(nq, generator=torch.Generator().manual_seed(nk))[:m].sort().values.to(query.device)
        pos, q = rows + (nk - nq), query[:, :, rows].detach()
        prev = self.probes.get(layer)
        self.probes[layer] = (pos, q) if prev is None else (torch.cat([prev[0], pos]), torch.cat([prev[1], q], dim=2))

    def observations(self, num_layers: int) -> dict[int, Observation]:
        """What was recorded, as one ``Observation`` per layer."""
        return {i: Observation(self.queries.get(i), self.attention.get(i), probe=self.probes.get(i))
                for i in range(num_layers)}


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    """An additive float mask (0 or a very negative number) as a boolean one (True = visible)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def reduce_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                     how: str) -> torch.Tensor:
    """Softmax attention probabilities of ``query`` [B, Hq, Q, D] over ``key`` [B, H, L, D], reduced
    ("sum" or "max") over the queries and the query heads of each KV head -> [B, H, L] (at least
    float32). ``mask``: bool (True = visible) or additive, broadcastable to [B, 1|Hq, Q, L]; None =
    causal. Logits come from a matmul in the input dtype; the softmax is taken in float32."""
    b, hq, nq, d = query.shape
    h, nk = key.shape[1], key.shape[2]
    g = hq // h
    ftype = torch.promote_types(query.dtype, torch.float32)
    kt = (key.transpose(-1, -2) * scaling).unsqueeze(2)  # [B, H, 1, D, L]
    if mask is not None:
        mask = _as_bool(mask)
    out = torch.full((b, h, nk), float("-inf") if how == "max" else 0.0, dtype=ftype, device=key.device)
    for s in range(0, nq, _ROWS):
        q = query[:, :, s : s + _ROWS].reshape(b, h, g, -1, d)
        rows = q.shape[3]
        logits = (q @ kt).to(ftype)  # [B, H, g, rows, L]
        if mask is None:
            if s + (nk - nq) < nk - 1:  # the block's first query does not see every key
                i = torch.arange(s, s + rows, device=key.device).unsqueeze(-1) + (nk - nq)
                logits.masked_fill_(torch.arange(nk, device=key.device) > i, float("-inf"))
        else:
            m = mask[..., s : s + rows, :]
            m = m.reshape(m.shape[0], -1, 1, rows, nk) if m.shape[1] == 1 else m.reshape(m.shape[0], h, g, rows, nk)
            logits.masked_fill_(~m, float("-inf"))
        logits.sub_(logits.logsumexp(dim=-1, keepdim=True).nan_to_num_(0.0))  # log-probabilities
        if how == "max":
            torch.maximum(out, logits.amax(dim=(2, 3)), out=out)
        else:
            out += logits.exp_().sum(dim=(2, 3))
    return out.exp() if how == "max" else out


def max_attention(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float) -> torch.Tensor:
    """The largest softmax probability each key of ``key`` [B, H, L, D] receives from ``query``
    [B, Hq, Q, D] and the query heads of its GQA group -> [B, H, L] float32, given each query's
    log-sum-exp ``lse`` [B, Hq, Q] over all the keys it attends to (every key here must be visible
    to every query). p = exp(q.k * scaling - lse), and exp is monotone, so the max is taken over
    logits and exp applied once per key: the -lse rides in the matmul as an extra column
    (q * scaling, -lse) . (k, 1), so no probability is ever exponentiated or written twice. On CUDA
    the Triton kernel (``memfit.kernels.max_attention``) does the same without writing the logits;
    this is its reference."""
    if kernel.supported(query, key):
        return kernel.max_attention(query, key, lse, scaling)
    if query.dtype == torch.bfloat16 and query.device.type == "cpu":
        return _max_attention_16(query, key, lse, scaling)
    b, hq, nq, d = query.shape
    h, nk = key.shape[1], key.shape[2]
    ftype = torch.promote_types(query.dtype, torch.float32)
    kt = torch.cat([key.to(ftype), key.new_ones(b, h, nk, 1, dtype=ftype)], dim=-1).transpose(-1, -2)
    qa = torch.cat([query.to(ftype) * scaling, -lse.to(ftype).unsqueeze(-1)], dim=-1)
    qa = qa.reshape(b, h, (hq // h) * nq, d + 1)  # query head i reads KV head i // g: a group's rows are adjacent
    out = torch.full((b, h, nk), float("-inf"), dtype=ftype, device=key.device)
    rows, cols = _TILE  # tiles that stay in cache between the matmul and the max
    for c in range(0, nk, cols):
        part = out[..., c : c + cols]
        for s in range(0, qa.shape[2], rows):
            torch.maximum(part, (qa[:, :, s : s + rows] @ kt[..., c : c + cols]).amax(dim=2), out=part)
    return out.exp_()


def _max_attention_16(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`max_attention` with the matmul and the max in bfloat16 (a CPU with AMX multiplies
    bfloat16 5x faster than float32; KVzip's pass spent half its time here in float32). The matmul
    gives each -log p = lse - q.k * scaling, lse riding as two bfloat16 columns (its rounded value and
    the rest, so it is summed to float32 accuracy inside the matmul); each is rounded once, to 2**-9
    of itself (measured: p within 2% where log p > -4, 3% below). -log p >= 0, and bfloat16 values
    >= 0 order as their bits read as int16 do, so the max of p is an int16 min (4x a bfloat16 max;
    a value rounded below zero is within 2**-9 of it, p = 1 either way). Tiles are keys x query
    rows, so the min runs along memory."""
    b, hq, nq, d = query.shape
    h, nk = key.shape[1], key.shape[2]
    dt = query.dtype
    hi = lse.to(dt)
    lo = (lse.float() - hi.float()).to(dt)
    qa = torch.cat([query * -scaling, hi.unsqueeze(-1), lo.unsqueeze(-1)], dim=-1)
    qa = qa.reshape(b, h, (hq // h) * nq, d + 2).transpose(-1, -2).contiguous()  # [B, H, d + 2, rows]
    ka = torch.cat([key, key.new_ones(b, h, nk, 2)], dim=-1)
    neg_log = torch.full((b, h, nk), torch.iinfo(torch.int16).max, dtype=torch.int16, device=key.device)
    cols, rows = _TILE16
    for c in range(0, nk, cols):
        part = neg_log[..., c : c + cols]
        for s in range(0, qa.shape[-1], rows):
            tile = ka[:, :, c : c + cols] @ qa[..., s : s + rows]
            torch.minimum(part, tile.view(torch.int16).amin(dim=-1), out=part)
    return neg_log.view(dt).float().neg_().exp_()


def _all_visible(mask: torch.Tensor | None, nq: int, nk: int, num_keys: int | None) -> bool:
    """Whether every query sees each of the first ``num_keys`` keys (None mask: causal)."""
    if num_keys is None:
        return False
    if mask is None:
        return nk - nq >= num_keys - 1
    return bool(_as_bool(mask)[..., :num_keys].all())


def _causal_tail(mask: torch.Tensor | None, nq: int, nk: int) -> bool:
    """Whether the last ``nq`` keys are masked as the queries' own causal square."""
    if mask is None:
        return True
    i = torch.arange(nq, device=mask.device)
    return bool((_as_bool(mask)[..., nk - nq :] == (i <= i.unsqueeze(-1))).all())


_cudnn_ok = True  # cleared when cuDNN's attention refuses a call (shape, GPU, torch version): flash after that


def _fused_op(query: torch.Tensor):
    """torch's fused attention kernel that returns each query's log-sum-exp with the output, as
    ``op(q, k, v, causal, bias, scale) -> (out [B, Hq, Q, D], lse [B, Hq, Q])`` and whether it
    takes an additive mask; None where there is none (older torch, other devices, float32 on GPU).
    On CUDA: cuDNN's attention (2x the flash kernel on an H200 for KVzip's 2K x 32K shape), else flash."""
    aten = torch.ops.aten
    if query.device.type == "cpu" and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        cpu = aten._scaled_dot_product_flash_attention_for_cpu
        return (lambda q, k, v, causal, bias, scale: cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)), True
    if (query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16)
            or not hasattr(aten, "_scaled_dot_product_flash_attention")):
        return None

    def cuda(q, k, v, causal, bias, scale):
        global _cudnn_ok
        if _cudnn_ok and hasattr(aten, "_scaled_dot_product_cudnn_attention"):
            try:
                out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                     scale=scale)[:2]
                return out, lse.reshape(lse.shape[:3])  # cuDNN's is [B, H, Q, 1]
            except RuntimeError:
                _cudnn_ok = False
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]

    return cuda, False


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scaling: float, split: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention output [B, Q, Hq, D] (the layout transformers' attention functions return) and
    each query's log-sum-exp [B, Hq, Q], from torch's fused attention kernel (GQA read natively);
    None where no such kernel applies (see :func:`_fused_op`), and the caller runs SDPA.

    ``split``: every query sees the keys before the last ``nq``, and those are the queries' own
    causal square (KVzip's pass: the context, then the repeat tokens; the caller has checked the
    mask). The two parts then run as two unmasked kernel calls (the causal one skips the upper
    triangle) merged by their log-sum-exps, instead of one call reading a full additive mask
    (which the GPU's flash kernel does not take)."""
    found = _fused_op(query)
    if found is None:
        return None
    op, takes_mask = found
    nq, nk = query.shape[2], key.shape[2]
    if split:
        c = nk - nq
        out, lse = op(query, key[:, :, :c], value[:, :, :c], False, None, scaling)
        out2, lse2 = op(query, key[:, :, c:], value[:, :, c:], True, None, scaling)
        total = torch.logaddexp(lse, lse2)
        out = out * (lse - total).exp_().unsqueeze(-1) + out2 * (lse2 - total).exp_().unsqueeze(-1)
        return out.to(query.dtype).transpose(1, 2).contiguous(), total
    if not takes_mask:
        return None
    if mask is None:  # causal, the queries being the last nq positions
        mask = torch.arange(nk, device=query.device) <= torch.arange(nk - nq, nk, device=query.device).unsqueeze(-1)
    bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~_as_bool(mask), float("-inf"))
    out, lse = op(query, key, value, False, bias, scaling)
    return out.transpose(1, 2).contiguous(), lse


_observer: Observer | None = None


@contextlib.contextmanager
def observe(window: int = 0, reduce: str | None = None, num_keys: int | None = None,
            probe: float = 0.0) -> Iterator[Observer | None]:
    """Record, during the forward passes inside the block, what :class:`Observer` describes."""
    global _observer
    if window <= 0 and reduce is None and not probe:
        yield None
        return
    if reduce not in (None, "sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    if not 0.0 <= probe <= 1.0:
        raise ValueError(f"probe must be a fraction in [0, 1], got {probe}")
    prev, _observer = _observer, Observer(window, reduce, num_keys, probe)
    try:
        yield _observer
    finally:
        _observer = prev


# -- ragged heads: the cache pushes a mask right before the layer's attention pops it ----------------
_pending = threading.local()


def _state():
    """This thread's hand-offs from the cache to the attention calls of the same forward pass."""
    if not hasattr(_pending, "masks"):
        _pending.masks, _pending.requests, _pending.scores, _pending.packed = {}, {}, {}, {}
    return _pending


def push_head_mask(layer_idx: int, mask: torch.Tensor) -> None:
    """``mask`` [B, H, L] bool: which stored keys of each KV head are real (the rest is padding)."""
    masks = _state().masks
    if layer_idx in masks:
        masks.clear()
        raise RuntimeError("a cache with ragged per-head storage needs the model loaded with "
                           f"attn_implementation={ATTN_IMPLEMENTATION!r} (memfit.load_model does this)")
    masks[layer_idx] = mask


def push_packed(layer_idx: int, packed) -> None:
    """Hand the layer's packed KV to its next attention call instead of dequantized tensors:
    ``packed.attend(query, scaling)`` -> [B, 1, Hq, D] for one decode step, ``packed.materialize()``
    -> (keys, values, mask of real entries or None) for anything else."""
    _state().packed[layer_idx] = packed


def request_scores(layer_idx: int, owner: object) -> None:
    """Ask for the attention the next query of ``layer_idx`` gives each key (summed over its heads),
    on behalf of ``owner`` (a cache: caches decoding in turn each get their own; held weakly)."""
    _state().requests[layer_idx] = owner


def pop_scores(layer_idx: int, owner: object) -> torch.Tensor | None:
    """[B, H, L] attention received by each key in ``owner``'s last requested step of the layer, if any."""
    return _state().scores.get(layer_idx, {}).pop(owner, None)


def _fit_mask(mask: torch.Tensor, nk: int) -> torch.Tensor:
    """transformers builds one mask for all layers, sized by layer 0; a compressed cache may hold a
    different number of context entries in other layers (PyramidKV, adaptive heads). The context
    comes first and is visible to every new token, so the mask is fitted by adding or dropping
    leading (visible) columns; what follows the context keeps its mask."""
    mask = _as_bool(mask)
    d = nk - mask.shape[-1]
    if d == 0:
        return mask
    if d > 0:
        return torch.cat([torch.ones(*mask.shape[:-1], d, dtype=torch.bool, device=mask.device), mask], dim=-1)
    if not bool(mask[..., :-d].all()):
        raise ValueError(f"attention mask of length {mask.shape[-1]} does not fit {nk} keys: a cache whose layers "
                         "hold different numbers of entries needs its leading (context) entries visible")
    return mask[..., -d:]


def _with_head_mask(mask: torch.Tensor | None, head_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    b, hq, nq, _ = query.shape
    nk = head_mask.shape[-1]
    hm = head_mask.repeat_interleave(hq // head_mask.shape[1], dim=1).unsqueeze(2)  # [B, Hq, 1, L]
    if mask is None:
        i = torch.arange(nq, device=query.device).unsqueeze(-1) + (nk - nq)
        mask = torch.arange(nk, device=query.device) <= i
    return _fit_mask(mask, nk) & hm


@torch.compiler.disable
def _static_attention(module: torch.nn.Module, query: torch.Tensor, scaling: float | None) -> torch.Tensor | None:
    """A static step over a static cache's packed KV (the kernel), outside a compiled step's trace;
    None when the layer's cache handed nothing over (a 16-bit cache: SDPA, traced)."""
    packed = _state().packed.pop(module.layer_idx, None)
    if packed is None:
        return None
    if _observer is not None or _state().requests:
        raise ValueError("a static step attends without observers or score requests")
    return packed.attend(query, scaling or getattr(module, "scaling", query.shape[-1] ** -0.5))


def memfit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    if kwargs.get("memfit_static_step", False) and query.shape[2] == 1:
        out = _static_attention(module, query, kwargs.get("scaling"))
        if out is not None:
            return out, None
    state = _state()
    if kwargs.get("memfit_static_step", False) and query.shape[2] == 1:
        # a static step (GraphDecoder's) has no padding and no empty slot: the mask transformers
        # builds for its one query token is all visible (under CUDA-graph capture it is not
        # skipped); without it SDPA also runs its GQA kernel instead of repeating K and V per head
        attention_mask = None
    packed = state.packed.pop(module.layer_idx, None)
    if packed is not None:
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        if query.shape[2] == 1 and _observer is None and not state.requests:
            if attention_mask is None:
                return packed.attend(query, scaling), None  # the packed-KV kernel: nothing dequantized
            if getattr(packed, "masked", False):  # a tiered step reads the mask of the new tokens itself
                return packed.attend(query, scaling, _as_bool(attention_mask)), None
        if hasattr(packed, "observe_queries"):  # a tiered step pins the pages the question attends most
            packed.observe_queries(query, scaling)
        key, value, packed_mask = packed.materialize()
    head_mask = state.masks.pop(module.layer_idx, None)
    if packed is not None and packed_mask is not None:  # ragged heads: their padding stays unseen
        head_mask = packed_mask
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = _fit_mask(attention_mask, key.shape[-2])
    if head_mask is not None:
        attention_mask = _with_head_mask(attention_mask, head_mask, query)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
    if _observer is not None:
        # KVzip's pass: the fused kernel's log-sum-exp makes its max attention one matmul; its
        # output stands in for SDPA's, so the attention runs once
        fused = None
        if _observer.wants_lse and not module.training:
            split = _observer.mask_layout(attention_mask, query.shape[2], key.shape[2])[1]
            fused = attention_with_lse(query, key, value, attention_mask, scaling, split)
        _observer.add(module, query, key, attention_mask, scaling, lse=fused[1] if fused else None)
        if fused is not None and module.layer_idx not in state.requests:
            return fused[0], None
    if module.layer_idx in state.requests:
        owner = state.requests.pop(module.layer_idx)
        by_owner = state.scores.setdefault(module.layer_idx, weakref.WeakKeyDictionary())
        by_owner[owner] = reduce_attention(query, key, attention_mask, scaling, "sum")
    parts = kwargs.get("memfit_attention_parts")
    if parts and query.device.type == "cpu" and head_mask is None and _observer is None and not kwargs.get("softcap"):
        # the same attention in groups of rows, each over the keys up to its last row, its query heads
        # stacked over their KV head (see memfit.reuse._parts): (first row, end, keys, mask)
        b, hq, _, d = query.shape
        hk = key.shape[1]
        if all(mask.shape[-2] == hq // hk * (e - a) for a, e, _, mask in parts):
            outs = [torch.nn.functional.scaled_dot_product_attention(
                query[:, :, a:e].reshape(b, hk, hq // hk * (e - a), d), key[:, :, :seen], value[:, :, :seen],
                attn_mask=mask, scale=scaling).view(b, hq, e - a, d) for a, e, seen, mask in parts]
            return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None
    if query.is_cuda and attention_mask is not None and query.shape[2] <= _FEW_QUERIES:
        # SDPA would pick cuDNN for a masked call, which builds a kernel for every new shape: every
        # decode step is one (~10 s for the first answer on a KVzip cache on an H200). Prefill
        # chunks keep it (fewer shapes, and there cuDNN is the fastest kernel).
        with sdpa_kernel(_MASKED_BACKENDS):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if (query.device.type == "cpu" and attention_mask is not None and query.shape[2] > 1
            and key.shape[1] != query.shape[1] and not module.training
            and not any(kwargs.get(k) is not None for k in ("softcap", "position_bias"))):
        # transformers repeats K and V once per query head whenever a mask is given (CUDA's fused
        # kernels need that); on a CPU SDPA reads them grouped under a mask too, 2.5x faster for a
        # question's 34 rows over 4K keys (every ask, recomputed rows, later prefill chunks)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_FEW_QUERIES = 64  # decode steps and questions; longer calls are prefill chunks

AttentionInterface.register(ATTN_IMPLEMENTATION, memfit_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
