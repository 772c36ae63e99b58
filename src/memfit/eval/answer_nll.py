"""A paired, low-noise proxy for task accuracy: each question's reference answer read teacher-forced
after the compressed context, its mean log-loss compared with the same under an uncompressed cache.

Task accuracy moves by about 2 points between runs of 100 samples, which hides most differences
between two compressed caches. Here every policy reads the same samples from one shared prefill,
and a question contributes its answer's log-loss under the policy minus under ``none`` (dNLL), so
the samples' own difficulty cancels: differences of a few hundredths of a nat are resolved by 40
samples. The KL divergence from ``none``'s next-token distributions over the answer is reported too.
The greedy answers a task scores can stay right or wrong while the log-loss moves, so a lower dNLL
is evidence, not a figure: accuracy is still what the targets are read on.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from memfit.api import LM, Context
from memfit.eval.tasks import Sample
from memfit.hfcompat import with_cache


@torch.no_grad()
def answer_logprobs(lm: LM, ctx: Context, question: str, answer_prefix: str | None,
                    answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [A, vocab] of the answer's positions (float32) and its token ids [A]: the
    question as ``ask`` feeds it, then the reference ``answers`` (joined by ", "), on a fork of ``ctx``."""
    q = lm.encode_question(question, answer_prefix)
    text = (" " if answer_prefix else "") + ", ".join(answers)
    ans = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([q + ans], device=lm.device)
    pos = torch.arange(ctx.num_tokens, ctx.num_tokens + ids.shape[1], device=lm.device).unsqueeze(0)
    cache = ctx.cache.fork(1)
    logits = lm.model(ids, position_ids=pos, **with_cache(lm.model, cache), use_cache=True).logits[0].float()
    return logits[len(q) - 1 : len(q) - 1 + len(ans)].log_softmax(-1), torch.tensor(ans, device=lm.device)


def answer_nll(lm: LM, samples: list[Sample], policies: list[str], progress: bool = True) -> dict:
    """Per policy (``none`` added first when missing): mean dNLL with its standard error, mean KL
    from ``none``, mean compression, per-task dNLL, and each question's values, over ``samples``."""
    pols = ["none", *[p for p in policies if p != "none"]]
    rows: dict[str, dict[str, list]] = {p: defaultdict(list) for p in pols}
    for s in tqdm(samples, desc="answer log-loss", unit="sample", disable=not progress):
        ctxs = lm.prefill_many(s.context, pols)
        for q in s.questions:
            ref = None
            for p, ctx in zip(pols, ctxs):
                lp, ans = answer_logprobs(lm, ctx, q.text, q.answer_prefix, list(q.answers))
                ref = lp if ref is None else ref
                r = rows[p]
                r["nll"].append(-lp.gather(1, ans[:, None]).mean().item())
                r["kl"].append((ref.exp() * (ref - lp)).sum(-1).mean().item())
                r["task"].append(s.task)
        for p, ctx in zip(pols, ctxs):
            rows[p]["compression"].append(ctx.compression)
    out = {}
    for p in pols:
        r = rows[p]
        d = [a - b for a, b in zip(r["nll"], rows["none"]["nll"])]
        per_task = defaultdict(list)
        for t, x in zip(r["task"], d):
            per_task[t].append(x)
        out[p] = {"dnll": statistics.fmean(d), "dnll_se": statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0,
                  "kl": statistics.fmean(r["kl"]), "nll": statistics.fmean(r["nll"]),
                  "compression": statistics.fmean(r["compression"]),
                  "per_task": {t: statistics.fmean(v) for t, v in per_task.items()},
                  "questions": len(d), "dnll_each": d}
    return out
