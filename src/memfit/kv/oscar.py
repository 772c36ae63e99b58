"""OSCAR: low-bit KV after rotations and clips calibrated offline, per layer and KV head.

The rotated quantizer (``hadamard``, :mod:`memfit.kv.rotate`) multiplies every head by one fixed
Hadamard matrix and clips every group's range to one fraction (0.8 at 2 bits). OSCAR derives both
per layer and KV head from what an error costs there, once per model, on calibration text:

- **Keys.** A key error ``e`` moves the logits by ``q . e``: its cost is ``e^T C_q e``, ``C_q`` the
  covariance of the (post-RoPE) queries of the head's GQA group. The keys are rotated by ``C_q``'s
  eigenvectors ``U_Q`` and then the Hadamard matrix (``rot_k = U_Q H``, as OSCAR's code does), and
  coded as KIVI codes keys: per channel over groups of ``group`` tokens. (OSCAR groups a key per
  token over the head; on SmolLM2 per-token keys had 2.8-3x the logit error of per-channel ones
  whatever the rotation: ``benchmarks/kv_rotation_probe.py``.)
- **Values.** A value error reaches the residual stream through ``o_proj``: its cost is ``e^T M e``,
  ``M`` the Gram matrix of ``W_o``'s column blocks of the head's GQA group. Values are rotated by
  ``M``'s eigenvectors and then the Hadamard matrix (``rot_v``) and coded per token, as KIVI does.
- **Clips.** For each width (2, 4, 8), layer and head, of keys and of values, the fraction of a
  group's range kept (towards its mean, as ``hadamard`` clips) is the one of ``CLIPS`` whose codes
  move the attention output of the calibration text's last ``PROBE`` queries least, in ``o_proj``'s
  metric. (The least-squares error of the codes themselves is the wrong target: it clips the rare
  tail keys that attention reads.)

The first ``sinks`` tokens of a layer stay exact (float16), as ``hadamard`` keeps them. The
calibration (:func:`calibrate`: one forward pass, then the search) belongs to the model, like its
weights: it is neither stored in a cache nor counted in its bytes, and a restored cache needs the
model again (``from_state(..., model=)``). :func:`provide` tells memfit how to get a model's
calibration when a cache first needs it: ``memfit.api.LM`` fits it on the shipped essay's first
2,048 tokens (about 20 s for SmolLM2 in float32 on a 2-core CPU) and keeps it under the model's fingerprint
(``$MEMFIT_CACHE/oscar/``). Each KV head has rotations of its own, so an eviction before it must
keep as many tokens in every head (``heads=uniform``). Torch path only: the decode kernel reads
one rotation for all heads.

Measured on SmolLM2 (perplexity, half of each text as context, ``residual=32``, everything counted;
``memfit eval --perplexity-only --perplexity-text FILE``; the essay is the calibration text, the
other two held out), none / ``hadamard(bits=2)`` / ``oscar(bits=2)`` / ``oscar(bits=2,clip=0.8)``:
docs/store.md's first 12,000 characters 19.56 / 22.41 / 23.67 / 22.54, docs/gpu.md's 18.86 / 20.61 /
21.66 / 21.09, the essay 26.49 / 26.76 / 27.36 / 27.24 (2.68-2.96 bits an element). With 4-bit keys
and 2-bit values, ``hadamard`` / ``oscar``: 20.11 / 20.18, 19.11 / 19.19, 26.50 / 26.55. The
calibrated rotations and clips do not improve on the fixed Hadamard rotation and 0.8 clip here: with
the clips fixed at 0.8 the rotation ``U_Q H`` reads about as the Hadamard alone (22.41-22.54 on store.md
between runs whose rotations differ by float rounding), ``U_Q`` alone worse (23.03), and the clips
chosen per head on the essay's attention cost perplexity even on the essay itself.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memfit.kv.quant import KIVI, STORED, OnCodes, OnKIVI, QTensor, kivi_token_bytes, quantize_keys, quantize_values
from memfit.kv.rotate import Hadamard, clip_towards_mean, hadamard
from memfit.lazy import lazy_module

torch = lazy_module("torch")

CLIPS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the clip fractions a calibration chooses among
WIDTHS = (2, 4, 8)  # the widths it calibrates clips for (KIVI's)
FORMAT = 1  # bump when what a saved calibration holds changes
GROUP = 64  # the token groups (keys) the clips are calibrated with
PROBE = 256  # the last queries of the calibration text whose attention output chooses the clips


@dataclass
class OscarLayer:
    """One layer's calibration: rotations [H, D, D] (columns: the basis the codes are in) and, per
    width, each head's clip of the keys' and the values' group ranges [H]."""

    rot_k: torch.Tensor
    rot_v: torch.Tensor
    clip_k: dict[int, torch.Tensor]
    clip_v: dict[int, torch.Tensor]


@dataclass
class Calibration:
    """A model's calibration: ``rot_k`` / ``rot_v`` [L, H, D, D] float32, ``clip`` [len(WIDTHS), 2,
    L, H] (keys, values), and the number of calibration tokens it was fitted on."""

    rot_k: torch.Tensor
    rot_v: torch.Tensor
    clip: torch.Tensor
    tokens: int

    def __post_init__(self) -> None:
        ln, h, d, d2 = self.rot_k.shape
        if self.rot_v.shape != (ln, h, d, d2) or d != d2 or self.clip.shape != (len(WIDTHS), 2, ln, h):
            raise ValueError(f"oscar: calibration shapes do not fit together: rot_k {tuple(self.rot_k.shape)}, "
                             f"rot_v {tuple(self.rot_v.shape)}, clip {tuple(self.clip.shape)}")

    @property
    def num_layers(self) -> int:
        return self.rot_k.shape[0]

    def layer(self, i: int, device: "torch.device | str" = "cpu") -> OscarLayer:
        clip = {w: self.clip[j, :, i].to(device) for j, w in enumerate(WIDTHS)}
        return OscarLayer(self.rot_k[i].to(device), self.rot_v[i].to(device), {w: c[0] for w, c in clip.items()},
                          {w: c[1] for w, c in clip.items()})

    def save(self, path: "str | Path", fingerprint: str) -> None:
        """Write it (safetensors) for the model of ``fingerprint``; atomically, so that a reader
        never sees half a file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": str(FORMAT), "fingerprint": fingerprint, "tokens": str(self.tokens),
                "widths": json.dumps(WIDTHS), "clips": json.dumps(CLIPS)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"rot_k": self.rot_k.contiguous().cpu(), "rot_v": self.rot_v.contiguous().cpu(),
                   "clip": self.clip.contiguous().cpu()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: "str | Path", fingerprint: str | None = None) -> "Calibration":
        """Read what :meth:`save` wrote; a file for another model (``fingerprint``), another format or
        a corrupt one raises ValueError naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                t = {n: f.get_tensor(n) for n in f.keys()}
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise ValueError(f"oscar: cannot read the calibration {path}: {e}") from None
        if meta.get("format") != str(FORMAT) or json.loads(meta.get("widths", "null")) != list(WIDTHS):
            raise ValueError(f"oscar: {path} holds a calibration of another format ({meta.get('format')!r}, "
                             f"this memfit writes {FORMAT})")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise ValueError(f"oscar: {path} was calibrated for model {meta.get('fingerprint')!r}, not {fingerprint!r}")
        if set(t) != {"rot_k", "rot_v", "clip"}:
            raise ValueError(f"oscar: {path} holds {sorted(t)}, not rot_k, rot_v and clip")
        return cls(t["rot_k"].float(), t["rot_v"].float(), t["clip"].float(), int(meta.get("tokens", 0)))


def _eigbasis(m: torch.Tensor) -> torch.Tensor:
    """Eigenvectors [..., D, D] of symmetric ``m``, as columns in descending order of eigenvalue."""
    _, vec = torch.linalg.eigh(m.double())
    return vec.flip(-1).float()


def _clipped(x: torch.Tensor, clip: "float | torch.Tensor", axis: str, group: int) -> torch.Tensor:
    """``x`` [B, H, N, D] with each group's range (``axis`` "token": per channel over ``group``
    tokens; "channel": per token over ``group`` channels) shrunk towards its mean to ``clip`` of
    itself (one fraction, or one a head [H])."""
    b, h, n, d = x.shape
    g = x.reshape(b, h, n // group, group, d) if axis == "token" else x.reshape(b, h, n, d // group, group)
    if isinstance(clip, torch.Tensor):
        clip = clip.to(x.device, torch.float32).reshape(1, h, 1, 1, 1)
    return clip_towards_mean(g, clip, 3 if axis == "token" else 4).reshape(b, h, n, d)


def _coded(x: torch.Tensor, rot: torch.Tensor, clip: float, width: int, axis: str, group: int,
           at: slice) -> torch.Tensor:
    """``x`` [H, N, D] with its tokens ``at`` coded at ``width`` bits after ``rot`` [H, D, D] and
    ``clip`` (the others exact, as the sinks and the window are)."""
    y = x[:, at].float() @ rot
    y = _clipped(y[None], clip, axis, group)
    q = quantize_keys(y, width, group, use_kernels=False) if axis == "token" else \
        quantize_values(y, width, group, use_kernels=False)
    out = x.float().clone()
    out[:, at] = q.dequantize(torch.float32)[0] @ rot.transpose(-1, -2)
    return out


def _best_clips(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metric: torch.Tensor, rot_k: torch.Tensor,
                rot_v: torch.Tensor, scaling: float, at: slice, group: int, vgroup: int) -> torch.Tensor:
    """Each width's clips [len(WIDTHS), 2, H] (keys, values) of ``CLIPS``: for each head, the one whose
    codes move the attention output of the last queries ``q`` [H, G, M, D] least, in the metric
    ``metric`` [H, G, D, D] of what each query head's output reaches (``o_proj``). The least-squares
    error of the codes themselves is not what counts: it clips the tail keys attention reads."""
    h, g, m, d = q.shape
    n = k.shape[1]
    causal = torch.arange(n)[None, :] > torch.arange(n - m, n)[:, None]  # [M, N]: the queries are the last m

    def attend(keys: torch.Tensor) -> torch.Tensor:  # [H, N, D] -> attention [H, G, M, N]
        logits = torch.einsum("hgmd,hnd->hgmn", q, keys) * scaling
        return logits.masked_fill(causal, float("-inf")).softmax(-1)

    vf = v.float()[:, None]
    a = attend(k.float())
    ref = a @ vf

    def cost(out: torch.Tensor) -> torch.Tensor:  # [H, G, M, D] -> [H]
        e = out - ref
        return ((e @ metric) * e).sum((1, 2, 3))

    out = []
    for w in WIDTHS:
        ck = torch.stack([cost(attend(_coded(k, rot_k, c, w, "token", group, at)) @ vf) for c in CLIPS])
        cv = torch.stack([cost(a @ _coded(v, rot_v, c, w, "channel", vgroup, at)[:, None]) for c in CLIPS])
        out.append(torch.tensor(CLIPS)[torch.stack([ck.argmin(0), cv.argmin(0)])])
    return torch.stack(out)


def fit(queries: "list[torch.Tensor]", keys: "list[torch.Tensor]", values: "list[torch.Tensor]",
        out_proj: "list[torch.Tensor | None]", sinks: int = 4, group: int = GROUP, scaling: float | None = None,
        probe: int = PROBE) -> Calibration:
    """A calibration from one pass over calibration text: per layer, its queries [Hq, N, D] (after
    RoPE), keys [H, N, D] (after RoPE), values [H, N, D], and ``o_proj``'s weight [hidden, Hq * D]
    (None: values weighted alike in every direction). The first ``sinks`` tokens, stored exact,
    are left out of the bases' fit and of the codes; the rest is cut to whole groups of ``group``;
    clips are chosen on the attention of the last ``probe`` queries (``scaling``: the logits', by
    default ``D ** -0.5``)."""
    rk, rv, clips = [], [], []
    for q, k, v, wo in zip(queries, keys, values, out_proj):
        hq, _, d = q.shape
        h = k.shape[0]
        if hq % h or k.shape != v.shape or k.shape[-1] != d or q.shape[1] != k.shape[1]:
            raise ValueError(f"oscar: queries {tuple(q.shape)}, keys {tuple(k.shape)} and values {tuple(v.shape)} "
                             "do not make a layer")
        n = (k.shape[1] - sinks) // group * group
        if n < group:
            raise ValueError(f"oscar: calibration needs at least {sinks + group} tokens, got {k.shape[1]}")
        qg = q.float().reshape(h, hq // h, q.shape[1], d)  # [H, G, N, D]: query head j reads KV head j // G
        cq = qg.flatten(1, 2).transpose(-1, -2) @ qg.flatten(1, 2) / (qg.shape[1] * qg.shape[2])  # [H, D, D]
        if wo is None:
            blocks = torch.eye(d).expand(h, hq // h, d, d)
        else:
            w = wo.float().reshape(wo.shape[0], h, hq // h, d)  # [hidden, H, G, D]
            blocks = torch.einsum("ohgd,ohge->hgde", w, w)  # [H, G, D, D]
        uk = _eigbasis(cq) @ hadamard(d)
        uv = _eigbasis(blocks.sum(1)) @ hadamard(d)
        at = slice(sinks, sinks + n)
        clips.append(_best_clips(qg[:, :, -probe:], k, v, blocks, uk, uv, scaling or d**-0.5, at, group,
                                 min(group, d)))  # [W, 2, H]
        rk.append(uk)
        rv.append(uv)
    return Calibration(torch.stack(rk), torch.stack(rv), torch.stack(clips, 2), keys[0].shape[1])


def _attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "k_proj", None), torch.nn.Module)]


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, sinks: int = 4) -> Calibration:
    """Fit ``model``'s calibration on ``input_ids`` [1, N] (one forward pass; memfit's attention
    records the queries)."""
    from memfit.hfcompat import with_cache
    from memfit.kv.attention import ATTN_IMPLEMENTATION, observe

    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise ValueError(f"oscar: calibration reads the queries through memfit's attention; load the model with "
                         f"attn_implementation={ATTN_IMPLEMENTATION!r} (memfit.load_model does)")
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"oscar: calibration takes one row of token ids [1, N], got {tuple(input_ids.shape)}")
    from transformers import DynamicCache

    cache = DynamicCache()
    n = input_ids.shape[1]
    with torch.no_grad(), observe(window=n) as rec:
        model(input_ids, **with_cache(model, cache), use_cache=True)
    layers = len(cache.layers)
    attns = _attentions(model)
    wo = [getattr(getattr(a, "o_proj", None), "weight", None) for a in attns]
    if len(wo) != layers:
        wo = [None] * layers
    scaling = getattr(attns[0], "scaling", None) if attns else None
    return fit([rec.queries[i][0] for i in range(layers)], [cache.layers[i].keys[0] for i in range(layers)],
               [cache.layers[i].values[0] for i in range(layers)], wo, sinks, scaling=scaling)


_PROVIDERS: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[[], Calibration]]" = weakref.WeakKeyDictionary()
_CALIBRATED: "weakref.WeakKeyDictionary[torch.nn.Module, list[OscarLayer]]" = weakref.WeakKeyDictionary()


def provide(model: torch.nn.Module, how: "Calibration | Callable[[], Calibration]") -> None:
    """Give ``model`` its calibration, or a function that returns it when a cache first needs it."""
    _CALIBRATED.pop(model, None)
    _PROVIDERS[model] = how if callable(how) else (lambda: how)


def of_model(model: torch.nn.Module) -> list[OscarLayer]:
    """``model``'s calibration, one entry per layer (on the model's device)."""
    if model not in _CALIBRATED:
        how = _PROVIDERS.get(model)
        if how is None:
            raise ValueError(f"oscar: {type(model).__name__} has no calibration: load it with memfit.load_model "
                             "(which calibrates once and keeps it under the model's fingerprint), or call "
                             "memfit.kv.oscar.provide(model, calibrate(model, input_ids))")
        calib = how()
        device = next(model.parameters()).device
        _CALIBRATED[model] = [calib.layer(i, device) for i in range(calib.num_layers)]
    return _CALIBRATED[model]


@dataclass
class OscarRun(OnCodes):
    """Keys or values (``which``) coded in their head's rotated basis (KIVI's ``QTensor``), the
    layer's first tokens exactly (``sink`` [B, H, S, D] float16, or None); ``rot`` [H, D, D], the
    model's calibration, is attached by the layer and not stored."""

    q: QTensor
    which: str
    sink: torch.Tensor | None = None
    rot: torch.Tensor | None = None

    def attach(self, part: OscarLayer) -> None:
        self.rot = part.rot_k if self.which == "k" else part.rot_v

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.rot is None:
            raise ValueError("oscar: reading the codes needs the model's calibration: build the cache with "
                             "CompressedCache.for_model(model, policy), restore it with from_state(..., model=model)")
        out = torch.einsum("bhnc,hdc->bhnd", self.q.dequantize(torch.float32), self.rot.to(self.q.codes.device))
        if self.sink is not None:
            out[:, :, : self.sink.shape[-2]] = self.sink.float()
        return out.to(dtype or torch.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.q.tensors(), **({"sink": self.sink} if self.sink is not None else {})}

    def meta(self) -> dict:
        return {"kind": "oscar", "which": self.which, "q": self.q.meta()}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "OscarRun":
        return cls(QTensor.from_meta(t, prefix, meta["q"]), meta["which"], t.get(prefix + "sink"))

    def cat(self, other: "OscarRun") -> "OscarRun":
        """``other``'s tokens after these (a spill: its sinks, not the layer's first tokens, dropped)."""
        return OscarRun(self.q.cat(other.q), self.which, self.sink, self.rot)

    def prefix(self, n: int) -> "OscarRun":
        sink = self.sink[:, :, :n].clone() if self.sink is not None else None
        return OscarRun(self.q.prefix(n), self.which, sink, self.rot)


STORED["oscar"] = OscarRun


@dataclass(frozen=True)
class Oscar(OnKIVI):
    """``bits``-bit KIVI codes of keys and values rotated and clipped as the model's calibration
    says (see the module docstring; ``clip``: one fraction for every head instead of the calibrated
    ones); the first ``sinks`` tokens exact; the newest ``residual`` in 16-bit, as KIVI's window."""

    bits: int = 2
    group: int = 64
    residual: int = 128
    sinks: int = 4
    value_bits: int | None = field(default=None, metadata={"spec": "if-set"})  # None: ``bits``
    clip: float | None = field(default=None, metadata={"spec": "if-set"})  # None: calibrated per layer and head

    needs_model = True  # the layer hands its calibration (``OscarLayer``) to quantize_keys / quantize_values

    def __post_init__(self) -> None:
        self._check_kivi("oscar")
        if self.value_bits is not None:
            try:
                KIVI(self.value_bits)
            except ValueError as e:
                raise ValueError(f"oscar: value_{str(e).removeprefix('kivi: ')}") from None
        if self.sinks < 0:
            raise ValueError(f"oscar: sinks must be >= 0, got {self.sinks}")
        if self.clip is not None and not 0.0 < self.clip <= 1.0:
            raise ValueError(f"oscar: clip is the fraction of each group's range kept, in (0, 1], got {self.clip}")

    def _clip(self, calibrated: torch.Tensor) -> "float | torch.Tensor":
        return calibrated if self.clip is None else self.clip

    @property
    def vbits(self) -> int:
        return self.value_bits if self.value_bits is not None else self.bits

    @staticmethod
    def model_parts(model: torch.nn.Module) -> list[OscarLayer]:
        return of_model(model)

    def _sink(self, x: torch.Tensor, first: bool) -> torch.Tensor | None:
        return Hadamard(self.bits, self.group, self.residual, self.sinks)._sink(x, None, first)[0]

    @staticmethod
    def _need(part: OscarLayer | None, starts) -> OscarLayer:
        if starts is not None:
            raise ValueError("oscar rotates each KV head by a matrix of its own: it cannot code a ragged layer's "
                             "heads back to back (evict with heads=uniform)")
        if part is None:
            raise ValueError("oscar needs the model's calibration: build the cache with "
                             "CompressedCache.for_model(model, policy)")
        return part

    def quantize_keys(self, k: torch.Tensor, first: bool = True, model_part: OscarLayer | None = None,
                      starts=None, **_) -> OscarRun:
        p = self._need(model_part, starts)
        if k.shape[-2] % self.group:
            raise ValueError(f"key quantization needs a multiple of group={self.group} tokens, got {k.shape[-2]}")
        x = _clipped(k.float() @ p.rot_k, self._clip(p.clip_k[self.bits]), "token", self.group)
        return OscarRun(quantize_keys(x, self.bits, self.group), "k", self._sink(k, first), p.rot_k)

    def quantize_values(self, v: torch.Tensor, first: bool = True, model_part: OscarLayer | None = None,
                        starts=None, **_) -> OscarRun:
        p = self._need(model_part, starts)
        g = self.value_group(v.shape[-1])
        x = _clipped(v.float() @ p.rot_v, self._clip(p.clip_v[self.vbits]), "channel", g)
        return OscarRun(quantize_values(x, self.vbits, g), "v", self._sink(v, first), p.rot_v)

    def token_bytes(self, d: int) -> float:
        return kivi_token_bytes((self.bits + self.vbits) / 2, d, self.group, self.value_group(d))

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 2 * heads * self.sinks * d * 2  # the sinks, keys and values, float16; not the calibration
