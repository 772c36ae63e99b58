"""Reuse beyond prefixes, measured (``memfit bench reuse``): stored documents combined in random
orders behind new system prompts (RAG), and agents reading one text behind their own prefixes.

Every variant answers the same questions from the same token ids; only how the context's KV is
made differs: a full prefill, naive concatenation of the stored documents' KV (moved to their
positions, nothing recomputed), or selective recompute of a fraction of the tokens. A request is
timed as ``memfit serve`` runs a plain prompt: the whole prompt (system prompt, documents, question,
the assistant's answer prefix) is prefilled or assembled from the store in one pass (the question's
rows computed with the recomputed ones), whose last row's logits give the first answer token; TTFT
is that pass and the token's sampling. Eval tasks cut into documents ask several questions over one
context, each after it (TTFT: the context's time plus the first question's prefill and first token).
``answer_kl``: KL(full || variant) of the first answer token's distribution, a measure of how far
reuse moved the answer that does not hang on a small model's few right answers.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from memfit.api import LM
from memfit.eval.filler import TokenCounter, fill_to_length, filler_sentences
from memfit.eval.tasks.base import Question
from memfit.eval.tasks.qa import _CITIES, _FIRST, _LAST, _PRODUCTS
from memfit.hfcompat import with_cache
from memfit.reuse import AnchorPool
from memfit.store import ContextStore

_ROLES = ["a research assistant", "a support agent for a trade registry", "a careful archivist",
          "a business journalist", "a librarian", "a patent clerk", "an auditor", "a museum guide",
          "a history teacher", "a market analyst"]
_STYLES = ["Answer in one short sentence.", "Quote names exactly as written.", "Be brief and factual.",
           "Use the documents only.", "Do not speculate.", "Answer plainly."]


@dataclass(frozen=True)
class Document:
    text: str
    product: str
    founder: str
    city: str
    year: str


def document_pool(seed: int, count: int, tokens: int, counter: TokenCounter) -> list[Document]:
    """``count`` company profiles of about ``tokens`` tokens, each with its one fact (who founded
    the company that makes X, where, when) at a random depth among filler sentences."""
    rng = random.Random(f"reuse-docs:{seed}")
    out = []
    for p in rng.sample(_PRODUCTS, count):
        founder = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        city, year = rng.choice(_CITIES), str(rng.randint(1850, 1990))
        fact = f"The company that makes {p} was founded by {founder} in {city} in {year}."
        text, _ = fill_to_length(rng, counter, tokens, [fact])
        out.append(Document(text, p, founder, city, year))
    return out


def question_about(doc: Document, kind: int) -> Question:
    text, answer = [(f"Who founded the company that makes {doc.product}?", doc.founder),
                    (f"Who founded the company that makes {doc.product}, and in which city?", doc.city),
                    (f"Who founded the company that makes {doc.product}, and in which year?", doc.year)][kind % 3]
    return Question(text, (answer,), f"The company that makes {doc.product} was founded by")


def system_prompt(rng: random.Random, filler: int = 0) -> str:
    """A new system prompt: a role, two instructions, and ``filler`` sentences of background."""
    extra = " ".join(filler_sentences(rng, filler))
    return " ".join(x for x in (f"You are {rng.choice(_ROLES)}.", *rng.sample(_STYLES, 2), extra) if x)


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the server sees a plain one: ``ids`` [1, N] (system prompt, documents
    at ``spans``, the question and the assistant's answer prefix) is the context, whose last
    logits give the first answer token."""

    ids: torch.Tensor
    spans: list[tuple[int, int]]


def prompt(lm: LM, parts: list[str], q: Question) -> Prompt:
    ids, spans = lm.encode_parts(parts)
    suffix = lm.encode_question(q.text, q.answer_prefix)
    return Prompt(torch.cat([ids, torch.tensor([suffix], device=ids.device)], dim=1), spans)


@torch.no_grad()
def first_token_logprobs(lm: LM, ctx, suffix: list[int]) -> torch.Tensor:
    """Log-probabilities [V] (float32) of the token after ``suffix`` fed over ``ctx`` (none: the
    context's own last logits)."""
    if not suffix:
        return ctx.logits[0].log_softmax(-1)
    pos = torch.arange(ctx.num_tokens, ctx.num_tokens + len(suffix), device=lm.device).unsqueeze(0)
    out = lm.model(torch.tensor([suffix], device=lm.device), position_ids=pos,
                   **with_cache(lm.model, ctx.cache.fork(1)), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float().log_softmax(-1)


def answer_kl(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """KL(ref || lp) of two log-probability vectors (a full prefill's first answer token, a variant's)."""
    return max(0.0, float((ref.exp() * (ref - lp)).sum()))


def _answer(lm: LM, ctx, suffix: list[int], q: Question, max_new_tokens: int) -> tuple[float, float]:
    """(seconds to the first answer token, score of the whole answer) with ``suffix`` fed over
    ``ctx``: the question's tokens (as ``lm.ask`` feeds them), or none when the context is the
    whole prompt (its last logits start the answer)."""
    t0 = time.perf_counter()
    lm.generate(ctx, [suffix], 1)
    first = time.perf_counter() - t0
    reply = (q.answer_prefix or "") + lm.generate(ctx, [suffix], max_new_tokens, lines=q.lines)[0]
    return first, q.score(reply)


def _variants(lm: LM, ids: torch.Tensor, spans: list[tuple[int, int]], policy: str, store: ContextStore,
              fractions: list[float], anchors: AnchorPool | None = None, repeats: int = 1):
    """(name, context of ``ids``, its documents at ``spans``) for a full prefill and each recompute
    fraction (0.0: naive concatenation), and with ``anchors`` KVCOMM's anchors over the last fraction.
    Each context but the anchored one (whose pool learns from every build) is built ``repeats``
    times; its ``prefill_seconds`` is the fastest build's (``meta["builds_s"]``: every build's)."""

    def fastest(build):
        ctx, times = None, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ctx = build()
            times.append(time.perf_counter() - t0)
        ctx.prefill_seconds = min(times)
        ctx.meta["builds_s"] = times
        return ctx

    yield "full", fastest(lambda: lm.prefill_ids(ids, policy))
    for f in fractions:
        yield ("naive" if f == 0 else f"recompute={f:g}"), _reused(
            fastest(lambda: lm.prefill_assembled(ids, spans, policy, store=store, recompute=f)), store)
    if anchors is not None:
        yield "anchors", _reused(lm.prefill_assembled(ids, spans, policy, store=store, recompute=fractions[-1],
                                                      anchors=anchors), store)


def _reused(ctx, store: ContextStore):
    """``ctx``, if every document was read from the store: a store that lost them (unreachable,
    too small) would time full prefills as reuse."""
    found = ctx.meta["reuse"]["documents"]
    if "miss" in found:
        raise RuntimeError(f"the store did not return {found.count('miss')} of {len(found)} stored documents "
                           f"(tiers: {', '.join(t.name for t in store.tiers)}): unreachable, or too small to "
                           "hold them; reuse would be timed as a full prefill")
    return ctx


def kv_error(ctx, full) -> float:
    """Relative error of a context's KV against a full prefill's, over the layers past the first two
    (the first two are exact after any assembly)."""
    num = den = 0.0
    for mine, ref in list(zip(ctx.cache.layers, full.cache.layers))[2:]:
        for a, b in zip(mine.materialize(), ref.materialize()):
            num += (a.float() - b.float()).pow(2).sum().item()
            den += b.float().pow(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def _summarize(records: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == name]
        out[name] = {"n": len(rs), "accuracy": 100 * statistics.mean(r["score"] for r in rs),
                     "ttft_s": statistics.mean(r["ttft_s"] for r in rs),
                     "context_s": statistics.mean(r["context_s"] for r in rs),
                     "recomputed_tokens": statistics.mean(r.get("recomputed", 0) for r in rs),
                     "answer_kl": statistics.mean(r["answer_kl"] for r in rs),
                     **({"kv_error": statistics.mean(r["kv_error"] for r in rs)} if all("kv_error" in r for r in rs)
                        else {}),
                     **({"anchored": sum(r["anchored"] for r in rs)} if all("anchored" in r for r in rs) else {})}
    full = out.get("full")
    for s in out.values():
        if full:
            s["ttft_speedup"] = full["ttft_s"] / s["ttft_s"]
            s["accuracy_delta"] = s["accuracy"] - full["accuracy"]
    return out


def bench_documents(lm: LM, store: ContextStore, samples: int = 40, docs: int = 4, pool: int = 8,
                    doc_tokens: int = 1024, fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.3),
                    policy: str = "none", seed: int = 0, max_new_tokens: int = 16, repeats: int = 1) -> dict:
    """RAG: each sample puts ``docs`` documents drawn from a pool of ``pool`` stored ones, in a
    random order, behind a new system prompt, and asks about one of them. ``repeats``: builds of
    each context, the fastest timed (see :func:`_variants`)."""
    counter = lambda t: len(lm._encode(t))  # noqa: E731
    documents = document_pool(seed, pool, doc_tokens, counter)
    for d in tqdm(documents, desc="storing documents", leave=False):  # stored before any sample: reused
        lm.prefill(d.text, policy, store=store, reuse="anywhere")
    rng = random.Random(f"reuse-samples:{seed}")
    records = []
    for s in tqdm(range(samples), desc="documents QA"):
        chosen = rng.sample(documents, docs)
        q = question_about(rng.choice(chosen), s)
        p = prompt(lm, [system_prompt(rng), *(d.text for d in chosen)], q)
        ref = None
        for name, ctx in _variants(lm, p.ids, p.spans, policy, store, list(fractions), repeats=repeats):
            first, score = _answer(lm, ctx, [], q, max_new_tokens)
            lp = first_token_logprobs(lm, ctx, [])
            ref = lp if name == "full" else ref
            records.append({"sample": s, "variant": name, "tokens": ctx.num_tokens, "score": score,
                            "answer_kl": answer_kl(ref, lp), "builds_s": ctx.meta.get("builds_s"),
                            "context_s": ctx.prefill_seconds, "ttft_s": ctx.prefill_seconds + first,
                            "recomputed": ctx.meta.get("reuse", {}).get("recomputed", ctx.num_tokens)})
    return {"summary": _summarize(records), "records": records}


def bench_agents(lm: LM, store: ContextStore, samples: int = 10, agents: int = 3, text_tokens: int = 2048,
                 prefix_tokens: int = 200, fractions: tuple[float, ...] = (0.0, 0.15), policy: str = "none",
                 seed: int = 0, max_new_tokens: int = 16, repeats: int = 1) -> dict:
    """Agents: ``agents`` agents read the same text (``text_tokens``, several facts) behind their
    own ``prefix_tokens``-token system prompts, each asking about one fact. The first agent's
    request stores the text (recomputing it in full, which gives the anchors an exact offset); the
    others reuse it. Summaries are per agent position; ``kv_error``: see :func:`kv_error`;
    ``repeats``: see :func:`_variants`."""
    counter = lambda t: len(lm._encode(t))  # noqa: E731
    rng = random.Random(f"reuse-agents:{seed}")
    records = []
    per_sentence = counter(" ".join(filler_sentences(random.Random(1), 20))) / 20
    for s in tqdm(range(samples), desc="agents"):
        facts = document_pool(seed * 1000 + s, 4, text_tokens // 4, counter)
        text = "\n\n".join(d.text for d in facts)
        pool = AnchorPool()
        for a in range(agents):
            system = system_prompt(rng, filler=max(0, int(prefix_tokens / per_sentence) - 2))
            q = question_about(rng.choice(facts), s + a)
            p = prompt(lm, [system, text], q)
            if a == 0:  # the first agent's request computes the text and stores it
                variants = [next(_variants(lm, p.ids, p.spans, policy, store, [], repeats=repeats)),
                            ("stores", lm.prefill_assembled(p.ids, p.spans, policy, store=store, recompute=1.0,
                                                            anchors=pool))]
            else:
                variants = _variants(lm, p.ids, p.spans, policy, store, list(fractions), pool, repeats)
            full = ref = None
            for name, ctx in variants:
                full = ctx if name == "full" else full
                first, score = _answer(lm, ctx, [], q, max_new_tokens)
                lp = first_token_logprobs(lm, ctx, [])
                ref = lp if name == "full" else ref
                reuse = ctx.meta.get("reuse", {})
                records.append({"sample": s, "agent": a + 1, "variant": name, "tokens": ctx.num_tokens,
                                "score": score, "context_s": ctx.prefill_seconds, "ttft_s": ctx.prefill_seconds + first,
                                "recomputed": reuse.get("recomputed", ctx.num_tokens), "kv_error": kv_error(ctx, full),
                                "answer_kl": answer_kl(ref, lp), "builds_s": ctx.meta.get("builds_s"),
                                "anchored": int(any(reuse.get("anchored", [])))})
    later = [r for r in records if r["agent"] > 1]
    first_agent = [r for r in records if r["agent"] == 1]
    return {"summary": {"agents_2_on": _summarize(later), "agent_1": _summarize(first_agent)}, "records": records}


def split_text(text: str, parts: int, counter: TokenCounter) -> list[str]:
    """``text`` cut at sentence ends into ``parts`` pieces of about equal tokens (fewer if it has
    fewer sentences)."""
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if x]
    target = counter(text) / max(1, parts)
    pieces, current, size = [], [], 0
    for sent in sentences:
        current.append(sent)
        size += counter(sent)
        if size >= target and len(pieces) < parts - 1:
            pieces.append(" ".join(current))
            current, size = [], 0
    if current:
        pieces.append(" ".join(current))
    return pieces


def bench_split_tasks(lm: LM, store: ContextStore, tasks: list[str], length: int = 4096, samples: int = 10,
                      parts: int = 4, fractions: tuple[float, ...] = (0.0, 0.05), policy: str = "none",
                      seed: int = 0, max_new_tokens: int = 24, repeats: int = 1) -> dict:
    """memfit eval's tasks as reuse would see them: each sample's context cut into ``parts``
    documents (at sentence ends), stored, and assembled in their order behind a new system prompt,
    against a full prefill of the same tokens. Tasks memfit's own reuse benchmark was not tuned on:
    whether the recompute default holds beyond documents QA."""
    from memfit.eval.runner import make_samples

    rng = random.Random(f"reuse-tasks:{seed}")
    counter = lambda t: len(lm._encode(t))  # noqa: E731
    records = []
    for sample in tqdm(make_samples(lm, tasks, [length], samples, seed), desc="tasks split into documents"):
        pieces = split_text(sample.context, parts, counter)
        for piece in pieces:
            lm.prefill(piece, policy, store=store, reuse="anywhere")  # stored before the timed assembly
        parts_ = [system_prompt(rng), *pieces]
        refs = None
        ids, spans = lm.encode_parts(parts_)  # several questions over one context: each asked after it
        suffixes = [lm.encode_question(q.text, q.answer_prefix) for q in sample.questions]
        for name, ctx in _variants(lm, ids, spans, policy, store, list(fractions), repeats=repeats):
            firsts, scores = zip(*(_answer(lm, ctx, x, q, max_new_tokens) for x, q in zip(suffixes, sample.questions)))
            lps = [first_token_logprobs(lm, ctx, x) for x in suffixes]
            refs = lps if name == "full" else refs
            records.append({"task": sample.task, "seed": sample.seed, "variant": name, "tokens": ctx.num_tokens,
                            "score": statistics.mean(scores), "context_s": ctx.prefill_seconds,
                            "answer_kl": statistics.mean(answer_kl(r, lp) for r, lp in zip(refs, lps)),
                            "ttft_s": ctx.prefill_seconds + firsts[0],
                            "recomputed": ctx.meta.get("reuse", {}).get("recomputed", ctx.num_tokens)})
    per_task = {t: _summarize([r for r in records if r["task"] == t]) for t in dict.fromkeys(r["task"] for r in records)}
    return {"summary": _summarize(records), "per_task": per_task, "records": records}
