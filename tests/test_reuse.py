"""Documents reused anywhere: position-independent entries and selective recompute (memfit.reuse)."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, tiny_qwen

import memfit.reuse
from memfit.api import LM
from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.store import open_store

PARTS = ["Be brief.", "The red box holds seven keys and a map.", "A cat sat on the mat all day long.",
         "Numbers: 3 1 4 1 5 9 2 6."]


def _max_err(a, b, layers=None) -> float:
    pairs = list(zip(a.cache.layers, b.cache.layers))
    pairs = pairs if layers is None else [pairs[i] for i in layers]
    return max(max((x.materialize()[0] - y.materialize()[0]).abs().max().item(),
                   (x.materialize()[1] - y.materialize()[1]).abs().max().item()) for x, y in pairs)


@pytest.fixture(params=["llama", "qwen"])
def lm(request, tokenizer) -> LM:
    model = tiny_llama(torch.float64, layers=3) if request.param == "llama" else tiny_qwen(torch.float64)
    return LM(model, tokenizer, name=f"tiny-{request.param}")


@pytest.mark.parametrize("causal", [True, False])
def test_recompute_all_is_a_full_prefill(lm, monkeypatch, causal):
    monkeypatch.setattr(memfit.reuse, "BLOCK", 7)  # several blocks per layer call
    if not causal:  # rows 0..n-1 in masked blocks, not one call with the causal kernel
        monkeypatch.setattr(memfit.reuse, "CAUSAL", 0)
    ids, spans = lm.encode_parts(PARTS)
    assert len(spans) == 3 and spans[0][0] > 0 and spans[-1][1] == ids.shape[1]
    full = lm.prefill_ids(ids, "none")
    ctx = lm.prefill_parts(PARTS, "none", recompute=1.0)
    assert torch.equal(ctx.token_ids, ids)
    assert _max_err(ctx, full) < 1e-9
    # the prompt's last token (here a document's) is always computed: its logits start the answer
    assert ctx.meta["reuse"]["recomputed"] == ctx.meta["reuse"]["reused_tokens"] == sum(b - a for a, b in spans) - 1
    assert (ctx.logits - full.logits).abs().max() < 1e-9
    assert lm.ask(ctx, "Which box?", max_new_tokens=8) == lm.ask(full, "Which box?", max_new_tokens=8)
    assert lm.generate(ctx, [[]], max_new_tokens=6) == lm.generate(full, [[]], max_new_tokens=6)


def test_naive_concatenation_moves_keys_exactly(lm, tmp_path):
    """Stored documents placed elsewhere: layer 0's KV depends only on each token and its position,
    so after the RoPE move it equals a full prefill's; deeper layers differ (the documents never
    saw each other), and recomputing more tokens brings them closer."""
    store = open_store(f"file://{tmp_path}")
    for doc in PARTS[1:]:
        lm.prefill(doc, "none", store=store, reuse="anywhere")
    parts = [PARTS[0], PARTS[3], PARTS[1], PARTS[2]]  # another order, another system prompt
    full = lm.prefill_ids(lm.encode_parts(parts)[0], "none")
    naive = lm.prefill_parts(parts, "none", store=store, recompute=0.0)
    assert naive.meta["reuse"]["documents"] == ["hit"] * 3
    assert _max_err(naive, full, layers=[0]) < 1e-5  # the move computes in float32
    errs = [_max_err(lm.prefill_parts(parts, "none", store=store, recompute=f), full) for f in (0.0, 0.5, 1.0)]
    assert errs[0] > errs[1] >= errs[2] and errs[2] < 1e-9  # (a 2-layer model is exact once layer 1 is)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_assembled_logits_are_the_last_token_over_the_assembled_kv(lm, tmp_path, fraction):
    """The logits an assembly returns are what feeding its last token over the rest of the
    assembled KV gives: the last row reads every key before it, at its own position."""
    store = open_store(f"file://{tmp_path}")
    parts = [PARTS[0], PARTS[3], PARTS[1], PARTS[2]]
    ids, spans = lm.encode_parts(parts)
    ids = torch.cat([ids, torch.tensor([[7, 9, 11]])], dim=1)  # a question after the documents
    ctx = lm.prefill_assembled(ids, spans, "none", store=store, recompute=fraction)
    rest = CompressedCache.from_state(*ctx.cache.to_state()).truncate_(ids.shape[1] - 1)
    pos = torch.tensor([[ids.shape[1] - 1]])
    ref = lm.model(ids[:, -1:], position_ids=pos, **with_cache(lm.model, rest), use_cache=True).logits[:, -1]
    assert ctx.logits.shape == (1, lm.model.config.vocab_size)
    assert (ctx.logits - ref.float()).abs().max() < 1e-6  # (logits are kept in float32)


def test_row_groups_cover_the_rows_and_read_only_the_keys_they_see(monkeypatch):
    monkeypatch.setattr(memfit.reuse, "GROUP_ROWS", 3)
    rows = torch.tensor([0, 1, 2, 3, 9, 10, 30, 31, 32, 40, 41, 63])
    parts = memfit.reuse._parts(rows, torch.float32, n_rep=3)
    assert [(a, b, seen) for a, b, seen, _ in parts] == [(0, 3, 3), (3, 6, 11), (6, 9, 33), (9, 12, 64)]
    for a, b, seen, mask in parts:  # each query head's rows one after another, the same mask
        assert mask.shape == (1, 1, 3 * (b - a), seen)
        want = torch.arange(seen) <= rows[a:b, None]
        for h in range(3):
            assert torch.equal(mask[0, 0, h * (b - a) : (h + 1) * (b - a)] == 0, want)
    assert memfit.reuse._parts(rows[:5], torch.float32, n_rep=3) is None  # too few rows to gain


def test_attention_in_row_groups_equals_one_masked_call(lm, tmp_path, monkeypatch):
    store = open_store(f"file://{tmp_path}")
    for doc in PARTS[1:]:
        lm.prefill(doc, "none", store=store, reuse="anywhere")
    parts = [PARTS[0], PARTS[2], PARTS[3], PARTS[1]]
    monkeypatch.setattr(memfit.reuse, "GROUP_ROWS", 4)
    grouped = lm.prefill_parts(parts, "none", store=store, recompute=0.5)
    monkeypatch.setattr(memfit.reuse, "GROUPS", 1)
    one = lm.prefill_parts(parts, "none", store=store, recompute=0.5)
    assert grouped.meta["reuse"]["recomputed"] > 8
    assert _max_err(grouped, one) < 1e-9


def test_document_entries_are_their_own_key_space(tiny_lm, tmp_path):
    store = open_store(f"file://{tmp_path}")
    plain = tiny_lm.prefill(PARTS[1], "none", store=store)
    anywhere = tiny_lm.prefill(PARTS[1], "none", store=store, reuse="anywhere")
    assert len(store.keys()) == 2  # a prefix entry and a document entry, never read for one another
    assert anywhere.meta["reuse"]["documents"] == ["miss"] and anywhere.meta["reuse"]["recomputed"] == 0
    assert _max_err(plain, anywhere) < 1e-9  # behind the default opening, a document is its own prefill
    again = tiny_lm.prefill(PARTS[1], "none", store=store, reuse="anywhere")
    assert again.meta["reuse"]["documents"] == ["hit"] and len(store.keys()) == 2
    # where it was stored, with a question after it: the question is computed, nothing recomputed
    ids, spans = tiny_lm.encode_parts([None, PARTS[1]])
    ids = torch.cat([ids, torch.tensor([tiny_lm.encode_question("Which box?")])], dim=1)
    asked = tiny_lm.prefill_assembled(ids, spans, "none", store=store, recompute=0.5)
    assert asked.meta["reuse"]["documents"] == ["hit"] and asked.meta["reuse"]["recomputed"] == 0
    assert _max_err(asked, tiny_lm.prefill_ids(ids, "none")) < 1e-9


def test_quantized_and_kvzip_policies_compose(tiny_lm, tmp_path):
    store = open_store(f"file://{tmp_path}")
    q = tiny_lm.prefill_parts(PARTS, "kivi(bits=4,residual=8)", store=store, recompute=0.5)
    assert q.nbytes < tiny_lm.prefill_parts(PARTS, "none", store=store, recompute=0.5).nbytes
    z = tiny_lm.prefill_parts(PARTS, "kvzip(keep=0.5)+kivi(bits=4,residual=8)", store=store, recompute=0.5)
    assert z.meta["reuse"]["documents"] == ["hit"] * 3  # documents store the quantizer alone: shared by both
    assert z.nbytes < q.nbytes
    assert isinstance(tiny_lm.ask(z, "Which box?", max_new_tokens=4), str)


def test_anchors_rebuild_a_document_seen_behind_the_same_prefix(tmp_path):
    """KVCOMM anchors: the offsets a document showed behind a prefix (here recomputed in full) are
    applied, instead of a recompute, the next time it comes behind that prefix; behind another
    prefix no anchor is close and its tokens are recomputed (and a new anchor kept)."""
    from memfit.reuse import AnchorPool

    lm = LM(tiny_llama(torch.float64, layers=4), byte_tokenizer(), name="tiny-4")
    store, pool = open_store(f"file://{tmp_path}"), AnchorPool()
    parts, other = ["Be brief and exact.", PARTS[1] * 3], ["You answer questions.", PARTS[1] * 3]
    full = lm.prefill_ids(lm.encode_parts(parts)[0], "none")
    first = lm.prefill_parts(parts, "none", store=store, recompute=1.0, anchors=pool)
    assert first.meta["reuse"]["anchored"] == [False] and _max_err(first, full) < 1e-9
    again = lm.prefill_parts(parts, "none", store=store, recompute=0.05, anchors=pool)
    assert again.meta["reuse"]["anchored"] == [True] and again.meta["reuse"]["recomputed"] == 0
    plain = lm.prefill_parts(parts, "none", store=store, recompute=0.05)
    assert _max_err(again, full) < 1e-3 < _max_err(plain, full)  # offsets kept in float16
    elsewhere = lm.prefill_parts(other, "none", store=store, recompute=0.05, anchors=pool)
    assert elsewhere.meta["reuse"]["anchored"] == [False] and elsewhere.meta["reuse"]["recomputed"] > 0
    assert len(pool._anchors[first.meta["reuse"]["keys"][0]]) == 2


def test_pre_rope_documents_rotate_on_read(tiny_lm, tmp_path):
    """A pre-RoPE policy stores a document's keys at positions 0.. (true pre-RoPE keys to quantize)
    and rotates them to wherever the document is placed: layer 0, exact up to 8-bit codes."""
    store = open_store(f"file://{tmp_path}")
    spec = "kivi(bits=8,group=16,residual=8,pre_rope=true)"
    parts = [PARTS[0], PARTS[3], PARTS[1]]
    full = tiny_lm.prefill_ids(tiny_lm.encode_parts(parts)[0], "none")
    naive = tiny_lm.prefill_parts(parts, spec, store=store, recompute=0.0)
    assert 0 < _max_err(naive, full, layers=[0]) < 0.05
    entry = store.get_entry(naive.meta["reuse"]["keys"][0])
    assert entry.manifest["start"] == 0 and "rope.inv_freq" in entry.tensors


def test_bad_input_is_named(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="recompute"):
        tiny_lm.prefill_parts(PARTS, recompute=1.5)
    with pytest.raises(ValueError, match="at least one document"):
        tiny_lm.prefill_parts(["system only"])
    with pytest.raises(TypeError, match="document"):
        tiny_lm.prefill_parts([None, ""])
    with pytest.raises(ValueError, match="queries"):
        tiny_lm.prefill_parts(PARTS, "snapkv(keep=0.5)")
    with pytest.raises(ValueError, match="reuse must be"):
        tiny_lm.prefill(PARTS[1], reuse="elsewhere")
    with pytest.raises(ValueError, match="give a store"):
        tiny_lm.prefill(PARTS[1], reuse="anywhere")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_assembly_on_cuda_matches_a_full_prefill(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(memfit.reuse, "BLOCK", 7)
    lm = LM(tiny_llama(torch.float32, layers=3).cuda(), tokenizer, name="tiny-cuda")
    ids, _ = lm.encode_parts(PARTS)
    full = lm.prefill_ids(ids, "none")
    ctx = lm.prefill_parts(PARTS, "none", store=f"file://{tmp_path}", recompute=1.0)
    assert _max_err(ctx, full) < 1e-4 and (ctx.logits - full.logits).abs().max() < 1e-4
    assert lm.generate(ctx, [[]], 6) == lm.generate(full, [[]], 6)
    naive = lm.prefill_parts(PARTS, "kivi(bits=4,residual=8)", store=f"file://{tmp_path}", recompute=0.0)
    assert isinstance(lm.ask(naive, "Which box?", max_new_tokens=4), str)
    monkeypatch.setattr(memfit.reuse, "CAUSAL", 0)  # rows 0..n-1 in masked blocks too
    assert _max_err(lm.prefill_parts(PARTS, "none", store=f"file://{tmp_path}", recompute=1.0), full) < 1e-4
    half = lm.prefill_parts(PARTS, "none", store=f"file://{tmp_path}", recompute=0.5)  # scattered rows, masked
    monkeypatch.setattr(memfit.reuse, "BLOCK", 1024)  # the same rows in one block
    one = lm.prefill_parts(PARTS, "none", store=f"file://{tmp_path}", recompute=0.5)
    assert half.meta["reuse"]["recomputed"] == one.meta["reuse"]["recomputed"] > 0 and _max_err(half, one) < 1e-4
