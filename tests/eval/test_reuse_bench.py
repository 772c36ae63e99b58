"""memfit bench reuse on a tiny model: every variant answers the same questions from the same tokens,
and a full recompute reads as a full prefill."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from memfit.api import LM
from memfit.eval.reuse import bench_agents, bench_documents
from memfit.store import open_store


def test_documents_and_agents_benches_compare_variants_on_the_same_tokens(tokenizer, tmp_path):
    tiny_lm = LM(tiny_llama(torch.float64, layers=4), tokenizer, name="tiny-4")  # layers past the two exact ones
    store = open_store(f"file://{tmp_path}")
    docs = bench_documents(tiny_lm, store, samples=2, docs=2, pool=3, doc_tokens=96, fractions=(0.0, 1.0),
                           max_new_tokens=4, repeats=2)
    # each context built twice, the fastest build timed
    assert all(len(r["builds_s"]) == 2 and r["context_s"] == min(r["builds_s"]) for r in docs["records"])
    assert set(docs["summary"]) == {"full", "naive", "recompute=1"}
    by_sample = {}
    for r in docs["records"]:
        by_sample.setdefault(r["sample"], set()).add(r["tokens"])
    assert all(len(t) == 1 for t in by_sample.values())  # one token sequence per sample
    assert docs["summary"]["naive"]["recomputed_tokens"] == 0
    # a full recompute answers as the full prefill does; naive concatenation moves the answer
    assert docs["summary"]["full"]["answer_kl"] == 0.0
    assert docs["summary"]["recompute=1"]["answer_kl"] < 1e-9 < docs["summary"]["naive"]["answer_kl"]
    agents = bench_agents(tiny_lm, store, samples=1, agents=3, text_tokens=256, prefix_tokens=40,
                          fractions=(0.0, 1.0), max_new_tokens=4, repeats=2)
    # the anchored build once: its pool learns from every build
    assert all((r["builds_s"] is None) == (r["variant"] in ("anchors", "stores")) for r in agents["records"])
    later = agents["summary"]["agents_2_on"]
    assert set(later) == {"full", "naive", "recompute=1", "anchors"} and later["full"]["n"] == 2
    assert later["recompute=1"]["kv_error"] < 1e-9 < later["naive"]["kv_error"]
    assert later["recompute=1"]["answer_kl"] < 1e-9 < later["naive"]["answer_kl"]
    assert set(agents["summary"]["agent_1"]) == {"full", "stores"}


def test_a_store_that_loses_the_documents_is_an_error_not_a_timing(tokenizer):
    tiny_lm = LM(tiny_llama(torch.float64, layers=4), tokenizer, name="tiny-4")
    small = open_store("mem://?max_bytes=1")  # keeps only the newest entry
    with pytest.raises(RuntimeError, match="did not return"):
        bench_documents(tiny_lm, small, samples=1, docs=2, pool=3, doc_tokens=96, fractions=(0.0,), max_new_tokens=2)


def test_split_text_cuts_at_sentence_ends_into_about_equal_pieces():
    from memfit.eval.reuse import split_text

    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = split_text(text, 4, lambda t: len(t.split()))
    assert len(pieces) == 4 and " ".join(pieces) == text
    assert all(p.endswith(".") for p in pieces)
    sizes = [len(p.split()) for p in pieces]
    assert max(sizes) - min(sizes) <= 10
    assert split_text("One sentence only.", 4, len) == ["One sentence only."]


def test_split_tasks_bench_reads_a_full_recompute_as_the_full_prefill(tokenizer, tmp_path):
    from memfit.eval.reuse import bench_split_tasks

    tiny_lm = LM(tiny_llama(torch.float64, layers=4), tokenizer, name="tiny-4")
    out = bench_split_tasks(tiny_lm, open_store(f"file://{tmp_path}"), ["niah_single", "documents_qa"], length=300,
                            samples=1, fractions=(0.0, 1.0), max_new_tokens=4)
    assert set(out["per_task"]) == {"niah_single", "documents_qa"}
    summary = out["summary"]
    assert summary["recompute=1"]["answer_kl"] < 1e-9 < summary["naive"]["answer_kl"]
    assert summary["naive"]["recomputed_tokens"] == 0 < summary["recompute=1"]["recomputed_tokens"]
