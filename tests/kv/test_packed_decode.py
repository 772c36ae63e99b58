"""Evicted, ragged, forked and stacked caches decode over their packed runs (the decode kernel's
path; on CPU its torch reference) exactly as over the dequantized tensors; static decode takes
them too. The kernels themselves are checked against the reference in tests/kernels."""

import math

import pytest
import torch

import memfit.kv.layer as layer_mod
from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.layer import CompressedLayer
from memfit.kv.quant import KIVI
from memfit.kv.static import GraphDecoder

RAGGED = "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16)"
RAGGED_ROTATED = "knorm(keep=0.5,heads=adaptive)+hadamard(bits=4,group=16,residual=16)"
RAGGED_META = "knorm(keep=0.5,heads=adaptive)+hadamard(bits=2,group=16,residual=16,meta_bits=8)"
POLICIES = [RAGGED, "knorm(keep=0.4,heads=global)+kivi(bits=2,group=16,residual=16)",
            "snapkv(keep=0.5)+kivi(bits=4,group=16,residual=16)", "kivi(bits=2,group=16,residual=16)",
            # pre-RoPE codes (the parent's): rotated at each token's position where they are read
            "kivi(bits=4,group=16,residual=16,pre_rope=true)",
            # 8-bit group scales and zeros, read as float16
            RAGGED_META,
            # rotated codes: the query rotated, each head's sinks read in 16-bit
            RAGGED_ROTATED, "hadamard(bits=2,group=16,residual=16)",
            # sparse outliers, added to the dequantized codes (keys: after RoPE where stored before it)
            "kivi(bits=2,group=16,residual=16,outliers=0.02)",
            "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16,outliers=0.02)",
            "kivi(bits=4,group=16,residual=16,pre_rope=true,outliers=0.02)"]


def packed_everywhere(monkeypatch) -> list:
    """The CUDA decode path (attend over the packed runs) on any device; returns a list that
    counts the packed attention calls."""
    calls = []
    real = layer_mod.decode_attention_runs
    monkeypatch.setattr(CompressedLayer, "fast_decode", lambda self, ks: (
        self.kernels and ks.shape[-2] == 1 and self.not_packed() is None))
    monkeypatch.setattr(layer_mod, "decode_attention_runs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _close(got, want):
    """Equal until the fork's window first spills (step 16). From then on the packed path has
    quantized the spilled tokens before the step attends (as the kernel path always has), the dense
    one after: that step differs by the quantization error, so the rest is compared layer by layer
    (:func:`_runs_hold_what_the_layer_stores`)."""
    torch.testing.assert_close(got[:15], want[:15], rtol=1e-4, atol=1e-5)


def _runs_hold_what_the_layer_stores(cache, rows):
    """Attention over a layer's packed runs equals attention over its dequantized storage."""
    from memfit.kernels.decode_attention import decode_attention_runs_reference

    for layer in cache.layers:
        k, v, mask = layer.materialize_masked(rows)
        k, v = k.expand(rows, -1, -1, -1).double(), v.expand(rows, -1, -1, -1).double()
        q = torch.randn(rows, 4, k.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        logits = torch.einsum("bhgd,bhnd->bhgn", q.reshape(rows, k.shape[1], -1, k.shape[-1]), k) / k.shape[-1] ** 0.5
        if mask is not None:
            logits = logits.masked_fill(~mask.expand(rows, -1, -1).unsqueeze(2), float("-inf"))
        want = torch.einsum("bhgn,bhnd->bhgd", logits.softmax(-1), v).reshape(rows, 4, -1)
        got = decode_attention_runs_reference(q, layer.runs(rows))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _decode(model, cache, feed):
    with torch.no_grad():
        return torch.stack([model(feed[:, i : i + 1], **with_cache(model, cache)).logits[:, -1]
                            for i in range(feed.shape[1])])


def _context(lm, policy, seed=0, n=200):
    ids = torch.randint(0, 250, (1, n), generator=torch.Generator().manual_seed(seed))
    return lm.prefill_ids(ids, policy).cache


@pytest.mark.parametrize("policy", POLICIES)
def test_forks_of_evicted_caches_decode_over_packed_runs_like_dense_attention(tiny_lm, policy, monkeypatch):
    cache = _context(tiny_lm, policy)
    assert all(layer.not_packed() is None for layer in cache.layers)
    feed = torch.randint(0, 250, (3, 40), generator=torch.Generator().manual_seed(1))  # past a window spill
    dense = _decode(tiny_lm.model, cache.fork(3), feed)
    calls = packed_everywhere(monkeypatch)
    got = _decode(tiny_lm.model, cache.fork(3).use_kernels(), feed)
    assert len(calls) == 40 * len(cache.layers)  # every step of every layer read the packed runs
    _close(got, dense)
    fork = cache.fork(3).use_kernels()
    _decode(tiny_lm.model, fork, feed)
    assert fork.layers[0].qk is not None  # the fork's own window spilled: its codes are a run too
    _runs_hold_what_the_layer_stores(fork, 3)


@pytest.mark.parametrize("policy", POLICIES[:2])
def test_a_masked_step_reads_the_ragged_parent_for_every_row_with_its_padding_hidden(tiny_lm, policy, monkeypatch):
    """A one-token step with an attention mask (questions batched with padding) leaves the kernel
    and dequantizes: a fork of 3 rows reads its one-row ragged parent, the padding masked (on the
    H200 this step failed: the parent was not expanded to the fork's rows)."""
    cache = _context(tiny_lm, policy)
    feed = torch.randint(0, 250, (3, 12), generator=torch.Generator().manual_seed(1))

    n = cache.get_seq_length()
    mask = torch.ones(3, n + 12, dtype=torch.long)
    mask[0, n : n + 2] = 0  # row 0: its question padded (the first two new tokens hidden)

    def masked(fork):
        with torch.no_grad():
            return torch.stack([tiny_lm.model(feed[:, i : i + 1], attention_mask=mask[:, : n + i + 1],
                                              **with_cache(tiny_lm.model, fork)).logits[:, -1] for i in range(12)])

    dense = masked(cache.fork(3))
    calls = packed_everywhere(monkeypatch)
    got = masked(cache.fork(3).use_kernels())
    assert calls == []  # every step dequantized (a mask): none went to the kernel
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)


def test_what_the_kernel_cannot_read_says_why(tiny_lm):
    for policy, why in (("kivi(bits=8)", "2 or 4 bits"),
                        ("knorm(keep=0.5)", "no KIVI quantizer")):
        cache = _context(tiny_lm, policy, n=80)
        layer = cache.layers[0]
        assert why in layer.not_packed()
        with pytest.raises(ValueError, match=why):  # nor does static decode take it
            cache.to_static(8)
        fork = CompressedLayer(KIVI(bits=4), parent=layer)  # itself readable: the parent is what is not
        fork.lazy_initialization(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
        assert fork.not_packed().startswith("a parent with")
    # keys and values of two widths: one run the (Gluon) kernel reads
    assert _context(tiny_lm, "hadamard(bits=4,value_bits=2)", n=80).layers[0].not_packed() is None


@pytest.mark.parametrize("quant", ["kivi(bits=4,group=32,residual=8)", "kivi(bits=4,group=32,residual=8,outliers=0.02)",
                                   "hadamard(bits=4,group=32,residual=8)",
                                   "hadamard(bits=4,value_bits=2,group=32,residual=8)"])
def test_static_decode_of_a_ragged_fork_equals_the_dynamic_cache(tiny_lm, monkeypatch, quant):
    packed_everywhere(monkeypatch)
    # key groups longer than the residual: the window holds up to 31 tokens before it spills
    cache = _context(tiny_lm, f"knorm(keep=0.5,heads=adaptive)+{quant}")
    feed = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(2))
    want = _decode(tiny_lm.model, cache.fork(2).use_kernels(), feed)  # the dynamic cache's packed path
    fork = cache.fork(2).use_kernels()
    # converted when its window holds more than residual + 1 tokens
    first = _decode(tiny_lm.model, fork, feed[:, :20])
    assert fork.layers[0].keys.shape[-2] == 20
    dec = GraphDecoder(tiny_lm.model, fork.to_static(max_new_tokens=40))
    got = torch.cat([first, torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(20, 40)])])
    assert fork.static_layers[0].nq > 0  # the fork's own window spilled while decoding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # back to a dynamic cache: it decodes on like a fork that decoded the same tokens dynamically
    fork.to_dynamic()
    more = torch.randint(0, 250, (2, 3), generator=torch.Generator().manual_seed(3))
    other = cache.fork(2).use_kernels()
    _decode(tiny_lm.model, other, feed)
    torch.testing.assert_close(_decode(tiny_lm.model, fork, more), _decode(tiny_lm.model, other, more),
                               rtol=1e-4, atol=1e-4)


def test_ragged_contexts_with_8_bit_grids_are_not_stacked_silently(tiny_lm):
    caches = [_context(tiny_lm, RAGGED_META, seed=s) for s in (4, 5)]
    with pytest.raises(ValueError, match="8-bit grids"):
        CompressedCache.stack(caches)


@pytest.mark.parametrize("policy", [RAGGED, RAGGED_ROTATED])
def test_stacked_contexts_decode_together_like_each_alone(tiny_lm, monkeypatch, policy):
    """Also rotated codes: every context's heads keep their own sinks."""
    calls = packed_everywhere(monkeypatch)
    caches = [_context(tiny_lm, policy, seed=s) for s in (4, 5, 6)]
    lens = [layer.ragged.lens[0].tolist() for layer in (c.layers[0] for c in caches)]
    assert len({tuple(x) for x in lens}) > 1  # the rows keep different counts per head
    feed = torch.randint(0, 250, (3, 20), generator=torch.Generator().manual_seed(7))
    alone = torch.cat([_decode(tiny_lm.model, c.fork(1).use_kernels(), feed[i : i + 1]) for i, c in enumerate(caches)], dim=1)
    stacked = CompressedCache.stack(caches).use_kernels()
    assert stacked.nbytes == sum(c.nbytes for c in caches)
    calls.clear()
    together = _decode(tiny_lm.model, stacked, feed)
    assert len(calls) == 20 * len(stacked.layers)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    _runs_hold_what_the_layer_stores(stacked, 3)
    tensors, state = stacked.to_state()  # a stacked cache stores and loads like any other
    back = CompressedCache.from_state(tensors, state)
    assert back.nbytes == stacked.nbytes and back.layers[0].ragged.rows == 3
    plain = "kivi(bits=2,group=16,residual=16)"
    with pytest.raises(ValueError, match="tokens against 200 in uniform storage"):
        CompressedCache.stack([_context(tiny_lm, plain), _context(tiny_lm, plain, n=150)])
    with pytest.raises(ValueError, match="different policies"):
        CompressedCache.stack([caches[0], _context(tiny_lm, "kivi(bits=2,group=16,residual=16)")])


def test_rotated_contexts_of_one_length_stack_with_their_sinks(tiny_lm):
    """Uniform rotated storage stacks row by row, each row its own sinks (a stacked batch then
    spills its windows as one, so its decoding is not compared with each context alone)."""
    caches = [_context(tiny_lm, "hadamard(bits=2,group=16,residual=16)", seed=s) for s in (4, 5)]
    stacked = CompressedCache.stack(caches)
    assert stacked.nbytes == sum(c.nbytes for c in caches)
    for i, c in enumerate(caches):
        torch.testing.assert_close(stacked.layers[0].qk.dequantize()[i : i + 1], c.layers[0].qk.dequantize())
    _runs_hold_what_the_layer_stores(stacked, 2)


def _cuda_lm():
    """A tiny random Llama on CUDA in bf16, head_dim 64, running memfit's attention."""
    from conftest import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.api import LM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    cfg._attn_implementation = "memfit"
    return LM(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval(), byte_tokenizer(), name="tiny-cuda")


def _attend_with(monkeypatch, on_kernel: bool, calls: list) -> None:
    """Packed decode steps attend with the kernels, or with their torch reference; ``calls`` counts them."""
    from memfit.kernels import decode_attention as kernels

    real = layer_mod.decode_attention_runs
    fn = real if on_kernel else (lambda q, r, scale=None, out_dtype=None, **k:
                                 kernels.decode_attention_runs_reference(q, r, scale).to(out_dtype))
    monkeypatch.setattr(layer_mod, "decode_attention_runs", lambda *a, **k: calls.append(1) or fn(*a, **k))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["kivi(bits=4,group=32,residual=32,pre_rope=true)",
                                    # sparse outliers, which the Triton kernel adds
                                    "kivi(bits=2,group=32,residual=32,outliers=0.01)",
                                    "kivi(bits=4,group=32,residual=32,pre_rope=true,outliers=0.01)",
                                    "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=32,residual=32,outliers=0.01)"])
def test_pre_rope_and_outlier_caches_decode_through_the_kernel_on_cuda(monkeypatch, policy):
    """A fork of a pre-RoPE cache, or of one with sparse outliers, reads its parent's codes and its own
    through the Triton kernel (RoPE put back, outliers added there), as the reference does; the cache
    itself decodes statically, replayed as a CUDA graph."""
    lm = _cuda_lm()
    ids = torch.randint(0, 250, (1, 1500), device="cuda")
    cache = lm.prefill_ids(ids, policy).cache
    assert all(layer.not_packed() is None for layer in cache.layers)
    feed = torch.randint(0, 250, (3, 40), device="cuda")
    calls, out = [], {}
    for on_kernel in (True, False):
        _attend_with(monkeypatch, on_kernel, calls)
        out[on_kernel] = _decode(lm.model, cache.fork(3).use_kernels(), feed)
    assert len(calls) == 2 * 40 * 2
    err = (out[True] - out[False]).abs().max().item()
    print(f"{policy}: logits max abs difference kernel vs reference {err:.3e}")
    assert err < 0.05 * out[False].abs().max().item()
    _attend_with(monkeypatch, True, calls)
    want = _decode(lm.model, lm.prefill_ids(ids, policy).cache.use_kernels(), feed[:1])  # dynamic, spilling
    first = _decode(lm.model, cache.use_kernels(), feed[:1, :1])
    dec = GraphDecoder(lm.model, cache.to_static(max_new_tokens=48))  # its spills take RoPE off, set outliers aside
    graphed = torch.cat([first, torch.stack([dec.step(feed[:1, i : i + 1]).clone() for i in range(1, 40)])])
    assert (graphed - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ragged_forked_and_stacked_caches_decode_through_the_kernels_on_cuda(monkeypatch):
    """The real kernels (CUDA, bf16, head_dim 64) against the reference on the same caches: a fork
    of a ragged context, stacked contexts, and the stacked cache replayed as CUDA graphs."""
    lm = _cuda_lm()
    policy = "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=32,residual=32)"
    caches = [lm.prefill_ids(torch.randint(0, 250, (1, 1500), device="cuda"), policy).cache for _ in range(3)]
    feed = torch.randint(0, 250, (3, 40), device="cuda")
    calls = []
    out = {}
    for on_kernel in (True, False):
        _attend_with(monkeypatch, on_kernel, calls)
        out[on_kernel] = (_decode(lm.model, caches[0].fork(3).use_kernels(), feed),
                          _decode(lm.model, CompressedCache.stack(caches).use_kernels(), feed))
    assert len(calls) == 2 * 2 * 40 * 2
    for got, want in zip(out[True], out[False]):
        err = (got - want).abs().max().item()
        print(f"logits max abs difference kernel vs reference {err:.3e}")
        assert err < 0.05 * want.abs().max().item()
    _attend_with(monkeypatch, True, calls)
    stacked = CompressedCache.stack(caches).use_kernels()
    first = _decode(lm.model, stacked, feed[:, :1])
    dec = GraphDecoder(lm.model, stacked.to_static(max_new_tokens=48))  # replayed as a CUDA graph
    graphed = torch.cat([first, torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(1, 40)])])
    assert (graphed - out[True][1]).abs().max() < 0.05 * out[True][1].abs().max()


def test_the_warm_up_runs_are_what_a_fork_reads(tiny_lm):
    """``warm_kernels`` (CUDA) compiles the kernels for these runs: here their reference attends."""
    from memfit.kernels.decode_attention import decode_attention_runs_reference

    for policy in (RAGGED, "kivi(bits=2,group=16,residual=16)"):
        cache = _context(tiny_lm, policy)
        steps = cache.warm_runs(4)
        assert len(steps) == 2 * len(cache.layers)  # every layer: evicted ones differ in length
        for q, runs in steps:
            assert torch.isfinite(decode_attention_runs_reference(q, runs)).all()
    assert _context(tiny_lm, "knorm(keep=0.5)").warm_runs(4) == []  # no quantizer: nothing the kernel reads


def _decode_at(model, cache, feed):
    """Decode steps with each row's own positions (contexts of different lengths)."""
    out = []
    with torch.no_grad():
        for i in range(feed.shape[1]):
            pos = cache.positions().unsqueeze(-1)
            out.append(model(feed[:, i : i + 1], position_ids=pos, **with_cache(model, cache)).logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("packed", [True, False])
def test_contexts_of_different_lengths_decode_together_at_their_own_positions(tiny_lm, monkeypatch, packed):
    if packed:
        packed_everywhere(monkeypatch)
    caches = [_context(tiny_lm, RAGGED, seed=s, n=n) for s, n in ((4, 150), (5, 200), (6, 260))]
    feed = torch.randint(0, 250, (3, 24), generator=torch.Generator().manual_seed(8))
    alone = torch.cat([_decode(tiny_lm.model, c.fork(1).use_kernels(packed), feed[i : i + 1])
                       for i, c in enumerate(caches)], dim=1)
    stacked = CompressedCache.stack(caches).use_kernels(packed)
    assert stacked.positions().tolist() == [150, 200, 260] and stacked.get_seq_length() == 260
    assert stacked.full_nbytes == sum(c.full_nbytes for c in caches)
    torch.testing.assert_close(_decode_at(tiny_lm.model, stacked, feed), alone, rtol=1e-4, atol=1e-5)
    assert stacked.positions().tolist() == [174, 224, 284]
    if packed:  # the same batch replayed step by step in fixed buffers
        again = CompressedCache.stack(caches).use_kernels()
        dec = GraphDecoder(tiny_lm.model, again.to_static(max_new_tokens=32))
        got = torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(feed.shape[1])])
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)
        tensors, state = stacked.to_state()
        assert CompressedCache.from_state(tensors, state).positions().tolist() == [174, 224, 284]


@pytest.mark.parametrize("spec", ["kvzip(keep=0.42)+kivi(bits=4,residual=32)", "snapkv(keep=0.3)+kivi(bits=2)",
                                  "kivi(bits=4)", "kivi(bits=4,pre_rope=true)"])
def test_a_policy_cache_without_a_model_stores_what_the_policy_keeps(spec):
    """``memfit bench attention -p`` times a layer built this way: random KV, compressed as a prefill
    would (evicting policies row by row, then stacked)."""
    from memfit.bench import policy_cache
    from memfit.kernels.decode_attention import decode_attention_runs_reference

    cache = policy_cache(spec, batch=2, kv_heads=2, q_heads=4, tokens=512, head_dim=64)
    layer = cache.layers[0]
    assert layer.not_packed() is None and cache.positions().tolist() == [512, 512]
    assert layer.nbytes < 0.5 * cache.full_nbytes  # quantized (and evicted where asked)
    if "kvzip" in spec:  # KVzip's heads are ragged: every row and head keeps its own count, in whole
        lens = layer.ragged.lens[0].tolist()  # key groups (each row's total less than a group under its budget)
        budget = 2 * 2 * math.ceil(0.42 * 512)
        assert all(n % 64 == 0 for n in lens) and budget - 2 * 64 < sum(lens) <= budget
    else:
        assert layer.stored_tokens() == (round(0.3 * 512) if "snapkv" in spec else 512)
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    assert torch.isfinite(decode_attention_runs_reference(q, layer.runs(2))).all()
    assert (layer.runs(2)[0].rope is not None) == ("pre_rope" in spec)  # a RoPE to put back: Llama-3.1's
