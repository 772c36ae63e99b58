"""Slow tests on the real model (SmolLM2-135M-Instruct, bundled GGUF)."""

import pytest

from memfit.bench import context_ids
from memfit.eval.demo import demo_document
from memfit.weights.quantize import float32_tensors

pytestmark = pytest.mark.slow


def test_kivi4_answers_the_capital_of_france(smollm2):
    doc, _ = demo_document(60, seed=3)
    context = "Paris is the capital of France.\n\n" + doc
    ctx = smollm2.prefill(context, "kivi(bits=4)")
    # the context is far longer than the 16-bit window: most of it really is 4-bit
    assert ctx.cache.layers[0].qk.num_tokens >= ctx.num_tokens - 128 - 63
    answer = smollm2.ask(ctx, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer, answer


def test_compression_figures_at_4k_tokens(smollm2):
    ids = context_ids(smollm2, 4096)
    ratios = {}
    for spec in ["kivi(bits=4)", "kivi(bits=2)", "snapkv(keep=0.25)+kivi(bits=2)"]:
        ctx = smollm2.prefill_ids(ids, spec)
        assert ctx.num_tokens == 4096
        assert ctx.full_nbytes == 4096 * 30 * 3 * 64 * 2 * 2
        ratios[spec] = ctx.nbytes / ctx.full_nbytes
    assert ratios["kivi(bits=4)"] <= 0.32
    assert ratios["kivi(bits=2)"] <= 0.22
    assert ratios["snapkv(keep=0.25)+kivi(bits=2)"] <= 0.08


def test_kivi4_gives_the_same_demo_answers_as_none(smollm2):
    doc, facts = demo_document()
    answers = {}
    for spec in ["none", "kivi(bits=4)"]:
        ctx = smollm2.prefill(doc, spec)
        answers[spec] = smollm2.ask(ctx, [f.question for f in facts], max_new_tokens=12,
                                    answer_prefix=None)
    correct = {s: [f.is_correct(a) for f, a in zip(facts, ans)] for s, ans in answers.items()}
    assert correct["kivi(bits=4)"] == correct["none"], answers


def test_batched_ask_matches_single_on_the_real_model(smollm2):
    # in float32 (bf16 -> fp32 -> bf16 is lossless): bf16 batched matmuls round differently from
    # single-row ones, which flips near-tied greedy choices of a 135M model
    with float32_tensors(smollm2.model):  # and back, buffers such as RoPE's keeping their own dtype
        doc, facts = demo_document(40, seed=1)
        ctx = smollm2.prefill(doc, "snapkv(keep=0.5)+kivi(bits=4)")
        qs = [f.question for f in facts[:4]]
        batch = smollm2.ask(ctx, qs, max_new_tokens=8)
        single = [smollm2.ask(ctx, q, max_new_tokens=8) for q in qs]
    assert batch == single
