"""Loss-guided quantization (after GuidedQuant, Kim et al. 2025) with a non-uniform per-channel codebook (LNQ).

The layer-wise objective weights the error of each output channel by how much the model's end loss
cares about that channel: with ``x_t`` the layer's inputs on calibration text and ``g_t`` the gradient
of the loss with respect to its outputs,

    f(W^) = sum_j (w_j - w^_j)^T H_j (w_j - w^_j),    H_j = sum_t g_tj^2 x_t x_t^T.

As in GuidedQuant, the output channels are split into a few groups that share the average of their
``H_j`` (a per-channel Hessian for each row would not fit). The quantizer gives each output channel a
codebook of ``2**bits`` values. Starting from a weighted k-means codebook and GPTQ-style assignments
(error feedback within the row through ``H``), it alternates

* the codebook that minimises ``f`` for the current assignments (a small least-squares system per row), and
* a sweep of exact coordinate descent over the assignments (each weight moves to the codeword that
  minimises ``f`` with the others fixed),

and accepts a step only if ``f`` does not grow, so the objective never increases.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.hfcompat import output_cache, with_cache

DAMP = 0.01  # relative diagonal damping of H (as in GPTQ): keeps H well conditioned with little calibration text


# -- calibration ------------------------------------------------------------------------------------
@torch.no_grad()
def calibration_ids(model: nn.Module, num_seqs: int = 16, length: int = 256, seed: int = 0,
                    prompt_ids: list[int] | None = None) -> torch.Tensor:
    """Calibration text written by the model itself (sampled at temperature 1 from ``prompt_ids``,
    by default the BOS token): nothing to download, and the text is the model's own distribution."""
    cfg = model.config.get_text_config()
    start = prompt_ids or [cfg.bos_token_id if cfg.bos_token_id is not None else 0]
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([start] * num_seqs, device=dev)
    out = model(ids, use_cache=True)
    cache, seq = output_cache(out), [ids]
    logits = out.logits[:, -1]
    for _ in range(length - ids.shape[1]):
        probs = torch.softmax(logits.float(), -1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen).to(dev)
        seq.append(nxt)
        out = model(nxt, **with_cache(model, cache), use_cache=True)
        cache, logits = output_cache(out), out.logits[:, -1]
    return torch.cat(seq, 1)


def collect_hessians(model: nn.Module, ids: torch.Tensor, names: list[str], groups: int = 4, batch_size: int = 4,
                     progress=None) -> dict[str, torch.Tensor]:
    """For each named Linear, ``[groups, in, in]`` float32: the inputs' second moment weighted by the
    squared loss gradient of each group of output channels (averaged within the group), per token."""
    mods = dict(model.named_modules())
    hess: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hooks(name: str, mod: nn.Linear):
        g = groups if mod.out_features % groups == 0 else 1

        def fwd(_m, args, out):
            inputs[name] = args[0].detach().reshape(-1, mod.in_features).float()

            def on_grad(grad):
                x = inputs.pop(name)
                s = grad.detach().reshape(-1, g, mod.out_features // g).float().pow(2).mean(-1)  # [T, g]
                h = torch.einsum("tg,ti,tj->gij", s, x, x) if g > 1 else (x * s).T @ x
                h = h if g > 1 else h.unsqueeze(0)
                hess[name] = hess[name] + h if name in hess else h

            out.register_hook(on_grad)

        return fwd

    for name in names:
        handles.append(mods[name].register_forward_hook(make_hooks(name, mods[name])))
    was_training = model.training
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    count = 0
    try:
        for start in range(0, ids.shape[0], batch_size):
            x = ids[start : start + batch_size]
            emb = model.get_input_embeddings()(x).detach().requires_grad_(True)  # grads flow to activations only
            logits = model(inputs_embeds=emb, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="sum")
            loss.backward()
            count += x.numel()
            if progress is not None:
                progress.update(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
        model.train(was_training)
    return {n: h / count for n, h in hess.items()}


# -- the layer-wise quantizer -------------------------------------------------------------------------
def damp(h: torch.Tensor, rel: float = DAMP) -> torch.Tensor:
    d = torch.diagonal(h, dim1=-2, dim2=-1)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + rel * d.mean(-1)[:, None, None] * eye + 1e-8 * eye  # the tiny floor covers dead inputs


def objective(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """sum over rows of (w - wq) H (w - wq)^T, the rows split into ``h.shape[0]`` equal groups."""
    g = h.shape[0]
    e = (w - wq).float().reshape(g, -1, w.shape[1])
    return float(torch.einsum("gri,gij,grj->", e, h, e))


def _nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """values [..., R], codebook [..., R, K] -> index of the nearest codeword [..., R]."""
    return (values[..., None] - codebook).abs().argmin(-1)


def _kmeans_codebook(w: torch.Tensor, weight: torch.Tensor, k: int, iters: int = 12) -> torch.Tensor:
    """Weighted 1-D k-means per row (weights = the diagonal of H): [R, in] -> [R, k]."""
    qs = torch.linspace(0, 1, k + 2, device=w.device)[1:-1]
    cb = torch.quantile(w, qs, dim=1).T.contiguous()
    for _ in range(iters):
        a = _nearest(w, cb[:, None, :])
        num = torch.zeros_like(cb).scatter_add_(1, a, w * weight)
        den = torch.zeros_like(cb).scatter_add_(1, a, weight.expand_as(w))
        cb = torch.where(den > 0, num / den.clamp_min(1e-20), cb)
    return cb


def _gptq(w: torch.Tensor, h: torch.Tensor, round_column) -> None:
    """GPTQ's column-by-column rounding of ``w`` [R, in] under ``h`` [in, in]: ``round_column(i, w)``
    rounds column ``i`` of the weights as updated so far (recording its codes) and returns the rounded
    values; the column's error is pushed onto the columns not yet rounded through the Cholesky factor
    of H^-1."""
    w = w.float().clone()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i in range(w.shape[1]):
        err = (w[:, i] - round_column(i, w)) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]


def _gptq_assign(w: torch.Tensor, h: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """GPTQ assignments to each row's codebook ``cb`` [R, K]. w [R, in] of one group, h [in, in]."""
    codes = torch.empty(w.shape, dtype=torch.long, device=w.device)

    def to_codebook(i: int, wu: torch.Tensor) -> torch.Tensor:
        codes[:, i] = _nearest(wu[:, i], cb)
        return cb.gather(1, codes[:, i : i + 1])[:, 0]

    _gptq(w, h, to_codebook)
    return codes


def _best_codebook(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """argmin_c (w - c[codes]) H (w - c[codes])^T per row: (O^T H O) c = O^T H w with O the one-hot codes."""
    onehot = nn.functional.one_hot(codes, k).float()  # [R, in, k]
    ho = torch.einsum("ij,rjk->rik", h, onehot)
    a = torch.einsum("rik,ril->rkl", onehot, ho)
    b = torch.einsum("rik,ri->rk", ho, w)
    eye = torch.eye(k, device=w.device)
    return torch.linalg.solve(a + 1e-10 * a.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye + 1e-20 * eye, b)


def _cd_sweep(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """One pass of exact coordinate descent: weight i moves to the codeword minimising f with the rest fixed."""
    codes = codes.clone()
    e = cb.gather(1, codes) - w  # [R, in]
    r = e @ h  # r = e H, kept current as e changes
    diag = torch.diagonal(h)
    for i in range(w.shape[1]):
        # f as a function of e_i: H_ii e_i^2 + 2 e_i (r_i - H_ii e_i) + const, minimised at e_i*
        target = w[:, i] - (r[:, i] - diag[i] * e[:, i]) / diag[i]
        a = _nearest(target, cb)
        new_e = cb.gather(1, a[:, None])[:, 0] - w[:, i]
        delta = new_e - e[:, i]
        codes[:, i] = a
        e[:, i] = new_e
        r += delta[:, None] * h[i][None, :]
    return codes


def lnq(w: torch.Tensor, h: torch.Tensor, bits: int, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Non-uniform per-channel quantization of ``w`` [out, in] under the guided objective with (damped)
    ``h`` [groups, in, in]. Returns uint8 codes [out, in], the codebook [out, 2**bits] and the objective
    after the initialisation and after each accepted step (non-increasing)."""
    k = 1 << bits
    w = w.float()
    g = h.shape[0]
    if w.shape[0] % g:
        raise ValueError(f"{w.shape[0]} output channels do not split into {g} groups")
    rows = w.shape[0] // g
    codes, cbs = [], []
    for gi in range(g):
        wg, hg = w[gi * rows : (gi + 1) * rows], h[gi]
        cb = _kmeans_codebook(wg, torch.diagonal(hg)[None, :], k)
        codes.append(_gptq_assign(wg, hg, cb))
        cbs.append(cb)
    code, cb = torch.cat(codes), torch.cat(cbs)

    def f(c: torch.Tensor, book: torch.Tensor) -> float:
        return objective(w, book.gather(1, c), h)

    history = [f(code, cb)]
    for _ in range(iters):
        for step in ("codebook", "assign"):
            if step == "codebook":
                new_cb = torch.cat([_best_codebook(w[i * rows : (i + 1) * rows], h[i], code[i * rows : (i + 1) * rows], k)
                                    for i in range(g)])
                new_code = code
            else:
                new_cb = cb
                new_code = torch.cat([_cd_sweep(w[i * rows : (i + 1) * rows], h[i], code[i * rows : (i + 1) * rows],
                                                cb[i * rows : (i + 1) * rows]) for i in range(g)])
            val = f(new_code, new_cb)
            if val <= history[-1]:
                code, cb = new_code, new_cb
                history.append(val)
    return code.to(torch.uint8), cb, history


def gptq_uniform(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, meta_bits: int = 0):
    """The guided objective on a uniform grid (GuidedQuant applied to GPTQ): columns rounded in order,
    each column's error pushed onto the later columns through the Cholesky factor of H^-1; each group
    of ``group_size`` input channels gets its HQQ grid from the weights as updated when it is reached.
    Same storage as ``hqq``. With ``meta_bits``, each row's meta ranges come from the HQQ grids of the
    weights before any feedback, and every group's grid is snapped onto them before its columns are
    rounded, so the codes are chosen on the grid that is stored. Returns ``(UniformCodes, MetaCodes
    or None)``."""
    from memfit.weights.grid import MetaCodes, UniformCodes, hqq

    ranges = None
    if meta_bits:
        u = hqq(w, bits, group_size)
        ranges = MetaCodes.fit(u.scale, u.zero, meta_bits).ranges
    rows = w.shape[0] // h.shape[0]
    parts = []
    for i in range(h.shape[0]):
        sl = slice(i * rows, (i + 1) * rows)
        parts.append(_gptq_uniform_rows(w[sl], h[i], bits, group_size, None if ranges is None else (ranges[sl], meta_bits)))
    codes, scale, zero = (torch.cat(t) for t in zip(*parts))
    meta = MetaCodes.snap(ranges, scale, zero, meta_bits) if meta_bits else None
    return UniformCodes(codes, scale, zero, bits, group_size), meta


def _gptq_uniform_rows(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, meta=None):
    """:func:`gptq_uniform` for one group of rows sharing ``h``: codes, scale and zero. ``meta``:
    (row ranges, meta bits) to snap each group's grid onto."""
    from memfit.weights.grid import MetaCodes, hqq

    qmax = (1 << bits) - 1
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty(w.shape[0], w.shape[1] // group_size, device=w.device)
    zero = torch.empty_like(scale)

    def to_grid(i: int, wu: torch.Tensor) -> torch.Tensor:
        g = i // group_size
        if i % group_size == 0:  # a new group: its grid from the weights as updated so far
            u = hqq(wu[:, i : i + group_size], bits, group_size)
            if meta is None:
                scale[:, g], zero[:, g] = u.scale[:, 0].half().float(), u.zero[:, 0].half().float()  # as stored
            else:
                s, z = MetaCodes.snap(meta[0], u.scale, u.zero, meta[1]).grid()
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        q = torch.round(wu[:, i] / scale[:, g] + zero[:, g]).clamp_(0, qmax)
        codes[:, i] = q.to(torch.uint8)
        return (q - zero[:, g]) * scale[:, g]

    _gptq(w, h, to_grid)
    return codes, scale, zero
