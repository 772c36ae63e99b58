"""Would a calibrated rotation (OSCAR: the query covariance's eigenvectors U_Q, then Hadamard) beat
memfit's fixed Hadamard for 2-bit keys? The error that reaches attention is each query's logit error
``q . (k - k^)``; this measures its mean square over every (query, key) pair of a held-out text,
for 2-bit keys (clip 0.8) quantized per channel in groups of 64 tokens (memfit's KIVI-style keys)
and per token over the head (OSCAR's), under each rotation: identity, Hadamard, U_Q, U_Q H, the
keys' own eigenvectors U_K, U_K H, and the eigenvectors of C_K^1/2 C_Q C_K^1/2 (U_M, U_M H). The
covariances are per layer and KV head (the query heads of its group together), calibrated on the
shipped essay; post-RoPE queries and keys, as the cache holds them. Prints each rotation's error
relative to per-channel Hadamard; writes JSON.

    PYTHONPATH=src .venv/bin/python benchmarks/kv_rotation_probe.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as llama

import memfit
from memfit.eval.perplexity import SHIPPED_TEXT
from memfit.kv.rotate import clip_towards_mean, hadamard

GROUP, BITS, CLIP = 64, 2, 0.8


def _levels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` clipped towards the mean of each slice along ``dim`` and rounded to 2**BITS levels of it."""
    x = clip_towards_mean(x, CLIP, dim)
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    s = ((hi - lo) / (2**BITS - 1)).clamp_min(1e-8)
    return ((x - lo) / s).round() * s + lo


def per_channel(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    n -= n % GROUP
    return _levels(x[:n].reshape(n // GROUP, GROUP, d), 1).reshape(n, d)


def per_token(x: torch.Tensor) -> torch.Tensor:
    return _levels(x, 1)


def logit_mse(q: torch.Tensor, k: torch.Tensor, rot: torch.Tensor, quant) -> float:
    """Mean square of ``q . (k - k^)`` over all pairs; ``q`` [queries, D], ``k`` [N, D], keys rotated
    by ``rot``, quantized, rotated back."""
    kr = k @ rot
    kq = quant(kr)
    dk = (kq - kr[: kq.shape[0]]) @ rot.T
    return ((q @ dk.T) ** 2).mean().item()


def capture(lm, text: str, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's post-RoPE queries and keys ([heads, N, D], batch 0) on ``text``'s first ``tokens``."""
    out, orig = [], llama.apply_rotary_pos_emb

    def hook(q, k, *a, **kw):
        qe, ke = orig(q, k, *a, **kw)
        out.append((qe.detach()[0], ke.detach()[0]))
        return qe, ke

    llama.apply_rotary_pos_emb = hook
    try:
        with torch.no_grad():
            lm.model(lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens])
    finally:
        llama.apply_rotary_pos_emb = orig
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", type=Path, default=Path("docs/store.md"), help="held-out text (its first 12,000 "
                    "characters)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("results/kv_rotation_probe.json"))
    args = ap.parse_args()
    lm = memfit.load_model(args.model, dtype=torch.float32)
    cal = capture(lm, SHIPPED_TEXT.read_text(), args.tokens)
    test = capture(lm, args.text.read_text()[:12000], args.tokens)
    total: dict[str, float] = {}
    for (qc, kc), (qt, kt) in zip(cal, test):
        d, g = kc.shape[-1], qc.shape[0] // kc.shape[0]
        h_mat = hadamard(d)
        for h in range(kc.shape[0]):
            qs = qc[h * g : (h + 1) * g].reshape(-1, d)
            cq, ck = qs.T @ qs / qs.shape[0], kc[h].T @ kc[h] / kc.shape[1]
            eq, uq = torch.linalg.eigh(cq)
            ek, uk = torch.linalg.eigh(ck)
            ck_half = uk @ torch.diag(ek.clamp_min(1e-8).sqrt()) @ uk.T
            um = torch.linalg.eigh(ck_half @ cq @ ck_half)[1]
            rots = {"I": torch.eye(d), "H": h_mat, "U_Q": uq, "U_Q H": uq @ h_mat, "U_K": uk, "U_K H": uk @ h_mat,
                    "U_M": um, "U_M H": um @ h_mat}
            q_test = qt[h * g : (h + 1) * g].reshape(-1, d)
            for name, rot in rots.items():
                for scheme, quant in (("per channel", per_channel), ("per token", per_token)):
                    key = f"{scheme}, {name}"
                    total[key] = total.get(key, 0.0) + logit_mse(q_test, kt[h], rot, quant)
    base = total["per channel, H"]
    rel = {k: v / base for k, v in sorted(total.items(), key=lambda t: t[1])}
    for k, v in rel.items():
        print(f"{k:22s} {v:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "bits": BITS, "group": GROUP,
                                    "clip": CLIP, "relative_to_per_channel_hadamard": rel}, indent=1))


if __name__ == "__main__":
    main()
