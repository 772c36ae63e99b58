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
from memfit.hfcompat import with_cache
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
        logits = lm.model(tok, position_ids=torch.tensor([[pos]], device=lm.device), **with_cache(lm.model, cache),
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


def bench_kvzip(lm: LM, lengths: list[int], policy: Policy, repeats: int = 3) -> list[dict]:
    """KVzip's scoring (the repeat pass and its max attention) against a plain prefill of the same
    context: after a warm-up run, the median of ``repeats`` timed runs of each per length (a
    shared 2-core machine varies by 20% from run to run)."""
    chunk = policy.kvzip_chunk
    lm.prefill_ids(context_ids(lm, 256), policy)  # warm-up: first calls allocate and pick kernels
    rows = []
    with tqdm(total=len(lengths) * repeats, desc="bench kvzip", unit="run") as bar:
        for n in lengths:
            ids = context_ids(lm, n)
            prefill, score = [], []
            for _ in range(repeats):
                prefill.append(lm.prefill_ids(ids, "none").prefill_seconds)
                ctx = lm.prefill_ids(ids, policy)
                score.append(ctx.meta["score_seconds"])
                bar.update()
            p, sc = statistics.median(prefill), statistics.median(score)
            rows.append({"policy": policy.spec, "tokens": n, "repeat_passes": -(-n // chunk), "runs": repeats,
                         "prefill_s": p, "score_s": sc, "score_vs_prefill": sc / p,
                         "prefill_runs_s": prefill, "score_runs_s": score, "kv_bytes": ctx.nbytes})
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
                    tier.delete(entry.key)  # leave no benchmark entry behind (the Redis tier is a real server)
                bar.update()
            # against re-reading the context plainly (16-bit, no scoring pass): what a store saves
            plain = next((r["prefill_ttft_s"] for r in rows if r["tokens"] == n and r["policy"] == "none"), None)
            for r in rows:
                if r["tokens"] == n:
                    r["speedup_vs_plain_prefill"] = plain / r["ttft_s"] if plain else None
    return rows


# -- memfit serve --------------------------------------------------------------------------------------
def _start_server(model: str, *args: str):
    import subprocess
    import sys

    import httpx

    from memfit.serve.chaos import free_port

    port = free_port()
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
# HBM bandwidth at the data sheet's peak, bytes/s: the roofline a memory-bound step is measured against
HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def kernel_times(prof) -> list[tuple[str, int, float]]:
    """(kernel name, launches, device microseconds) summed over a ``torch.profiler`` run's CUDA
    kernels, longest first (the benchmarks' step profiles)."""
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name[:90], [0, 0.0])
            r[0] += 1
            r[1] += e.device_time
    return sorted(((n, c, t) for n, (c, t) in rows.items()), key=lambda r: -r[2])


def hbm_peak(device: "torch.device | int | None" = None) -> float | None:
    """The GPU's HBM peak in bytes/s, from its name (None for a GPU not in ``HBM_PEAK``);
    ``MEMFIT_HBM_PEAK`` (bytes/s) overrides it."""
    if os.environ.get("MEMFIT_HBM_PEAK"):
        return float(os.environ["MEMFIT_HBM_PEAK"])
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_PEAK.items() if key in name), None)


def _ragged_lengths(b: int, h: int, n: int, group: int, seed: int = 0) -> torch.Tensor:
    """[B, H] token counts that differ per row and head (as KVzip keeps them: some heads several
    times others) in whole key groups, summing to about b * h * n."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, h, generator=g) * 1.5 + 0.25
    lens = (w / w.mean() * n / group).round().clamp_min(1).long() * group
    return lens


def _ragged_run(lens: torch.Tensor, d: int, bits: int, window: int, device: torch.device):
    """A flat ragged run (what KVzip storage decodes from) of random KV: per row and head ``lens``
    quantized tokens and a 16-bit ``window``; returns it and its bytes."""
    from memfit.kernels.decode_attention import PackedRun
    from memfit.kv.quant import quantize_keys, quantize_values

    b, h = lens.shape
    g = torch.Generator(device=device).manual_seed(1)
    total = int(lens.sum())
    k, v = (torch.randn(1, 1, total, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    qk, qv = quantize_keys(k, bits, 64), quantize_values(v, bits, 64)
    del k, v
    kw, vw = (torch.randn(1, 1, b * h * window, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    nq = lens.to(device)
    wl = torch.full((b, h), window, device=device)
    starts = lambda x: (x.flatten().cumsum(0) - x.flatten()).reshape(b, h)  # noqa: E731
    run = PackedRun(qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, kw, vw, nq.int(), wl.int(), bits, 64,
                    qoff=starts(nq), woff=starts(wl), nq=int(lens.max()), nw=window, total_q=total)
    return run, qk.nbytes + qv.nbytes + 2 * kw.numel() * 2


def _cuda_ms(fn, reps: int = 100, graph: bool = False) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton's do_bench: warm-up, cache flush, events).
    ``graph``: replay it as a CUDA graph, so the host's launch overhead is not counted (what a
    server's decode step sees when it captures one)."""
    import triton.testing

    torch.cuda.synchronize()  # both time fn on their own stream: its inputs must be finished first
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))


@torch.no_grad()
def policy_cache(spec: str, batch: int, kv_heads: int, q_heads: int, tokens: int, head_dim: int,
                 device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.bfloat16, layers: int = 1,
                 seed: int = 0):
    """A CompressedCache of ``layers`` layers holding random KV for ``batch`` x ``tokens``, compressed
    under ``spec`` as a prefill would: what a real cache of that policy stores (layout, bytes),
    without a model. Random observations stand in for what a model shows: heavy-tailed scores for
    KVzip's repeat pass and H2O's sums, random window queries for SnapKV. Evicting policies compress
    each row alone and stack the rows (ragged rows and heads), as ``bench decode`` does."""
    from memfit.kv.cache import CompressedCache
    from memfit.kv.evict import Observation
    from memfit.kv.policy import parse_policy
    from memfit.kv.rope import RoPE

    pol = parse_policy(spec)
    g = torch.Generator(device=device).manual_seed(seed)
    per_row = bool(pol.evictions)
    # pre-RoPE keys need a RoPE to put back: Llama-3.1's base (500000) over head_dim
    rope = RoPE.default(head_dim, 500000.0) if getattr(pol.quant, "pre_rope", False) else None
    parts = []
    for _ in range(batch if per_row else 1):
        rb = 1 if per_row else batch
        cache = CompressedCache(pol, layers, defer=True, rope=rope, dtype=dtype)
        obs = {}
        for i, layer in enumerate(cache.layers):
            k, v = (torch.randn(rb, kv_heads, tokens, head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
            layer.update(k, v)
            scores = lambda: torch.rand(rb, kv_heads, tokens, device=device, generator=g) ** 8  # noqa: E731
            obs[i] = Observation(torch.randn(rb, q_heads, 32, head_dim, device=device, dtype=dtype, generator=g),
                                 scores(), scores())
        cache.compress(obs)
        parts.append(cache)
    return CompressedCache.stack(parts) if per_row else parts[0]


def bench_attention(shapes: list[tuple[int, int]], q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    bits: tuple[int, ...] = (4, 2), window: int = 128, policies: tuple[str, ...] = ()) -> list[dict]:
    """One decode step of attention: bf16 SDPA over a 16-bit cache vs memfit's kernel over the
    packed KIVI cache of the same tokens (plus a ``window`` of 16-bit recent tokens), and over
    ragged storage (KVzip's: every row and head its own length, read from offsets) of about the
    same bytes. Both are timed as CUDA graphs: kernel time without the host's launch overhead,
    which on a slow host exceeds a 0.1 ms kernel (the eager launch cost is measured end to end by
    ``bench_decode``). ``*_hbm_fraction``: bytes read / time / HBM peak (the roofline).
    ``policies``: also one step over a layer stored under each policy spec (see :func:`policy_cache`),
    as ``rows[i]["policies"][spec]``."""
    import torch.nn.functional as F

    from memfit.kernels.decode_attention import (
        decode_attention,
        decode_attention_reference,
        decode_attention_runs,
        decode_attention_runs_reference,
    )
    from memfit.kv.quant import quantize_keys, quantize_values

    dev = torch.device("cuda")
    peak = hbm_peak(dev)

    def one(b: int, n: int) -> dict:  # a function: its tensors are freed when it returns
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(b, kv_heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, kv_heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(b, q_heads, 1, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        sdpa = _cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True)
        row = {"batch": b, "tokens": n, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
               "sdpa_bf16_ms": sdpa, "kv_bf16_bytes": 2 * k.numel() * 2, "hbm_peak_bytes_per_s": peak}
        if peak:
            row["sdpa_bf16_hbm_fraction"] = row["kv_bf16_bytes"] / (sdpa * 1e-3) / peak
        for nb in bits:
            nq = n - window
            qk, qv = quantize_keys(k[:, :, :nq], nb, 64), quantize_values(v[:, :, :nq], nb, 64)
            kw, vw = k[:, :, nq:].contiguous(), v[:, :, nq:].contiguous()
            lens = (torch.full((b, kv_heads), nq, dtype=torch.int32, device=dev),
                    torch.full((b, kv_heads), window, dtype=torch.int32, device=dev))
            args = (q[:, :, 0], qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, kw, vw, *lens)
            ms = _cuda_ms(lambda: decode_attention(*args, bits=nb), graph=True)  # noqa: B023
            err = (decode_attention(*args, bits=nb) - decode_attention_reference(*args, bits=nb)).abs().max().item()
            packed = qk.nbytes + qv.nbytes + 2 * kw.numel() * 2
            # the Triton kernel beside the default (the Gluon one where it takes the shape)
            row[f"kivi{nb}_triton_ms"] = _cuda_ms(lambda: decode_attention(*args, bits=nb, impl="triton"),  # noqa: B023
                                                  graph=True)
            row[f"kivi{nb}_ms"] = ms
            row[f"kivi{nb}_speedup"] = sdpa / ms
            row[f"kivi{nb}_bytes"] = packed
            row[f"kivi{nb}_max_abs_err"] = err
            row[f"kivi{nb}_tb_per_s"] = packed / ms / 1e9
            # ragged storage of about the same tokens, lengths per row and head from 1/4 to 7/4 of n
            run, rbytes = _ragged_run(_ragged_lengths(b, kv_heads, nq, 64), head_dim, nb, window, dev)
            qq = q[:, :, 0]
            rms = _cuda_ms(lambda: decode_attention_runs(qq, [run]), graph=True)  # noqa: B023
            row[f"ragged{nb}_ms"], row[f"ragged{nb}_bytes"] = rms, rbytes
            row[f"ragged{nb}_vs_plain_per_byte"] = (rms / rbytes) / (ms / packed)
            row[f"ragged{nb}_max_abs_err"] = (decode_attention_runs(qq, [run])
                                              - decode_attention_runs_reference(qq, [run])).abs().max().item()
            if peak:
                row[f"kivi{nb}_hbm_fraction"] = packed / (ms * 1e-3) / peak
                row[f"ragged{nb}_hbm_fraction"] = rbytes / (rms * 1e-3) / peak
        row["policies"] = {}
        for spec in policies:
            layer = policy_cache(spec, b, kv_heads, q_heads, n, head_dim, dev).layers[0]
            why = layer.not_packed()
            if why:
                row["policies"][spec] = {"error": f"the kernel does not read it: {why}"}
                continue
            runs, qq = layer.runs(b), q[:, :, 0]
            pms = _cuda_ms(lambda: decode_attention_runs(qq, runs), graph=True)  # noqa: B023
            err = (decode_attention_runs(qq, runs) - decode_attention_runs_reference(qq, runs)).abs().max().item()
            row["policies"][spec] = {"ms": pms, "bytes": layer.nbytes, "speedup": sdpa / pms, "max_abs_err": err,
                                     "ratio": row["kv_bf16_bytes"] / layer.nbytes,
                                     **({"hbm_fraction": layer.nbytes / (pms * 1e-3) / peak} if peak else {})}
        # quantize-and-pack of this whole cache (what prefill's end does per layer), kernel vs torch,
        # beside the causal SDPA of the same tokens (a lower bound of one layer's prefill)
        kq, vq = k[:, :, : n - window], v[:, :, : n - window]
        row["pack4_ms"] = _cuda_ms(lambda: (quantize_keys(kq, 4, 64), quantize_values(vq, 4, 64)), reps=20)  # noqa: B023
        row["pack4_torch_ms"] = _cuda_ms(lambda: (quantize_keys(kq, 4, 64, use_kernels=False),  # noqa: B023
                                                  quantize_values(vq, 4, 64, use_kernels=False)), reps=20)
        if b * n <= 131072:
            qs = torch.randn(b, q_heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
            row["prefill_attention_ms"] = _cuda_ms(
                lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True), reps=20)  # noqa: B023
        return row

    rows = []
    for b, n in shapes:
        rows.append(one(b, n))
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


def _random_llama8b(layers: int, attn: str | None = None):
    """A random-weight Llama-3.1-8B-shaped model on the GPU, built in bf16 (no fp32 copy)."""
    from transformers import LlamaForCausalLM

    cfg = llama8b_config(layers)
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def bench_kvzip_8b(lengths: list[int], layers: int = 32, chunk: int = 2048, prefill_chunk: int = 4096,
                   unfused: bool = True) -> list[dict]:
    """KVzip's scoring against the prefill of the same context on a random-weight Llama-3.1-8B-shaped
    model on the GPU (what ``LM.prefill_many_ids`` runs, without a tokenizer: random ids, a 12-token
    repeat prompt). ``unfused``: also time the pass with SDPA and blocked probabilities (the path
    before the fused kernels)."""
    import memfit.kv.attention as attention
    from memfit.kv.cache import CompressedCache
    from memfit.kv.evict.kvzip import reconstruction_scores, repeat_inputs

    model = _random_llama8b(layers)
    vocab = model.config.vocab_size

    def prefill(ids: torch.Tensor) -> CompressedCache:
        cache = CompressedCache("none", layers, defer=True)
        for s in range(0, ids.shape[1], prefill_chunk):
            model(ids[:, s : s + prefill_chunk], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        return cache

    def timed(fn) -> tuple[float, object]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    prompt = torch.randint(0, vocab, (12,)).tolist()
    rows = []
    for i, n in enumerate([2 * prefill_chunk, *lengths]):  # the first, untimed: kernels compile, libraries pick algorithms
        ids = torch.randint(0, vocab, (1, n), device="cuda")
        inputs = repeat_inputs(prompt, ids[0].tolist(), chunk)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        prefill_s, cache = timed(lambda: prefill(ids))  # noqa: B023
        score_s, scores = timed(lambda: reconstruction_scores(model, cache, inputs))  # noqa: B023
        row = {"tokens": n, "layers": layers, "repeat_passes": len(inputs), "prefill_s": prefill_s,
               "score_s": score_s, "score_vs_prefill": score_s / prefill_s,
               "peak_bytes": torch.cuda.max_memory_allocated()}
        if unfused:
            fused = attention.attention_with_lse
            attention.attention_with_lse = lambda *a: None
            try:
                row["score_unfused_s"], plain = timed(lambda: reconstruction_scores(model, cache, inputs))  # noqa: B023
            finally:
                attention.attention_with_lse = fused
            # what eviction reads from the scores: the pairs KVzip(keep=0.42, heads=global) would keep
            a, b = (torch.cat([x[i].flatten() for i in sorted(x)]) for x in (scores, plain))
            k = int(0.42 * a.numel())
            kept = torch.zeros_like(a, dtype=torch.bool).index_fill_(0, a.topk(k).indices, True)
            row["kept_overlap_vs_unfused"] = float(kept[b.topk(k).indices].float().mean())
        if i > 0:
            rows.append(row)
        del cache
    return rows


def _steps_ms(step, tok: torch.Tensor, steps: int, warmup: int = 3) -> tuple[float, torch.Tensor]:
    """Mean wall time in ms of ``steps`` greedy decode steps ``tok = step(tok)`` after ``warmup``
    untimed ones (kernel compilation, allocator, graph capture); returns it and the last token."""
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        tok = step(tok)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1000, tok


@torch.no_grad()
def _evicted_batch(model, ids: torch.Tensor, spec: str, chunk: int):
    """A CompressedCache of ``ids`` [B, N] under an evicting policy, built as a server would: each
    row prefilled alone, scored (KVzip's repeat pass, SnapKV's window) and compressed as
    ``LM.prefill`` does, then the rows stacked for decoding together (ragged rows and heads)."""
    from memfit.kv.attention import observe
    from memfit.kv.cache import CompressedCache
    from memfit.kv.evict import Observation
    from memfit.kv.evict.kvzip import reconstruction_scores, repeat_inputs
    from memfit.kv.policy import parse_policy

    pol = parse_policy(spec)
    layers = model.config.num_hidden_layers
    needs = pol.observes()
    prompt = torch.randint(0, model.config.vocab_size, (12,)).tolist()  # a repeat prompt's length
    rows = []
    for r in tqdm(range(ids.shape[0]), desc=f"prefill {spec[:40]}", unit="row"):
        base = CompressedCache("none", layers, defer=True)
        with observe(pol.queries_needed(), "sum" if "attention_sum" in needs else None, probe=pol.probe()) as rec:
            for s in range(0, ids.shape[1], chunk):
                model(ids[r : r + 1, s : s + chunk], **with_cache(model, base), use_cache=True, logits_to_keep=1)
        obs = rec.observations(layers) if rec is not None else {i: Observation() for i in range(layers)}
        if "reconstruction" in needs:
            for i, a in reconstruction_scores(model, base, repeat_inputs(prompt, ids[r].tolist(), pol.kvzip_chunk)).items():
                obs[i].reconstruction = a
        rows.append(base.derive(pol, obs))
        del base, obs
    return CompressedCache.stack(rows).use_kernels()


@torch.no_grad()
def bench_decode(batch: int = 8, context: int = 32768, policies: tuple[str, ...] = ("none", "kivi(bits=4)"),
                 steps: int = 32, chunk: int = 2048, layers: int = 32, graph: bool = True,
                 compile: bool = False, fuse: bool = True) -> list[dict]:
    """Decode step time and peak GPU memory of a random-weight Llama-3.1-8B-shaped model after a
    ``batch`` x ``context`` prefill, with transformers' DynamicCache ("none") and CompressedCache
    under any policy (evicting ones prefill, score and compress each row alone, then decode the
    rows together: see :func:`_evicted_batch`);
    ``graph``: each cache is also timed in static form, each step a replayed CUDA graph
    (``graph_step_ms``: no per-step host work, which on a slow host sets the eager step time):
    "none" as transformers' 16-bit StaticCache, a compressed cache through ``to_static``;
    ``compile``: each is also timed torch.compile'd, then captured (``compiled_step_ms``: inductor
    fuses the small kernels between the matmuls, on both sides); ``fuse``: the model's q/k/v and
    gate/up projections stacked (``fuse_projections``), on every side.
    ``roofline_ms``: weights and KV bytes read once at the GPU's HBM peak (a step's lower bound)."""
    from transformers import DynamicCache

    import memfit.kv.attention  # noqa: F401  registers the memfit attention implementation
    from memfit.kv.cache import CompressedCache
    from memfit.kv.policy import parse_policy
    from memfit.kv.static import GraphDecoder

    dev = torch.device("cuda")
    peak = hbm_peak(dev)
    model = _random_llama8b(layers)
    if fuse:
        from memfit.weights.fuse import fuse_projections

        fuse_projections(model)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=dev)
    rows = []
    for spec in policies:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        evicts = spec != "none" and bool(parse_policy(spec).evictions)
        cache = DynamicCache(config=cfg) if spec == "none" else CompressedCache.for_model(model, spec)
        t0 = time.perf_counter()
        if evicts:
            cache = _evicted_batch(model, ids, spec, chunk)
        else:
            for s in range(0, context, chunk):
                model(ids[:, s : s + chunk], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        prefill_peak = torch.cuda.max_memory_allocated()
        kv = (sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
              if spec == "none" else cache.nbytes)
        torch.cuda.reset_peak_memory_stats()
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
        step_ms, tok = _steps_ms(lambda t, c=cache: model(t, **with_cache(model, c), use_cache=True).logits[:, -1:].argmax(-1),
                                 tok, steps)
        row = {"policy": spec, "batch": batch, "context": context, "layers": layers, "fused": fuse,
               "weights_bytes": weights,
               "kv_bytes": kv, "prefill_s": prefill_s, "decode_step_ms": step_ms,
               "decode_peak_bytes": torch.cuda.max_memory_allocated(), "prefill_peak_bytes": prefill_peak}
        if peak:
            row["roofline_ms"] = (weights + kv) / peak * 1e3
        if graph and spec == "none":  # transformers' own static form: a StaticCache, each step a replayed graph
            cache = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["graph_step_ms"] = _decode_step_ms(model, batch, context, reps=steps, chunk=chunk, full=True)[0]
            row["graph_peak_bytes"] = torch.cuda.max_memory_allocated()
            if compile:
                row["compiled_step_ms"], row["compiled_mode"] = _decode_step_ms(
                    model, batch, context, reps=steps, chunk=chunk, full=True, compile=True)
        elif graph:  # the same cache in fixed buffers, each step one replayed CUDA graph
            static = cache.to_static(max_new_tokens=2 * steps + 8)
            dec = GraphDecoder(model, static)
            # the warm-up steps: an eager step (compiles), the capture, one replay
            row["graph_step_ms"], tok = _steps_ms(lambda t, d=dec: d.step(t).argmax(-1, keepdim=True), tok, steps)
            row["graph_peak_bytes"] = torch.cuda.max_memory_allocated()
            del dec
            if compile:  # the same static cache, decoding on: the steps torch.compile'd, then captured
                dec = GraphDecoder(model, static, compile=True)
                row["compiled_step_ms"], tok = _steps_ms(lambda t, d=dec: d.step(t).argmax(-1, keepdim=True), tok,
                                                         steps)
                row["compiled_mode"] = "torch.compile + cuda-graph"
                del dec
            del static
        rows.append(row)
        del cache
    base = rows[0]
    for r in rows:
        r["speedup"] = base["decode_step_ms"] / r["decode_step_ms"]
        if "graph_step_ms" in r:
            r["graph_speedup"] = base["decode_step_ms"] / r["graph_step_ms"]
            if "graph_step_ms" in base:  # graph against graph: no host overhead on either side
                r["graph_speedup_vs_static"] = base["graph_step_ms"] / r["graph_step_ms"]
        if "compiled_step_ms" in r and "compiled_step_ms" in base:
            r["compiled_speedup_vs_static"] = base["graph_step_ms"] / r["compiled_step_ms"]
            r["compiled_speedup_vs_compiled"] = base["compiled_step_ms"] / r["compiled_step_ms"]
        r["peak_saving_bytes"] = base["decode_peak_bytes"] - r["decode_peak_bytes"]
        if "roofline_ms" in r:
            r["step_vs_roofline"] = r.get("graph_step_ms", r["decode_step_ms"]) / r["roofline_ms"]
            if "compiled_step_ms" in r:
                r["compiled_vs_roofline"] = r["compiled_step_ms"] / r["roofline_ms"]
        r["kv_saving_bytes"] = base["kv_bytes"] - r["kv_bytes"]
    return rows


def parse_weight_config(spec: str):
    """``"hqq:4"``, ``"rtn:3:g128"``, ``"hqq:4:g32:m8"`` (scale and zero in 8 bits), ``"guided:3"``,
    ``"guided:4:uniform"``, ``"anyprec:8"``, ``"hqq:3:q2"`` (QDEC on 2% of the input channels, its
    residual at 8 bits; ``:q2:r4`` at 4), ``"twin:3:g32:m8:l0.4"`` (low-rank factors on 0.4 bits a
    weight, a rank per layer; ``:even`` the same rank fraction everywhere; ``:t0`` without the
    distillation steps that tune the factors, 16 by default), ``:awq`` (per-channel scales searched and
    folded before quantizing) -> WeightQuant."""
    from memfit.weights import WeightQuant

    parts = spec.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"bad weight config {spec!r}: use METHOD:BITS[:gGROUP][:mMETA], e.g. hqq:4 or rtn:3:g128")
    kw = {"method": parts[0], "bits": int(parts[1])}
    for extra in parts[2:]:
        if extra in ("uniform", "codebook"):
            kw["grid"] = extra
        elif extra == "even":
            kw["twin_ranks"] = "uniform"
        elif extra == "awq":
            kw["scale_search"] = True
        elif extra[:1] in ("g", "m", "r", "t") and extra[1:].isdigit():
            kw[{"g": "group_size", "m": "meta_bits", "r": "qdec_bits", "t": "twin_tune"}[extra[0]]] = int(extra[1:])
        elif extra[:1] == "q" and extra[1:].replace(".", "", 1).isdigit():
            kw["qdec_channels"] = float(extra[1:]) / 100
        elif extra[:1] == "l" and extra[1:].replace(".", "", 1).isdigit():
            kw["rank_bits"] = float(extra[1:])
        else:
            raise ValueError(f"bad weight config {spec!r}: {extra!r} is not gGROUP, mMETA_BITS, qPERCENT, rBITS, "
                             "lRANK_BITS, tTUNE_STEPS, uniform, codebook, even or awq")
    return WeightQuant(**kw)


def bench_weights(lm: LM, configs: list, text: str, read_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8)) -> list[dict]:
    """Perplexity and bytes of the model with each weight quantization, against the model as loaded.
    ``linear_fraction`` is of the Linear layers' bytes at 16 bits a weight, whatever dtype the model
    loaded in (float32 where the CPU lacks fast bfloat16); ``model_fraction`` of the model as loaded.
    Every config quantizes a fresh copy of the loaded weights. An any-precision config is measured at
    every width in ``read_bits`` it stores, from the one quantized model."""
    import copy

    from memfit.eval.perplexity import perplexity
    from memfit.weights import quantize_, set_read_bits, weight_bytes

    reference = copy.deepcopy(lm.model)
    ref_bytes = weight_bytes(reference)
    dtype = next(reference.parameters()).dtype
    to16 = 2 / dtype.itemsize  # the loaded bytes -> the same weights' at 16 bits
    linear_bytes = sum(m.weight.nbytes for n, m in reference.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    t0 = time.perf_counter()
    rows = [{"config": str(dtype).removeprefix("torch."), "method": "none", "bits": dtype.itemsize * 8,
             "perplexity": perplexity(lm, text),
             "linear_bytes": linear_bytes, "linear_fraction": 1 / to16, "model_bytes": ref_bytes["total"],
             "quantize_s": 0.0, "ppl_seconds": time.perf_counter() - t0}]
    ref_ppl = rows[0]["perplexity"]
    for cfg in tqdm(configs, desc="weight configs", leave=False):
        lm.model = copy.deepcopy(reference)
        t0 = time.perf_counter()
        report = quantize_(lm.model, cfg, progress=False)
        took = time.perf_counter() - t0
        wb = weight_bytes(lm.model)
        widths = [b for b in read_bits if cfg.seed_bits <= b <= cfg.bits] if cfg.method == "anyprec" else [cfg.bits]
        for bits in widths:
            if cfg.method == "anyprec":
                set_read_bits(lm.model, bits)
            t1 = time.perf_counter()
            ppl = perplexity(lm, text)
            name = (f"{cfg.method}:{cfg.bits}" + (f":g{cfg.group_size}" if cfg.uses_groups and cfg.group_size != 64 else "")
                    + (":uniform" if cfg.method == "guided" and cfg.grid == "uniform" else "")
                    + (f":m{cfg.meta_bits}" if cfg.meta_bits else "")
                    + (f":q{cfg.qdec_channels * 100:g}" + (f":r{cfg.qdec_bits}" if cfg.qdec_bits != 8 else "")
                       if cfg.qdec_channels else "")
                    + (f":l{cfg.rank_bits:g}" + (":even" if cfg.twin_ranks == "uniform" else "")
                       + (f":t{cfg.twin_tune}" if cfg.twin_tune != type(cfg).twin_tune else "")
                       if cfg.method == "twin" else "")
                    + (":awq" if cfg.scale_search else "")
                    + (f"@{bits}" if cfg.method == "anyprec" else ""))
            rows.append({"config": name, "method": cfg.method, "bits": bits, "stored_bits": cfg.bits,
                         "group_size": cfg.group_size if cfg.uses_groups else None, "meta_bits": cfg.meta_bits,
                         "perplexity": ppl, "ppl_vs_ref": ppl / ref_ppl - 1,
                         "linear_bytes": report.nbytes, "linear_fraction": report.nbytes / (report.orig_nbytes * to16),
                         "model_bytes": wb["total"], "model_fraction": wb["total"] / ref_bytes["total"],
                         "qdec_channels": cfg.qdec_channels, "host_bytes": wb["host"],
                         "skipped": sorted(report.skipped), "quantize_s": took, "ppl_seconds": time.perf_counter() - t1})
    lm.model = reference
    return rows


def _decode_step_ms(model, batch: int, prompt: int, reps: int = 50, compile: bool = False,
                    chunk: int | None = None, full: bool = False) -> tuple[float, str]:
    """One decode step at batch ``batch`` after a ``prompt``-token prefill (``chunk`` tokens a forward),
    with a StaticCache, replayed as a CUDA graph (what a serving engine does: at batch 1 eager PyTorch
    is bound by Python), else eager. With ``compile``, the step is torch.compile'd first (inductor
    fuses the small elementwise kernels between the matmuls, as gpt-fast and torchao's figures do),
    then captured. ``full``: the step fills the cache's last slot, so (with memfit's attention) it
    runs unmasked, on SDPA's GQA kernel: transformers' masked step repeats K and V for every query
    head, which at long context costs more than the attention itself."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + (1 if full else 16))
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    chunk = chunk or prompt
    with torch.no_grad():
        for s in range(0, prompt, chunk):
            model(ids[:, s : s + chunk], **with_cache(model, cache), use_cache=True, logits_to_keep=1,
                  cache_position=torch.arange(s, min(s + chunk, prompt), device="cuda"))
        tok = ids[:, -1:].clone()
        pos = torch.tensor([prompt], device="cuda")

        flag = {"memfit_static_step": True} if full else {}
        lengths = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                   if torch.is_tensor(getattr(layer, "cumulative_length", None))]

        flag.update(with_cache(model, cache))  # looked up here, outside what torch.compile traces

        def step():
            for n in lengths:  # newer StaticCache layers count their own length: rewind, so every replay writes slot `prompt`
                n.fill_(prompt)
            return model(tok, cache_position=pos, use_cache=True, **flag).logits

        if compile:  # one eager step first: quantized layers build their decode kernel's copy of the codes
            from memfit.kv.static import allow_recompiles

            step()
            allow_recompiles(4 * model.config.num_hidden_layers)
            step = torch.compile(step, dynamic=False)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            fn, mode = graph.replay, "torch.compile + cuda-graph" if compile else "cuda-graph"
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured is timed eagerly, and said so
            torch.cuda.synchronize()
            fn, mode = step, f"eager ({type(e).__name__})"
        fn()
        torch.cuda.synchronize()
        return _cuda_ms(fn, reps), mode


def _step_read_bytes(model) -> int:
    """Bytes of weights one decode step reads: every Linear as its kernel holds it (a quantized layer's
    kernel copy and grid, or its planes), norms; not the embedding table, of which a step reads a row."""
    from memfit.weights import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.resident_nbytes
        elif isinstance(m, torch.nn.Linear) or "Norm" in type(m).__name__:
            total += sum(p.nbytes for p in m.parameters(recurse=False))
    return total


def bench_weight_decode(batch: int = 1, prompt: int = 256, bits: tuple[int, ...] = (4,), group_size: int = 64,
                        method: str = "hqq", layers: int = 32, compile: bool = False,
                        lm_head: bool = False, meta_bits: int = 0, kernel: str | None = None,
                        peak_tbs: float | None = None, fuse: bool = True, attention: str = "memfit",
                        qdec_channels: float = 0.0, qdec_bits: int = 8, twin_rank_bits: float = 0.0,
                        twin_epilogues: tuple[str, ...] = ("kernel",)) -> dict:
    """Decode step time of a random-weight Llama-3.1-8B-shaped model with bf16 weights, then with
    weights at each of ``bits`` (memfit's QuantLinear: on CUDA the tile-layout GEMV at every width;
    ``kernel="tinygemm"``: torch's int4 kernel at 4 bits, ``"planes"``: the bit-plane GEMV), on the same
    model and shapes; each step with
    its roofline (the weights it reads at ``peak_tbs`` TB/s; None: the GPU's own HBM peak,
    :func:`hbm_peak`, H200's 4.8 for one not listed). ``lm_head``: quantize the output layer too
    (as torchao's int4 weight-only and gpt-fast do: every Linear); by default it stays bf16, as
    ``WeightQuant``'s skip-list keeps it. ``meta_bits``: scale and zero stored in that many bits (the
    kernels read a float16 copy made on first use). ``fuse``: q/k/v and gate/up each run as one stacked
    layer (``weights.fuse``), as loading a quantized folder on CUDA does; the bf16 step is then also timed
    stacked (``bf16_fused_ms``, ``speedup_vs_fused_bf16``). ``attention``: ``"memfit"``, the
    step as memfit's static decode runs it (memfit's attention, the cache's last slot filled, unmasked
    SDPA with its GQA kernel, as ``bench decode`` times its 16-bit graph), or ``"sdpa"``: transformers'
    SDPA with the mask of a StaticCache not yet full (cuDNN's kernel and the mask's own kernels).
    ``qdec_channels``: each width also timed with QDEC's residual (``qdec_bits``, pinned host memory)
    on that fraction of the input channels, its correction beside the layer's product on a side stream
    (``qdec_ms``) and inline after it (``qdec_inline_ms``); QDEC layers do not stack, so ``fuse``
    must be off (the plain width then runs unstacked too). ``twin_rank_bits``: each width also timed with
    twin's 8-bit low-rank factors on every quantized layer (``twin.rank_for``'s rank at that many bits a
    weight; random values, as the weights are), added in the tile GEMV's launch (``twin_ms``,
    ``twin_vs_plain``), stacked like the plain layers where ``fuse`` is on; with several ``twin_epilogues``
    (``linear.TWIN_EPILOGUE``: where ``u L^T`` is added) each is timed (``twin_epilogue_ms``), the first
    giving ``twin_ms``."""
    if attention not in ("memfit", "sdpa"):
        raise ValueError(f"attention must be 'memfit' or 'sdpa', got {attention!r}")
    if twin_rank_bits and qdec_channels:
        raise ValueError("time QDEC and twin's factors in separate runs")
    from memfit.weights import linear

    if not twin_epilogues or any(e not in linear.TWIN_EPILOGUES for e in twin_epilogues):
        raise ValueError(f"twin_epilogues must name some of {linear.TWIN_EPILOGUES}, got {twin_epilogues}")
    if qdec_channels and fuse:
        raise ValueError("QDEC layers do not stack: time them with fuse off (--no-fuse), against the plain "
                         "width unstacked")
    attn, full = (None, True) if attention == "memfit" else ("sdpa", False)
    from memfit.weights import QuantLinear, WeightQuant, quantize_, weight_bytes
    from memfit.weights.fuse import fuse_projections, unfuse_projections

    peak = peak_tbs * 1e12 if peak_tbs else (hbm_peak() or 4.8e12)
    peak_tbs = peak / 1e12
    model = _random_llama8b(layers, attn)
    out = {"batch": batch, "prompt": prompt, "layers": layers, "group_size": group_size, "method": method,
           "meta_bits": meta_bits, "lm_head_quantized": lm_head, "kernel": kernel or "default", "fused": fuse,
           "attention": attention,
           "device": torch.cuda.get_device_name(), "peak_tbs": peak_tbs, "widths": []}
    out["bf16_ms"], out["bf16_mode"] = _decode_step_ms(model, batch, prompt, compile=compile, full=full)
    out["bf16_weight_bytes"] = weight_bytes(model)["total"]
    out["bf16_read_bytes"] = _step_read_bytes(model)
    out["bf16_roofline_ms"] = out["bf16_read_bytes"] / peak * 1e3
    if fuse:  # the bf16 side with its projections stacked too: the fair baseline for the stacked widths
        stacked = _random_llama8b(layers, attn)
        fuse_projections(stacked)
        out["bf16_fused_ms"] = _decode_step_ms(stacked, batch, prompt, compile=compile, full=full)[0]
        del stacked
        torch.cuda.empty_cache()
        if compile:
            torch._dynamo.reset()
    for b in bits:
        if out["widths"]:  # a fresh bf16 model (the same seed: the same weights) for each width
            del model
            torch.cuda.empty_cache()
            model = _random_llama8b(layers, attn)
        row = {"bits": b}
        t0 = time.perf_counter()
        skip = () if lm_head else WeightQuant.skip
        quantize_(model, WeightQuant(bits=b, group_size=group_size, method=method, skip=skip, meta_bits=meta_bits),
                  progress=False)
        torch.cuda.synchronize()
        row["quantize_s"] = time.perf_counter() - t0
        if fuse:
            row["stacks"] = fuse_projections(model)
        layers_q = [m for m in model.modules() if isinstance(m, QuantLinear)]
        for m in layers_q:
            m.set_prefer(kernel)
        step = _quant_step(model, batch, prompt, compile, full, peak)
        row.update(quant_ms=step["ms"], quant_mode=step["mode"], kernels=step["kernels"],
                   quant_weight_bytes=step["weight_bytes"], read_bytes=step["read_bytes"],
                   roofline_ms=step["roofline_ms"], of_roofline=step["of_roofline"])
        # what the GPU holds: the stored weights plus each layer's kernel copy where the planes were kept
        row["quant_resident_bytes"] = row["quant_weight_bytes"] + sum(m.resident_nbytes - m.nbytes for m in layers_q)
        row["speedup"] = out["bf16_ms"] / row["quant_ms"]
        if "bf16_fused_ms" in out:
            row["speedup_vs_fused_bf16"] = out["bf16_fused_ms"] / row["quant_ms"]
        if qdec_channels:
            model = None  # freed before the QDEC copy is built
            row.update(_qdec_step(b, group_size, method, skip, meta_bits, kernel, qdec_channels, qdec_bits,
                                  batch, prompt, compile, full, layers, attn))
            row["qdec_added"] = row["qdec_ms"] / row["quant_ms"] - 1
            row["qdec_inline_added"] = row["qdec_inline_ms"] / row["quant_ms"] - 1
        if twin_rank_bits:
            if fuse:  # factors a layer, as a twin folder holds them, then stacked again
                unfuse_projections(model)
            layers_q = [m for m in model.modules() if isinstance(m, QuantLinear)]
            _attach_random_factors(layers_q, twin_rank_bits)
            row["twin_rank_bits"] = twin_rank_bits
            row["twin_ranks"] = sorted({m.rank for m in layers_q})
            if fuse:
                row["twin_stacks"] = fuse_projections(model)
            row["twin_epilogue_ms"], before = {}, linear.TWIN_EPILOGUE
            try:
                for e in twin_epilogues:
                    linear.TWIN_EPILOGUE = e
                    step = _quant_step(model, batch, prompt, compile, full, peak)
                    row["twin_epilogue_ms"][e] = step["ms"]
                    if e == twin_epilogues[0]:
                        row.update({f"twin_{k}": v for k, v in step.items()}, twin_epilogue=e)
            finally:
                linear.TWIN_EPILOGUE = before
            row["twin_vs_plain"] = row["twin_ms"] / row["quant_ms"]
        out["widths"].append(row)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _quant_step(model, batch: int, prompt: int, compile: bool, full: bool, peak: float) -> dict:
    """The decode step of a quantized ``model``: time, mode, the kernels its QuantLinear layers ran, the
    weights' bytes stored and read, and the roofline (those bytes at ``peak`` B/s)."""
    from memfit.weights import QuantLinear, weight_bytes

    torch.cuda.empty_cache()
    if compile:
        torch._dynamo.reset()
    ms, mode = _decode_step_ms(model, batch, prompt, compile=compile, full=full)
    kernels = [m.kernel for m in model.modules() if isinstance(m, QuantLinear)]
    read = _step_read_bytes(model)
    return {"ms": ms, "mode": mode, "kernels": {k: kernels.count(k) for k in set(kernels)},
            "weight_bytes": weight_bytes(model)["total"], "read_bytes": read, "roofline_ms": read / peak * 1e3,
            "of_roofline": read / peak * 1e3 / ms}


def _attach_random_factors(layers: list, rank_bits: float) -> None:
    """Twin's 8-bit factors, random, on each of ``layers`` at the rank ``rank_bits`` bits a weight buy (a
    decode step's time does not depend on their values)."""
    from memfit.weights import twin

    for m in layers:
        r = max(1, twin.rank_for(m.out_features, m.in_features, rank_bits))
        dev = m.planes.device
        m.attach_lowrank(torch.randint(-127, 128, (m.out_features, r), device=dev, dtype=torch.int8),
                         torch.full((m.out_features,), 1e-3, device=dev),
                         torch.randint(-127, 128, (r, m.in_features), device=dev, dtype=torch.int8),
                         torch.full((r,), 1e-3, device=dev))


def _qdec_step(bits: int, group_size: int, method: str, skip, meta_bits: int, kernel, channels: float,
               qbits: int, batch: int, prompt: int, compile: bool, full: bool, layers: int, attn) -> dict:
    """The step of a fresh copy of the model (the same seed) at ``bits`` with QDEC on ``channels`` of
    each layer's input channels, overlapped and inline; what each token fetches from host memory."""
    from memfit.weights import QuantLinear, WeightQuant, quantize_, weight_bytes

    torch.cuda.empty_cache()
    model = _random_llama8b(layers, attn)
    quantize_(model, WeightQuant(bits=bits, group_size=group_size, method=method, skip=skip, meta_bits=meta_bits,
                                 qdec_channels=channels, qdec_bits=qbits), progress=False)
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in qs:
        m.set_prefer(kernel)
    torch.cuda.empty_cache()
    row = {"qdec_channels": channels, "qdec_bits": qbits, "qdec_host_bytes": weight_bytes(model)["host"],
           # a decode token's fetch: k rows of out_features codes a layer, and their scales
           "qdec_fetch_bytes": sum(m.qdec_k * (m.out_features * qbits // 8 + (2 if qbits < 16 else 0)) for m in qs)}
    for key, overlap in (("qdec_ms", True), ("qdec_inline_ms", False)):
        QuantLinear.qdec_overlap = overlap
        try:
            if compile:
                torch._dynamo.reset()
            row[key], row[key.replace("_ms", "_mode")] = _decode_step_ms(model, batch, prompt, compile=compile,
                                                                         full=full)
        finally:
            QuantLinear.qdec_overlap = True
    del model
    torch.cuda.empty_cache()
    return row


def _prefilled_dynamic(model, batch: int, context: int, chunk: int):
    """A DynamicCache of ``batch`` x ``context`` random tokens (prefilled ``chunk`` tokens a forward)."""
    from transformers import DynamicCache

    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
    cache = DynamicCache(config=cfg)
    for s in range(0, context, chunk):
        model(ids[:, s : s + chunk], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def _release_host() -> None:
    """Give back the pinned host blocks torch caches (each offloaded cache pins its own)."""
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def _time_tiered(model, keys, values, tc, tok, steps: int, graph: bool = False) -> dict:
    """Offload ``keys`` / ``values`` (per-layer sequences, on the GPU) under ``tc`` and time greedy
    steps: eager, or (``graph``) the static cache's step replayed as a CUDA graph."""
    from memfit.kv.static import GraphDecoder
    from memfit.kv.tiered import TieredCache

    t0 = time.perf_counter()
    tiered = TieredCache.offload(keys, values, tc, torch.device("cuda"))
    torch.cuda.synchronize()
    offload_s = time.perf_counter() - t0
    if graph:
        dec = GraphDecoder(model, tiered.to_static(steps + 8))
        ms, _ = _steps_ms(lambda t: dec.step(t).argmax(-1, keepdim=True), tok, steps, warmup=3)
    else:
        ms, _ = _steps_ms(lambda t, c=tiered: model(t, **with_cache(model, c), use_cache=True).logits[:, -1:].argmax(-1),
                          tok, steps, warmup=2)
    lay = tiered.layers[-1]
    row = {"step_ms": ms, "device_bytes": tiered.device_bytes, "host_bytes": tiered.host_bytes,
           "bits": tc.bits or 16, "fetch_cap": tc.fetch_cap, "pages": lay.n_pages, "slots": lay.slots,
           "offload_s": offload_s,
           "fetched_per_step": tiered.fetched_pages / max(1, tiered.steps)}
    tiered.close()
    del tiered
    _release_host()
    return row


def _fetch_caps(fetch_caps: tuple[float, ...] | None) -> list[tuple[str, float]]:
    """(name suffix, cap) of each variant: the caps given (``/cap<c>``), else TierConfig's default."""
    from memfit.kv.tiered import TierConfig

    return [(f"/cap{c:g}", c) for c in fetch_caps] if fetch_caps else [("", TierConfig.fetch_cap)]


def _compare(rows: list[dict]) -> list[dict]:
    for r in rows:
        same = [x for x in rows if x["batch"] == r["batch"] and x["context"] == r["context"]]
        ref = next((x for x in same if x["variant"] == "gpu"), None)
        if ref:
            r["vs_gpu"] = ref["step_ms"] / r["step_ms"]
        graph = next((x for x in same if x["variant"] == "gpu_graph"), None)
        if graph:
            r["vs_gpu_graph"] = graph["step_ms"] / r["step_ms"]
        fa = next((x for x in same if x["variant"] == "fetch_all"), None)
        if fa:
            r["vs_fetch_all"] = fa["step_ms"] / r["step_ms"]
        r["tokens_per_s"] = r["batch"] / r["step_ms"] * 1e3
    return rows


@torch.no_grad()
def bench_tiered_speed(shapes: list[tuple[int, int]], budgets: tuple[float, ...] = (0.25, 0.1), steps: int = 8,
                       layers: int = 32, chunk: int = 2048, page: int = 32, bits: int | None = 8,
                       fetch_all: bool = True, fetch_caps: tuple[float, ...] | None = None) -> list[dict]:
    """Decode step time of a random-weight Llama-3.1-8B-shaped model over ``batch`` x ``context``
    (each of ``shapes``) with the KV (a) all on the GPU in 16 bits (transformers' DynamicCache; and
    its StaticCache replayed as a CUDA graph), (b) offloaded to pinned host memory in 16 bits and
    copied whole every step (``fetch_all``: what offloading without selection does), and the same
    with pages at ``bits`` (``fetch_all_<bits>bit``), (c) offloaded with memfit's page selection,
    pages at ``bits``, at each device budget (a fraction of the 16-bit KV's bytes), eager and
    (``tiered_graph``, 2/4/8-bit pages) as a replayed CUDA graph like ``gpu_graph``. Random weights
    give queries with little locality from step to step (each step's pages differ more than a
    trained model's): ``fetched_per_step`` says how many pages a step copied. Each of
    ``fetch_caps`` (TierConfig.fetch_cap; None: its default) is a variant of each budget (``/cap<c>``)."""
    import memfit.kv.attention  # noqa: F401  registers the memfit attention implementation
    from memfit.kv.tiered import TierConfig

    dev = torch.device("cuda")
    model = _random_llama8b(layers)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = hbm_peak(dev)
    rows = []
    for batch, context in shapes:
        _release_host()
        cache = _prefilled_dynamic(model, batch, context, chunk)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
        base = {"batch": batch, "context": context, "layers": layers, "kv_bytes": kv, "weights_bytes": weights}
        ms, _ = _steps_ms(lambda t, c=cache: model(t, **with_cache(model, c), use_cache=True).logits[:, -1:].argmax(-1),
                          tok, steps)
        rows.append({**base, "variant": "gpu", "step_ms": ms, "device_bytes": kv,
                     **({"roofline_ms": (weights + kv) / peak * 1e3} if peak else {})})
        keys = [layer.keys[:, :, :context].clone() for layer in cache.layers]  # stay on the GPU: pages are packed there
        values = [layer.values[:, :, :context].clone() for layer in cache.layers]
        del cache
        torch.cuda.empty_cache()
        try:
            rows.append({**base, "variant": "gpu_graph",
                         "step_ms": _decode_step_ms(model, batch, context, reps=steps, chunk=chunk, full=True)[0],
                         "device_bytes": kv})
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        tiered = [(f"@{b:g}{suffix}", TierConfig(device=b, page=page, bits=bits, fetch_cap=c))
                  for b in budgets for suffix, c in _fetch_caps(fetch_caps)]
        variants = [(f"tiered{n}", tc) for n, tc in tiered]
        if bits:  # packed pages: the static step, replayed as a CUDA graph (as gpu_graph is)
            variants += [(f"tiered_graph{n}", tc) for n, tc in tiered]
        if fetch_all:
            variants = [("fetch_all", TierConfig(device=budgets[-1], page=page, fetch="all", bits=None))] + \
                ([(f"fetch_all_{bits}bit", TierConfig(device=budgets[-1], page=page, fetch="all", bits=bits))]
                 if bits else []) + variants
        for name, tc in variants:
            n = steps if not name.startswith("fetch_all") else max(2, steps // 4)
            rows.append({**base, "variant": name, **_time_tiered(model, keys, values, tc, tok, n,
                                                                 graph=name.startswith("tiered_graph"))})
        del keys, values
    return _compare(rows)


class _Tiled:
    """Per-layer KV of ``rows`` rows built from a prefilled batch repeated (one layer at a time on the
    GPU): many requests' worth of KV without holding all of it at once."""

    def __init__(self, tensors: list[torch.Tensor], times: int):
        self.tensors, self.times = tensors, times

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i].repeat(self.times, 1, 1, 1)


@torch.no_grad()
def bench_tiered_throughput(requests: int = 32, context: int = 32768, device_gib: float = 16.0, bits: int | None = 8,
                            steps: int = 6, layers: int = 32, chunk: int = 2048, page: int = 32,
                            fetch_caps: tuple[float, ...] | None = None) -> list[dict]:
    """Decode throughput at a fixed device budget for KV (``device_gib``): the largest batch whose
    16-bit KV fits in it on the GPU alone (eager, and as a CUDA graph), against ``requests``
    concurrent ``context``-token requests offloaded to pinned host memory (pages at ``bits``) and
    decoded with page selection in that budget. The requests' KV is a prefilled batch of the
    baseline's size repeated (every request's pages stored and fetched on their own)."""
    import memfit.kv.attention  # noqa: F401
    from memfit.kv.tiered import TierConfig

    model = _random_llama8b(layers)
    cfg = model.config
    per_request = layers * 2 * cfg.num_key_value_heads * context * (cfg.hidden_size // cfg.num_attention_heads) * 2
    budget = int(device_gib * 2**30)
    fit = budget // per_request
    if fit < 1 or requests % fit:
        raise ValueError(f"{device_gib} GiB holds {fit} requests of {context} tokens; requests ({requests}) must be "
                         "a multiple of it (and it at least 1)")
    _release_host()
    cache = _prefilled_dynamic(model, fit, context, chunk)
    tok = torch.randint(0, cfg.vocab_size, (fit, 1), device="cuda")
    base = {"context": context, "layers": layers, "device_budget_bytes": budget, "request_kv_bytes": per_request}
    ms, _ = _steps_ms(lambda t, c=cache: model(t, **with_cache(model, c), use_cache=True).logits[:, -1:].argmax(-1),
                      tok, steps)
    rows = [{**base, "batch": fit, "variant": "gpu", "step_ms": ms, "device_bytes": fit * per_request}]
    keys = [layer.keys[:, :, :context].clone() for layer in cache.layers]
    values = [layer.values[:, :, :context].clone() for layer in cache.layers]
    del cache
    torch.cuda.empty_cache()
    rows.append({**base, "batch": fit, "variant": "gpu_graph", "device_bytes": fit * per_request,
                 "step_ms": _decode_step_ms(model, fit, context, reps=steps, chunk=chunk, full=True)[0]})
    torch.cuda.empty_cache()
    times = requests // fit
    tok = torch.randint(0, cfg.vocab_size, (requests, 1), device="cuda")
    for suffix, cap in _fetch_caps(fetch_caps):
        tc = TierConfig(device=budget, page=page, bits=bits, fetch_cap=cap)
        for graph in (False, True) if bits else (False,):
            name = f"tiered{'_graph' if graph else ''}@{device_gib:g}GiB{suffix}"
            rows.append({**base, "batch": requests, "variant": name,
                         **_time_tiered(model, _Tiled(keys, times), _Tiled(values, times), tc, tok, steps, graph)})
    for r in rows:
        r["tokens_per_s"] = r["batch"] / r["step_ms"] * 1e3
    for r in rows:
        r["vs_gpu_tokens_per_s"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["vs_gpu_graph_tokens_per_s"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows
