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
            # against re-reading the context plainly (16-bit, no scoring pass): what a store saves
            plain = next((r["prefill_ttft_s"] for r in rows if r["tokens"] == n and r["policy"] == "none"), None)
            for r in rows:
                if r["tokens"] == n:
                    r["speedup_vs_plain_prefill"] = plain / r["ttft_s"] if plain else None
                    tier.delete(entry.key)
                bar.update()
    return rows


# -- memfit serve --------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str, *args: str):
    import subprocess
    import sys

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memfit", "serve", "--model", model, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memfit serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("memfit serve did not start in 5 minutes")


def _timed_chat(url: str, body: dict) -> tuple[float, float, str]:
    """Stream one chat completion: (time to first content, total time, text)."""
    import json

    import httpx

    t0 = time.perf_counter()
    first, parts = None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - t0
                parts.append(delta)
    total = time.perf_counter() - t0
    return first if first is not None else total, total, "".join(parts)


def _summary(times: list[tuple[float, float, str]], wall: float) -> dict:
    ttft = sorted(t[0] for t in times)
    lat = sorted(t[1] for t in times)
    pct = lambda xs, q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    return {"requests": len(times), "requests_per_s": len(times) / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": pct(ttft, 0.95), "latency_p50_s": statistics.median(lat), "latency_p95_s": pct(lat, 0.95)}


def bench_serve(model: str, policy: str, tokens: int = 4096, questions: int = 8, chats: int = 40,
                clients: int = 4) -> dict:
    """Plain chats and questions on one stored context against a live server, and the same
    questions sent with the whole context each time to a server that re-reads it (no reuse)."""
    import concurrent.futures as cf

    import httpx

    from memfit.api import load_model

    lm = load_model(model)
    text = lm.tokenizer.decode(context_ids(lm, tokens)[0], skip_special_tokens=True)
    text = text[len(lm.chat.before_context):] if text.startswith(lm.chat.before_context) else text
    del lm
    qs = [f"{QUESTION} (answer {i + 1} of {questions})" for i in range(questions)]
    gen = {"max_tokens": 8, "temperature": 0}
    cases = {}
    proc, url = _start_server(model, "--policy", policy, "--max-queue", "64")
    try:
        _timed_chat(url, {"messages": [{"role": "user", "content": "warm up"}], **gen})
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            res = list(pool.map(lambda i: _timed_chat(url, {"messages": [{"role": "user", "content": f"Say hi {i}"}],
                                                             **gen}), range(chats)))
        cases["plain chat"] = _summary(res, time.perf_counter() - t0)
        t0 = time.perf_counter()
        made = httpx.post(url + "/v1/contexts", json={"text": text}, timeout=600).json()
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = [_timed_chat(url, {"messages": [{"role": "user", "content": q}], "context_id": made["id"], **gen})
               for q in tqdm(qs, desc="stored context", unit="q")]
        cases[f"stored {made['tokens']}-token context"] = _summary(res, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)
    proc, url = _start_server(model, "--policy", policy, "--no-reuse-prompts")
    try:
        _timed_chat(url, {"messages": [{"role": "user", "content": "warm up"}], **gen})
        t0 = time.perf_counter()
        res = [_timed_chat(url, {"messages": [{"role": "user", "content": text + "\n\n" + q}], **gen})
               for q in tqdm(qs, desc="context re-sent", unit="q")]
        cases["context re-sent each time"] = _summary(res, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)
    stored = cases[f"stored {made['tokens']}-token context"]
    return {"model": model, "policy": policy, "context": made, "upload_s": upload_s,
            "ttft_speedup": cases["context re-sent each time"]["ttft_p50_s"] / stored["ttft_p50_s"], "cases": cases}


# -- GPU: packed-KV decode attention and end-to-end decoding (run on the device) --------------------------
def _cuda_ms(fn, reps: int = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton's do_bench: warm-up, cache flush, events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))


def bench_attention(shapes: list[tuple[int, int]], q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    bits: tuple[int, ...] = (4, 2), window: int = 128) -> list[dict]:
    """One decode step of attention: bf16 SDPA over a 16-bit cache vs memfit's kernel over the
    packed KIVI cache of the same tokens (plus a ``window`` of 16-bit recent tokens)."""
    import torch.nn.functional as F

    from memfit.kernels.decode_attention import decode_attention, decode_attention_reference
    from memfit.kv.quant import quantize_keys, quantize_values

    dev = torch.device("cuda")
    rows = []
    for b, n in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(b, kv_heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, kv_heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(b, q_heads, 1, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        sdpa = _cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        row = {"batch": b, "tokens": n, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
               "sdpa_bf16_ms": sdpa, "kv_bf16_bytes": 2 * k.numel() * 2}
        for nb in bits:
            nq = n - window
            qk, qv = quantize_keys(k[:, :, :nq], nb, 64), quantize_values(v[:, :, :nq], nb, 64)
            kw, vw = k[:, :, nq:].contiguous(), v[:, :, nq:].contiguous()
            lens = (torch.full((b, kv_heads), nq, dtype=torch.int32, device=dev),
                    torch.full((b, kv_heads), window, dtype=torch.int32, device=dev))
            args = (q[:, :, 0], qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, kw, vw, *lens)
            ms = _cuda_ms(lambda: decode_attention(*args, bits=nb))  # noqa: B023
            err = (decode_attention(*args, bits=nb) - decode_attention_reference(*args, bits=nb)).abs().max().item()
            packed = qk.nbytes + qv.nbytes + 2 * kw.numel() * 2
            row[f"kivi{nb}_ms"] = ms
            row[f"kivi{nb}_speedup"] = sdpa / ms
            row[f"kivi{nb}_bytes"] = packed
            row[f"kivi{nb}_max_abs_err"] = err
            row[f"kivi{nb}_tb_per_s"] = packed / ms / 1e9
            del qk, qv, args
        rows.append(row)
        del k, v
        torch.cuda.empty_cache()
    return rows


def llama8b_config(layers: int = 32):
    """Llama-3.1-8B's shape (random weights are fine for speed)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "memfit"
    return cfg


@torch.no_grad()
def bench_decode(batch: int = 8, context: int = 32768, policies: tuple[str, ...] = ("none", "kivi(bits=4)"),
                 steps: int = 32, chunk: int = 2048, layers: int = 32) -> list[dict]:
    """Decode step time and peak GPU memory of a random-weight Llama-3.1-8B-shaped model after a
    ``batch`` x ``context`` prefill, with transformers' DynamicCache ("none") and CompressedCache."""
    from transformers import DynamicCache, LlamaForCausalLM

    import memfit.kv.attention  # noqa: F401  registers the memfit attention implementation
    from memfit.kv.cache import CompressedCache

    dev = torch.device("cuda")
    cfg = llama8b_config(layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=dev)
    rows = []
    for spec in policies:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = DynamicCache(config=cfg) if spec == "none" else CompressedCache.for_model(model, spec)
        t0 = time.perf_counter()
        for s in range(0, context, chunk):
            model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        prefill_peak = torch.cuda.max_memory_allocated()
        kv = (sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
              if spec == "none" else cache.nbytes)
        torch.cuda.reset_peak_memory_stats()
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
        for i in range(steps + 3):
            if i == 3:  # three warm-up steps (kernel compilation, allocator)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / steps * 1000
        rows.append({"policy": spec, "batch": batch, "context": context, "layers": layers, "weights_bytes": weights,
                     "kv_bytes": kv, "prefill_s": prefill_s, "decode_step_ms": step_ms,
                     "decode_peak_bytes": torch.cuda.max_memory_allocated(), "prefill_peak_bytes": prefill_peak})
        del cache
    base = rows[0]
    for r in rows:
        r["speedup"] = base["decode_step_ms"] / r["decode_step_ms"]
        r["peak_saving_bytes"] = base["decode_peak_bytes"] - r["decode_peak_bytes"]
        r["kv_saving_bytes"] = base["kv_bytes"] - r["kv_bytes"]
    return rows
