"""Accuracy of decoding from offloaded KV (memfit.kv.tiered) on memfit eval's tasks."""

from __future__ import annotations

import statistics
import time

from tqdm import tqdm

from memfit.api import LM
from memfit.eval.runner import _answer_batched, make_samples
from memfit.kv.tiered import TierConfig


def bench_tiered_accuracy(lm: LM, tasks: list[str], length: int = 4096, samples: int = 10,
                          budgets: tuple[float, ...] = (0.25, 0.1), page: int = 32, window: int = 64,
                          seed: int = 0, max_new_tokens: int = 24, bits: int | None = 8,
                          fetch_caps: tuple[float, ...] | None = None) -> dict:
    """Each sample prefilled once (no compression); its questions answered from the full cache,
    then from the cache offloaded with each device budget (a fraction of the 16-bit KV; pages
    stored at ``bits``, None: 16): the question reads every page (exact), each generated token
    attends over the selected pages.
    ``fetched_per_step``: pages (per row and KV head, over all layers) copied to the device a
    step: how much the pages chosen change from one step to the next. Each of ``fetch_caps``
    (TierConfig.fetch_cap; None: its default) is a variant of each budget (``device=B,cap=C``).
    A budget too small for the cache's fixed parts (window, summaries, dense layers) is left out,
    its reason in ``refused``."""
    records, refused = [], {}
    for sample in tqdm(make_samples(lm, tasks, [length], samples, seed), desc="tiered accuracy", unit="sample"):
        ctx = lm.prefill(sample.context)
        asks = [(q, None) for q in sample.questions]
        variants = [("full", ctx, None)] + [
            (f"device={b:g}" + (f",cap={cap:g}" if fetch_caps else ""), None,
             TierConfig(device=b, page=page, window=window, bits=bits, fetch_cap=cap))
            for b in budgets for cap in fetch_caps or (TierConfig.fetch_cap,)]
        for name, c, tc in variants:
            if name in refused:
                continue
            if tc is not None:
                try:
                    c = lm.offload(ctx, tc)
                except ValueError as e:  # refused on one sample: left out on all (no accuracy over a subset)
                    refused[name] = str(e)
                    records = [r for r in records if r["variant"] != name]
                    continue
            t0 = time.perf_counter()
            replies = _answer_batched(lm, c, asks, max_new_tokens)
            scores = [q.score(replies[a]) for q, a in zip(sample.questions, asks)]
            rec = {"task": sample.task, "seed": sample.seed, "variant": name, "tokens": ctx.num_tokens,
                   "score": statistics.mean(scores), "answer_s": time.perf_counter() - t0}
            if tc is not None:
                lay = c.cache.layers[0]
                rec.update(bits=tc.bits or 16, fetch_cap=tc.fetch_cap, device_bytes=c.cache.device_bytes,
                           full_bytes=c.cache.full_nbytes, pages=lay.n_pages,
                           slots=lay.slots, steps=c.cache.steps,
                           fetched_per_step=c.cache.fetched_pages / max(1, c.cache.steps))
                c.cache.close()
            records.append(rec)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == name]
        summary[name] = {"n": len(rs), "accuracy": 100 * statistics.mean(r["score"] for r in rs),
                         **({"device_fraction": statistics.mean(r["device_bytes"] / r["full_bytes"] for r in rs)}
                            if "device_bytes" in rs[0] else {})}
        summary[name]["delta"] = summary[name]["accuracy"] - summary["full"]["accuracy"]
    per_task = {t: {n: 100 * statistics.mean(r["score"] for r in records if r["task"] == t and r["variant"] == n)
                    for n in summary} for t in dict.fromkeys(r["task"] for r in records)}
    return {"summary": summary, "per_task": per_task, "records": records, "refused": refused}
