"""Benchmark bodies behind ``memfit bench`` (the CLI writes their rows as JSON)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memfit.api import LM
from memfit.eval.demo import demo_document
from memfit.kv.policy import Policy


def context_ids(lm: LM, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """[1, num_tokens] ids of generated prose (the demo document, as long as needed)."""
    sentences = max(40, num_tokens // 10)
    while (ids := lm.encode_context(demo_document(sentences, seed)[0])).shape[1] < num_tokens:
        sentences *= 2
    return ids[:, :num_tokens]


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


QUESTION = "What did the mayor do near the harbour?"


def _first_token(lm: LM, ctx) -> None:
    lm.ask(ctx, QUESTION, max_new_tokens=1)


def _drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's cached file pages, so a disk read is a real read."""
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_store(lm: LM, lengths: list[int], policies: list[Policy], store_dir: Path, redis_url: str | None,
                repeats: int = 3) -> list[dict]:
    """Time to first token: re-prefill vs restore from each tier (median of ``repeats``)."""
    from memfit.store import ContextStore
    from memfit.store.disk import DiskTier
    from memfit.store.memory import MemoryTier

    rows = []
    tiers = [("mem", lambda: MemoryTier()), ("file", lambda: DiskTier(store_dir / "tier"))]
    if redis_url:
        from memfit.store.redis_tier import RedisTier

        tiers.append(("redis", lambda: RedisTier(redis_url)))
    with tqdm(total=len(lengths) * len(policies), desc="bench store", unit="run") as bar:
        for n in lengths:
            ids = context_ids(lm, n)
            for pol in policies:
                bar.set_postfix_str(f"{n} {pol.spec[:30]}")
                t0 = time.perf_counter()
                ctx = lm.prefill_ids(ids, pol)
                _first_token(lm, ctx)
                prefill_ttft = time.perf_counter() - t0
                base = {"policy": pol.spec, "tokens": n, "kv_bytes": ctx.nbytes, "prefill_ttft_s": prefill_ttft}
                rows.append({**base, "tier": "prefill", "ttft_s": prefill_ttft, "speedup": 1.0, "stored_bytes": 0,
                             "overhead": 0.0})
                for name, make in tiers:
                    tier = make()
                    for key in tier.keys():
                        tier.delete(key)
                    store = ContextStore([tier])
                    entry, aliases = ctx.to_entry()
                    store.put_entry(entry, aliases)
                    stored = len(entry.to_bytes()) if name != "mem" else entry.nbytes
                    times = []
                    for _ in range(repeats):
                        if name == "file":
                            _drop_page_cache(store_dir / "tier")
                        t0 = time.perf_counter()
                        restored = lm.prefill_stored(ids, pol, store)
                        _first_token(lm, restored)
                        times.append(time.perf_counter() - t0)
                        assert restored.meta["store"] == "hit"
                    ttft = statistics.median(times)
                    rows.append({**base, "tier": name, "ttft_s": ttft, "speedup": prefill_ttft / ttft,
                                 "stored_bytes": stored, "overhead": stored / ctx.nbytes - 1})
                    tier.delete(entry.key)
                bar.update()
    return rows
