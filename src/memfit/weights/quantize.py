"""``quantize_(model, WeightQuant(...))``: replace a model's Linear layers with packed QuantLinear layers."""

from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from memfit.weights import guided, qdec, scale, twin
from memfit.weights.anyprec import anyprec
from memfit.weights.grid import META_BITS, hqq, rtn, with_meta
from memfit.weights.linear import QuantLinear

log = logging.getLogger(__name__)

METHODS = ("rtn", "hqq", "guided", "anyprec", "twin")


@dataclass(frozen=True)
class WeightQuant:
    """How to quantize a model's Linear layers.

    ``method``: ``rtn`` (round to nearest, min..max grid per group), ``hqq`` (calibration-free: a
    searched clipping of each group's range, then HQQ's half-quadratic refinement of scale and zero),
    ``guided`` (loss-guided, needs calibration text: with ``grid="codebook"`` a non-uniform codebook
    per output channel, ``group_size`` unused; with ``grid="uniform"`` HQQ's group grids with
    GPTQ-style error feedback), ``anyprec`` (``bits`` planes, 8 by default, readable at any width
    down to ``seed_bits``) or ``twin`` (:mod:`memfit.weights.twin`: 8-bit low-rank factors fitted
    with the HQQ grid of the rest, alternately, weighted by the input channels' rms on calibration
    text; the factors take ``rank_bits`` bits a weight over the model, counted in the layers' bytes,
    each layer's rank chosen by the loss it saves with ``twin_ranks="greedy"``, then all factors
    tuned together by ``twin_tune`` steps of distillation from the unquantized model). ``skip``: glob
    patterns of module names kept as they are.
    ``meta_bits``: 0 stores each group's scale and zero in float16; 2..8 stores them in that many bits
    each (``grid.MetaCodes``), which pays for smaller groups: 4-bit g32 with ``meta_bits=8`` takes
    4.6 bits a weight on SmolLM2, against 4.5 for g64 with float16 scale and zero.
    ``qdec_channels`` > 0 (QDEC, :mod:`memfit.weights.qdec`): each layer also keeps its residual
    ``W - Q`` in host memory at ``qdec_bits`` (4, 8; 16 / 32: float16 / float32) and adds it, token by token, on
    that fraction of the input channels where the token's activation is largest.
    ``scale_search`` (AWQ, :mod:`memfit.weights.scale`): per-channel scales searched on calibration
    text and folded into the op before each layer (the model's function unchanged) before quantizing;
    Llama-style decoders only. On SmolLM2 it takes ``hqq:3:g32:m8`` from perplexity 75.7 to 42.9, but
    makes ``twin`` worse (32.1 -> 33.7), whose activation-weighted factors already protect those channels.
    """

    bits: int = 4
    group_size: int = 64
    method: str = "hqq"
    skip: tuple[str, ...] = ("lm_head",)
    seed_bits: int = 3  # anyprec: the smallest width, whose grid is searched for all widths at once
    calib_seqs: int = 16  # guided, twin: calibration sequences written by the model ...
    calib_len: int = 256  # ... of this many tokens
    guide_groups: int = 4  # guided: groups of output channels sharing a weighted Hessian
    iters: int = 3  # guided: codebook / assignment alternations
    grid: str = "codebook"  # guided: "codebook" (non-uniform, per output channel) or "uniform" (per group)
    meta_bits: int = 0  # uniform grids: bits of each group's scale and of its zero (0: float16)
    qdec_channels: float = 0.0  # QDEC: fraction of input channels corrected a token (0: off)
    qdec_bits: int = 8
    rank_bits: float = 0.4  # twin: bits a weight spent on the low-rank factors
    twin_iters: int = 4  # twin: low-rank / grid alternations
    twin_ranks: str = "greedy"  # twin: "greedy" (a rank per layer under the same bytes) or "uniform"
    twin_tune: int = 16  # twin: distillation steps (4 calibration sequences each) tuning all factors; 0: off
    scale_search: bool = False  # AWQ's per-channel scales, folded into the previous op before quantizing

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown weight quantization method {self.method!r}; use one of {METHODS}")
        lo = 1 if self.method != "anyprec" else self.seed_bits
        if not (2 <= self.bits <= 8 and lo <= self.bits):
            raise ValueError(f"bits must be in 2..8 (anyprec: >= seed_bits), got {self.bits}")
        if self.grid not in ("codebook", "uniform"):
            raise ValueError(f"grid must be 'codebook' or 'uniform', got {self.grid!r}")
        if self.uses_groups and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        if self.meta_bits and not (self.uses_groups and self.meta_bits in META_BITS):
            raise ValueError(f"meta_bits must be 0 (float16) or 2..8, and needs a uniform grid; got {self.meta_bits} "
                             f"with method={self.method!r}, grid={self.grid!r}")
        if self.qdec_channels:
            qdec.check(self.qdec_bits, self.qdec_channels)
        if self.method == "twin" and not (0 < self.rank_bits <= 8 and self.twin_iters >= 1):
            raise ValueError(f"twin: rank_bits must be in (0, 8] and twin_iters >= 1, got {self.rank_bits}, {self.twin_iters}")
        if self.twin_tune < 0:
            raise ValueError(f"twin_tune must be >= 0 (distillation steps; 0: off), got {self.twin_tune}")
        if self.twin_ranks not in ("greedy", "uniform"):
            raise ValueError(f"twin_ranks must be 'greedy' or 'uniform', got {self.twin_ranks!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def uses_groups(self) -> bool:
        return self.method != "guided" or self.grid == "uniform"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantReport:
    config: WeightQuant
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {bits, kind, group_size, nbytes, orig_nbytes}
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    tune_loss: tuple[float, float] | None = None  # twin_tune: the distillation loss at the first and last step
    scales: dict[str, float] = field(default_factory=dict)  # scale_search: "<layer>.<input>" -> the alpha chosen

    @property
    def nbytes(self) -> int:
        return sum(v["nbytes"] for v in self.layers.values())

    @property
    def orig_nbytes(self) -> int:
        return sum(v["orig_nbytes"] for v in self.layers.values())

    @property
    def host_nbytes(self) -> int:
        """QDEC's residuals, held in host memory (not in :attr:`nbytes`)."""
        return sum(v.get("qdec_nbytes", 0) for v in self.layers.values())


def _targets(model: nn.Module, config: WeightQuant) -> tuple[list[str], dict[str, str]]:
    names, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in config.skip):
            skipped[name] = "skip-list"
        elif config.uses_groups and mod.in_features % config.group_size:
            skipped[name] = f"in_features {mod.in_features} is not a multiple of group_size {config.group_size}"
        else:
            names.append(name)
    return names, skipped


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_(model: nn.Module, config: WeightQuant, *, calibration: torch.Tensor | None = None,
              progress: bool = True) -> QuantReport:
    """Quantize ``model``'s Linear layers in place (torchao-style). ``calibration`` (token ids
    [n, length]) is for ``guided``; without it the model writes its own. Layers whose shape the grid
    cannot take are kept and listed in the report's ``skipped``, with the reason."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized")
    names, skipped = _targets(model, config)
    mods = dict(model.named_modules())
    # checked before any layer is replaced: a grid fitted to NaN/inf is silently wrong, and the
    # caller's model must not be left half quantized
    bad = [n for n in names if not torch.isfinite(mods[n].weight).all()]
    if bad:
        raise ValueError(f"{len(bad)} layer(s) have NaN or infinite weights, e.g. {bad[0]}: refusing to quantize")
    report = QuantReport(config, skipped=skipped)
    odd = {n: why for n, why in skipped.items() if why != "skip-list"}
    if odd:
        log.warning("not quantizing %d layer(s) the grid cannot take, e.g. %s: %s", len(odd), *next(iter(odd.items())))
    if config.scale_search:  # first: every fit below sees the scaled weights and inputs
        scale.decoder_layers(model)  # a clear error before the calibration text is written
        calibration = _calibration(model, config, calibration)
        report.scales = scale.search_and_fold(model, calibration.to(next(model.parameters()).device), config,
                                              set(names), progress)
    hessians, rms = {}, {}
    if config.method == "guided":
        hessians = _guided_hessians(model, names, config, calibration, progress)
    elif config.method == "twin":
        calibration = _calibration(model, config, calibration)
        rms = twin.activation_rms(model, calibration.to(next(model.parameters()).device), names)
        ranks = {n: twin.rank_for(mods[n].out_features, mods[n].in_features, config.rank_bits) for n in names}
        bad = [n for n, r in ranks.items() if r == 0]
        if bad:
            lin = mods[bad[0]]
            raise ValueError(f"twin: {config.rank_bits} bits a weight do not buy rank 1 for {bad[0]} "
                             f"({lin.out_features}x{lin.in_features}); raise rank_bits")
        if config.twin_ranks == "greedy":
            ranks = _twin_ranks(model, names, config, calibration, rms, ranks, progress)
        if config.twin_tune:  # the target, from the model before any layer changes
            teacher = twin.teacher_logprobs(model, calibration)
    held = {}  # twin with tuning: QDEC's residuals wait for the tuned factors (the originals held till then)
    for name in tqdm(names, desc=f"quantizing ({config.method}, {config.bits}-bit)", disable=not progress, leave=False):
        lin: nn.Linear = mods[name]
        w = lin.weight.data.float()
        if config.method == "guided" and config.grid == "codebook":
            codes, cb, _ = guided.lnq(w, guided.damp(hessians.pop(name).to(w.device)), config.bits, config.iters)
            q = QuantLinear.from_codes(lin, codes, config.bits, codebook=cb.to(torch.float16))
        else:
            meta = None
            if config.method == "guided":
                uc, meta = guided.gptq_uniform(w, guided.damp(hessians.pop(name).to(w.device)), config.bits,
                                               config.group_size, config.meta_bits)
            elif config.method == "twin":
                uc, meta, factors = twin.fit(w, rms.pop(name).to(w.device), config.bits, config.group_size,
                                             ranks[name], config.meta_bits, config.twin_iters)
            else:
                if config.method == "anyprec":
                    uc = anyprec(w, config.group_size, config.bits, config.seed_bits)
                else:
                    uc = {"rtn": rtn, "hqq": hqq}[config.method](w, config.bits, config.group_size)
                if config.meta_bits:
                    uc, meta = with_meta(w, uc, config.meta_bits)
            q = QuantLinear.from_codes(lin, uc.codes, uc.bits, scale=uc.scale.half(), zero=uc.zero.half(),
                                       group_size=uc.group_size, meta=meta)
            if config.method == "twin":
                q.attach_lowrank(*factors)
        if config.qdec_channels and config.method == "twin" and config.twin_tune:
            held[name] = lin
        elif config.qdec_channels:
            q.attach_residual(w, qdec.channels_for(config.qdec_channels, q.in_features), config.qdec_bits)
        _set_module(model, name, q)
        report.layers[name] = _layer_report(q, lin)
    if config.method == "twin" and config.twin_tune:
        _twin_tune(model, names, config, calibration, teacher, held, report, progress)
    return report


def _layer_report(q: QuantLinear, lin: nn.Linear) -> dict:
    return {"bits": q.bits, "kind": q.kind, "group_size": q.group_size, "meta_bits": q.meta_bits,
            "nbytes": q.nbytes, **({"rank": q.rank} if q.rank else {}),
            "orig_nbytes": lin.weight.nbytes + (lin.bias.nbytes if lin.bias is not None else 0),
            **({"qdec_k": q.qdec_k, "qdec_bits": q.qdec_bits, "qdec_nbytes": q.qdec_nbytes} if q.qdec_k else {})}


def _twin_tune(model, names, config, ids, teacher, held, report, progress) -> None:
    """Twin's factors, all layers together, tuned by distillation (``twin.tune``), then stored in 8 bits
    again; QDEC's residuals are taken from them afterwards."""
    mods = dict(model.named_modules())
    with float32_tensors(model):  # gradients in float32
        layers = {n: twin.Tunable(mods[n]) for n in names}  # every twin layer has factors
        for n, t in layers.items():
            _set_module(model, n, t)
        try:
            losses = twin.tune(model, list(layers.values()), ids, teacher, config.twin_tune, progress=progress)
        finally:  # the layers go back (as they were, if tuning failed)
            for n, t in layers.items():
                _set_module(model, n, t.layer)
        for t in layers.values():
            t.store()
    report.tune_loss = (losses[0], losses[-1]) if losses else None
    for n, lin in held.items():
        q = mods[n]
        q.attach_residual(lin.weight.data.float(), qdec.channels_for(config.qdec_channels, q.in_features),
                          config.qdec_bits)
        report.layers[n] = _layer_report(q, lin)


@contextmanager
def float32_tensors(model: torch.nn.Module):
    """Run a block with ``model``'s floating-point parameters and buffers in float32, then give each
    back its own dtype (bf16/fp16 -> fp32 -> back is exact). Tensor by tensor: ``model.float()`` is
    refused by transformers for models loaded from quantized files, and ``model.to(dtype)`` would
    also cast buffers such as RoPE's float32 frequencies."""
    dtypes = {t: t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    for t in dtypes:
        t.data = t.data.float()
    try:
        yield model
    finally:
        for t, dt in dtypes.items():
            t.data = t.data.to(dt)


def _guided_hessians(model, names, config, calibration, progress) -> dict[str, torch.Tensor]:
    with float32_tensors(model):  # gradients in float32
        calibration = _calibration(model, config, calibration)
        bar = tqdm(total=calibration.shape[0], desc="guided: loss gradients", disable=not progress, leave=False)
        with bar:
            return guided.collect_hessians(model, calibration.to(next(model.parameters()).device), names,
                                           config.guide_groups, progress=bar)


def _calibration(model, config, calibration: torch.Tensor | None) -> torch.Tensor:
    """The caller's calibration ids, or text the model writes itself."""
    if calibration is not None:
        return calibration
    log.info("writing %d x %d calibration tokens with the model itself", config.calib_seqs, config.calib_len)
    return guided.calibration_ids(model, config.calib_seqs, config.calib_len)


def _twin_ranks(model, names, config, ids, rms, uniform, progress) -> dict[str, int]:
    """A rank per layer (twin), within the bits the ``uniform`` ranks take: the ranks
    ``twin.candidate_ranks`` tries, each scored by the loss's second-order growth
    (``twin.rank_losses``, from the loss gradients on the calibration text), then
    ``twin.allocate_ranks``."""
    mods = dict(model.named_modules())
    with float32_tensors(model):  # gradients in float32
        hessians = guided.collect_hessians(model, ids.to(next(model.parameters()).device), names, groups=1)
    options, budget = {}, 0
    for name in tqdm(names, desc="twin: ranks tried", disable=not progress, leave=False):
        lin = mods[name]
        w, h = lin.weight.data.float(), hessians.pop(name)[0].to(lin.weight.device)
        budget += twin.factor_bits(lin.out_features, lin.in_features, uniform[name])
        ranks = twin.candidate_ranks(lin.out_features, lin.in_features, uniform[name])
        losses = twin.rank_losses(w, rms[name].to(w.device), h, config.bits, config.group_size, ranks, config.meta_bits)
        options[name] = [(r, twin.factor_bits(lin.out_features, lin.in_features, r), loss)
                         for r, loss in zip(ranks, losses)]
    return twin.allocate_ranks(options, budget, fallback=uniform)


def set_read_bits(model: nn.Module, bits: int) -> None:
    """Serve an any-precision model at ``bits``: every QuantLinear reads its top ``bits`` planes."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers")
    for m in layers:
        m.set_read_bits(bits)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights on its device: quantized layers, other parameters (tied ones
    once), total; and QDEC's residuals in host memory (``host``, not in the total)."""
    q = sum(m.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    host = sum(m.qdec_nbytes for m in model.modules() if isinstance(m, QuantLinear))
    seen, other = set(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                other += p.nbytes
    return {"quantized": q, "other": other, "total": q + other, "host": host}
