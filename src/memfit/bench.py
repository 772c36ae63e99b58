"""Benchmark bodies behind ``memfit bench`` (the CLI writes their rows as JSON)."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from memfit.api import LM
from memfit.eval.demo import demo_document
from memfit.kv.policy import Policy


def context_ids(lm: LM, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """[1, num_tokens] ids of generated prose (the demo document, as long as needed)."""
    sentences = max(40, num_tokens // 10)
    ids = lm.tokenizer(lm.chat.context_text(demo_document(sentences, seed)[0]), add_special_tokens=False)["input_ids"]
    while len(ids) < num_tokens:
        sentences *= 2
        ids = lm.tokenizer(lm.chat.context_text(demo_document(sentences, seed)[0]), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:num_tokens]], device=lm.device)


@torch.no_grad()
def decode_speed(lm: LM, ctx, steps: int) -> float:
    """Greedy decode tokens/s over ``steps`` steps on a fork of ``ctx`` (one warm-up step untimed)."""
    cache = ctx.cache.fork(1)
    tok = torch.tensor([[lm.tokenizer.eos_token_id or 0]], device=lm.device)
    pos = ctx.num_tokens
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        logits = lm.model(tok, position_ids=torch.tensor([[pos]], device=lm.device), past_key_values=cache,
                          use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        pos += 1
    return steps / (time.perf_counter() - t0)


def bench_kv(lm: LM, lengths: list[int], policies: list[Policy], decode_tokens: int = 32) -> list[dict]:
    rows = []
    with tqdm(total=len(lengths) * len(policies), desc="bench kv", unit="run") as bar:
        for n in lengths:
            ids = context_ids(lm, n)
            for pol in policies:
                bar.set_postfix_str(f"{n} {pol.spec[:30]}")
                ctx = lm.prefill_ids(ids, pol)
                rows.append({
                    "policy": pol.spec, "tokens": n, "kv_bytes": ctx.nbytes, "full_kv_bytes": ctx.full_nbytes,
                    "bytes_per_token": ctx.nbytes / n, "ratio": ctx.nbytes / ctx.full_nbytes,
                    "prefill_s": ctx.prefill_seconds, "decode_tokens_per_s": decode_speed(lm, ctx, decode_tokens),
                })
                bar.update()
    return rows
