"""Low-rank + residual decomposition (after TwinQuant): ``W ~ L R + Q(W - L R)``.

``Q`` is the usual group-wise grid (HQQ, with ``meta_bits``) at ``bits``; ``L`` [out, r] and ``R``
[r, in] are 8-bit (symmetric per row, a float16 scale each) and take the bytes left in a budget of
``rank_bits`` bits a weight. Both parts are fitted to the error *after* quantization, alternately:

    LR <- the best rank-r fit of (W - Q(W - LR)) D,  then  LR <- LR D^-1

where ``D`` = diag(rms of each input channel on calibration text). Weighting by the activations
makes the factors spend their rank on the channels that carry the most signal (the error that
reaches the output is ``(W - W^) x``, and large-activation channels dominate it); the plain SVD of
the error spreads it over every channel alike. On SmolLM2 at 3 bits (g32, 8-bit scale and zero),
HQQ alone gives perplexity 75.7 against 26.5 unquantized; see ``docs/weights.md`` for the table.

The layer computes ``x Q^T + (x R^T) L^T``; its bytes count both parts.

Then (``tune``) the factors of all layers together are tuned by distillation, the grids kept: a few
Adam steps on calibration text that bring the quantized model's next-token distribution back to
the unquantized one's (KL divergence), which accounts for how the layers' errors compound and
interact, as the per-layer fit cannot; the factors are stored in 8 bits afterwards as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from memfit.weights import scale
from memfit.weights.grid import MetaCodes, UniformCodes, hqq, with_meta


def rank_for(out_features: int, in_features: int, rank_bits: float) -> int:
    """The largest rank whose 8-bit factors and float16 row scales fit ``rank_bits`` bits a weight."""
    budget = rank_bits * out_features * in_features
    r = int(budget // (8 * (out_features + in_features) + 16))
    while r > 0 and factor_bits(out_features, in_features, r) > budget:
        r -= 1
    return max(0, min(r, out_features, in_features))


RANK_STEPS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # ranks tried a layer, in multiples of its uniform rank


def factor_bits(out_features: int, in_features: int, rank: int) -> int:
    """Bits of rank-``rank`` 8-bit factors and their float16 row scales."""
    return 8 * rank * (out_features + in_features) + 16 * (out_features + rank)


def candidate_ranks(out_features: int, in_features: int, uniform: int) -> list[int]:
    """The ranks tried for a layer: RANK_STEPS times its ``uniform`` rank (``rank_for``), at least 1."""
    return sorted({min(max(1, round(f * uniform)), out_features, in_features) for f in RANK_STEPS})


def loss_proxy(err: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_j err_j^T H err_j``: the second-order growth of the loss from the weight error ``err``
    [out, in], ``H`` [in, in] the inputs' second moment weighted by the squared loss gradient of
    the outputs (GuidedQuant's objective with one group): comparable across layers."""
    return float(((err @ hessian) * err).sum())


def allocate_ranks(options: dict[str, list[tuple[int, int, float]]], budget: float,
                   fallback: dict[str, int] | None = None) -> dict[str, int]:
    """``options[name]``: (rank, bits, loss proxy) for each rank tried, by rank -> each layer's rank,
    with the summed loss as low as greedy upgrades (most loss saved per bit first) make it and the
    bits within ``budget``. Every layer starts at its smallest rank. ``fallback`` (ranks within the
    budget, e.g. the uniform ones) is returned instead when the greedy choice scores worse in total."""
    choice = {n: 0 for n in options}
    spent = sum(opts[0][1] for opts in options.values())
    while True:
        best, rate = None, 0.0
        for n, opts in options.items():
            i = choice[n]
            for j in range(i + 1, len(opts)):  # any larger rank: a curve need not be convex
                extra = opts[j][1] - opts[i][1]
                if extra > 0 and spent + extra <= budget and (opts[i][2] - opts[j][2]) / extra > rate:
                    best, rate = (n, j, extra), (opts[i][2] - opts[j][2]) / extra
        if best is None:
            break
        n, j, extra = best
        choice[n], spent = j, spent + extra
    ranks = {n: options[n][choice[n]][0] for n in options}
    if fallback is not None:
        score = {n: {r: loss for r, _, loss in opts} for n, opts in options.items()}
        if sum(score[n][fallback[n]] for n in options) < sum(score[n][ranks[n]] for n in options):
            return dict(fallback)
    return ranks


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes per row and the float16 scale of each row."""
    scale = (t.abs().amax(1) / 127).clamp_min(1e-8).half()
    return (t / scale.float()[:, None]).round().clamp_(-127, 127).to(torch.int8), scale


def dequant_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


def lowrank(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``L R`` [out, in], float32, from (L codes, L scales, R codes, R scales)."""
    return dequant_rows(*factors[:2]) @ dequant_rows(*factors[2:])


def fit(w: torch.Tensor, act_rms: torch.Tensor, bits: int, group_size: int, rank: int, meta_bits: int = 0,
        iters: int = 4) -> tuple[UniformCodes, MetaCodes | None, tuple[torch.Tensor, ...]]:
    """``w`` [out, in] -> (the residual's codes, its meta grid or None, (L codes, L scales, R codes,
    R scales)). ``act_rms`` [in]: each input channel's rms on calibration text."""
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"twin: rank must be in 1..{min(w.shape)} for a {tuple(w.shape)} weight, got {rank}")
    if act_rms.shape != (w.shape[1],):
        raise ValueError(f"twin: act_rms must be [{w.shape[1]}], got {tuple(act_rms.shape)}")
    w, d = w.float(), _channel_weights(act_rms)
    lr = torch.zeros_like(w)
    for _ in range(iters):
        uc = _grid(w - lr, bits, group_size, meta_bits)[0]  # with meta_bits, uc holds the grid as stored
        u, s, vh = torch.linalg.svd((w - uc.dequantize()) * d, full_matrices=False)
        factors = _factors(u, s, vh, d, rank)
        lr = lowrank(factors)
    uc, meta = _grid(w - lr, bits, group_size, meta_bits)
    return uc, meta, factors


def _channel_weights(act_rms: torch.Tensor) -> torch.Tensor:
    d = act_rms.float().clamp_min(1e-6)
    return d / d.mean()  # only the relative weights matter; keeps the factors' scales tame


def _grid(t: torch.Tensor, bits: int, group_size: int, meta_bits: int) -> tuple[UniformCodes, MetaCodes | None]:
    uc = hqq(t, bits, group_size)
    return with_meta(t, uc, meta_bits) if meta_bits else (uc, None)


def _factors(u, s, vh, d, rank: int) -> tuple[torch.Tensor, ...]:
    """8-bit L, R of the rank-``rank`` truncation of an SVD taken in the ``d``-weighted norm."""
    return (*int8_rows(u[:, :rank] * s[:rank].sqrt()), *int8_rows(s[:rank, None].sqrt() * vh[:rank] / d))


def rank_losses(w: torch.Tensor, act_rms: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                ranks: list[int], meta_bits: int = 0) -> list[float]:
    """``loss_proxy`` of each rank in ``ranks`` after ``fit``'s first step (the grid of ``w``, then
    the rank-r factors of its error, every rank from one SVD): a quarter of one fit's work for all
    ranks, to rank them; the later alternations refine every rank about alike."""
    w, d = w.float(), _channel_weights(act_rms)
    err = w - _grid(w, bits, group_size, meta_bits)[0].dequantize()
    u, s, vh = torch.linalg.svd(err * d, full_matrices=False)
    return [loss_proxy(err - lowrank(_factors(u, s, vh, d, r)), hessian) for r in ranks]


@torch.no_grad()
def activation_rms(model: nn.Module, ids: torch.Tensor, names: list[str], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Each named Linear's input rms per channel over the tokens of ``ids`` [n, length]."""
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def record(name, x):
        sums[name] = sums.get(name, 0) + (x * x).sum(0)

    scale.feed(model, ids, {n: mods[n] for n in names}, record, batch_size)
    return {n: (s / ids.numel()).sqrt().cpu() for n, s in sums.items()}


@torch.no_grad()
def teacher_logprobs(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The model's next-token log-probabilities on ``ids`` [n, length], bfloat16 on the CPU
    [n, length, vocab]: the target ``tune`` distils, taken before any layer is quantized."""
    return torch.cat([_logprobs(model, ids[b : b + batch_size]).bfloat16().cpu()
                      for b in range(0, ids.shape[0], batch_size)])


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [n, length, vocab], float32, on the model's device."""
    return F.log_softmax(model(ids.to(next(model.parameters()).device)).logits.float(), -1)


class Tunable(nn.Module):
    """A twin layer (``memfit.weights.linear.QuantLinear`` with factors) while ``tune`` runs: its grid
    frozen as a float32 weight, ``L`` and ``R`` float32 parameters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.register_buffer("grid", layer.dequantize(torch.float32, lowrank=False), persistent=False)
        lw, rw = layer._factors()
        self.l, self.r = nn.Parameter(lw.clone()), nn.Parameter(rw.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.grid.to(x.dtype), self.layer.bias) + F.linear(F.linear(x, self.r.to(x.dtype)),
                                                                             self.l.to(x.dtype))

    def store(self) -> nn.Module:
        """The layer with its tuned factors in 8 bits."""
        with torch.no_grad():
            self.layer.attach_lowrank(*int8_rows(self.l.float()), *int8_rows(self.r.float()))
        return self.layer


def tune(model: nn.Module, layers: list[Tunable], ids: torch.Tensor, teacher: torch.Tensor, steps: int,
         lr: float = 3e-3, batch_size: int = 4, progress: bool = True) -> list[float]:
    """``steps`` Adam steps on the factors of ``layers`` (already in ``model``, float32), each on
    ``batch_size`` sequences of ``ids`` in turn, minimising the KL divergence from ``teacher``
    (``teacher_logprobs``) to the model's next-token distribution. Each factor's step size is
    ``lr`` times its mean magnitude (factors differ in scale by orders of magnitude from layer to
    layer), annealed to 0 on a cosine. Returns the loss of each step."""
    if teacher.shape[:2] != ids.shape:
        raise ValueError(f"twin: teacher log-probs {tuple(teacher.shape)} do not match the ids {tuple(ids.shape)}")
    if steps < 1 or not layers:
        return []
    params = [p for t in layers for p in (t.l, t.r)]
    tuned = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in tuned]
    for p in frozen:  # no gradients for the rest of the model
        p.requires_grad_(False)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * p.detach().abs().mean().item()} for p in params])
    base = [g["lr"] for g in opt.param_groups]
    dev, was_training, losses = params[0].device, model.training, []
    model.eval()  # no dropout: the teacher's distribution came from the model in eval mode
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="twin: tuning the factors", disable=not progress, leave=False):
                b = step * batch_size % ids.shape[0]
                logp = _logprobs(model, ids[b : b + batch_size])
                target = teacher[b : b + batch_size].to(dev).float()
                loss = (target.exp() * (target - logp)).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for g, lr0 in zip(opt.param_groups, base):
                    g["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.step()
                losses.append(loss.item())
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    return losses
