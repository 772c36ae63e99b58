"""Tiered KV (device / host / disk pages, attention-aware selection): exactness, the bound, tiers, errors."""

import os

import pytest
import torch
from transformers import DynamicCache

from conftest import byte_tokenizer, tiny_llama
from memfit.api import LM
from memfit.hfcompat import with_cache
from memfit.kv.tiered import TierConfig, TieredCache, TieredLayer, TierReadError, _Codec

CONTEXT = 700


@pytest.fixture(scope="module")
def model():
    return tiny_llama(torch.float64, layers=3)


@pytest.fixture(scope="module")
def prefilled(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, CONTEXT))
    ref = DynamicCache()
    model(ids, **with_cache(model, ref), use_cache=True)
    return [lay.keys.clone() for lay in ref.layers], [lay.values.clone() for lay in ref.layers]


def _decode(model, cache, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(2)
    nxt = torch.randint(0, 256, (2, steps))
    out = []
    for t in range(steps):
        pos = torch.full((2, 1), CONTEXT + t)
        out.append(model(nxt[:, t : t + 1], position_ids=pos, **with_cache(model, cache), use_cache=True).logits)
    return out


def _reference(model, prefilled, steps: int = 5) -> list[torch.Tensor]:
    ref = DynamicCache()
    for i, (k, v) in enumerate(zip(*prefilled)):
        ref.update(k.clone(), v.clone(), i)
    return _decode(model, ref, steps)


def _offload(prefilled, cfg: TierConfig) -> TieredCache:
    keys, values = prefilled
    return TieredCache.offload([k.clone() for k in keys], [v.clone() for v in values], cfg)


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_every_page_selected_is_full_attention(model, prefilled):
    cache = _offload(prefilled, TierConfig(bits=None, device=1e12))  # room for every page: selection picks them all
    layer = cache.layers[0]
    assert layer.slots == layer.n_pages > 0
    out = _decode(model, cache)
    assert _close(out, _reference(model, prefilled)) < 1e-9
    assert cache.steps == 5  # each step went through selection, not a fallback
    assert cache.fetched_pages == 3 * 2 * 2 * layer.n_pages  # fetched once (layers x rows x heads), then kept
    cache.close()


def test_fetch_all_baseline_is_full_attention(model, prefilled):
    cache = _offload(prefilled, TierConfig(bits=None, device=0.2, fetch="all", dense=0))
    assert _close(_decode(model, cache), _reference(model, prefilled)) < 1e-9
    assert cache.steps == 5
    cache.close()


def test_small_budget_attends_to_chosen_pages_only(model, prefilled):
    cfg = TierConfig(bits=None, device=0.3, page=16, window=32, dense=0)
    cache = _offload(prefilled, cfg)
    layer = cache.layers[0]
    assert 0 < layer.slots < layer.n_pages
    full = sum(2 * k.numel() * k.element_size() for k in prefilled[0])
    assert cache.device_bytes <= cfg.device * full
    _decode(model, cache, steps=1)
    # the pool holds exactly the pages the bound ranks highest for the step's query
    assert bool((layer.slot_page >= 0).all())
    assert bool((layer.where >= 0).sum(-1).eq(layer.slots).all())
    cache.close()


def test_dense_first_layers_and_budget(prefilled):
    keys, _ = prefilled
    full = sum(2 * k.numel() * k.element_size() for k in keys)
    cache = _offload(prefilled, TierConfig(bits=None, device=0.6, page=16, window=32, dense=1))
    first, rest = cache.layers[0], cache.layers[1]
    assert first.slots == first.n_pages and 0 < rest.slots < rest.n_pages  # the first layer keeps every page
    assert cache.device_bytes <= 0.6 * full
    cache.close()
    with pytest.raises(ValueError, match="does not hold the window"):
        _offload(prefilled, TierConfig(bits=None, device=0.05, page=16, window=32))
    with pytest.raises(ValueError, match="does not hold the window"):  # every layer dense: all their pages
        _offload(prefilled, TierConfig(bits=None, device=0.6, page=16, window=32, dense=3))


def test_bound_never_underestimates():
    gen = torch.Generator().manual_seed(0)
    b, h, g, n, p, d = 2, 3, 4, 9, 8, 16
    keys = torch.randn(b, h, n * p + 5, d, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(b, h, n * p + 5, d, generator=gen, dtype=torch.float64)
    layer = TieredLayer(keys, values, TierConfig(bits=None, page=p, window=0), 2, n, torch.device("cpu"), None, None)
    for _ in range(20):
        q = torch.randn(b, h * g, 1, d, generator=gen, dtype=torch.float64) * 2
        bound = layer.bound(q)  # [B, H, N]
        pages = keys[:, :, : n * p].reshape(b, h, n, p, d)
        qg = q.view(b, h, g, d)
        best = torch.einsum("bhgd,bhnpd->bhgnp", qg, pages).amax(-1).amax(2)  # best key of each page, any head
        assert bool((bound >= best - 1e-9).all())
        assert bool((bound <= best.abs().amax() * 10).all())  # and it is a bound, not infinity


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_disk_tier_context_4x_host_budget(model, prefilled, tmp_path, bits):
    cfg = TierConfig(bits=bits, device=0.5, page=16, window=32, dense=0)
    host = _offload(prefilled, cfg)
    stored = host.host_bytes  # every page's record
    disk = _offload(prefilled, TierConfig(bits=bits, device=0.5, page=16, window=32, dense=0, host_bytes=stored // 4,
                                          disk_dir=str(tmp_path)))
    assert 0 < disk.layers[0].host_pages < disk.layers[0].n_pages
    assert disk.host_bytes <= stored // 4 and disk.disk_bytes > 3 * disk.host_bytes  # the context: > 4x the host budget
    assert _close(_decode(model, disk), _decode(model, host)) == 0.0  # the same pages, read from disk
    assert any(tmp_path.iterdir())
    disk.close()
    host.close()


@pytest.mark.parametrize("fault", ["missing", "short"])
def test_disk_fault_is_a_clear_error(model, prefilled, tmp_path, fault):
    cache = _offload(prefilled, TierConfig(bits=None, device=1e12, page=16, window=32, host_bytes=0, disk_dir=str(tmp_path)))
    path = cache.layers[0].disk.path
    if fault == "missing":
        os.remove(path)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(TierReadError, match=str(path.name)):
        _decode(model, cache, steps=1)
    cache.close()


def test_bad_input_is_named(prefilled):
    keys, values = prefilled
    with pytest.raises(ValueError, match="device budget"):
        TierConfig(bits=None, device=0)
    with pytest.raises(ValueError, match="fetch"):
        TierConfig(fetch="some")
    with pytest.raises(ValueError, match="pin"):
        TierConfig(pin=-1)
    with pytest.raises(ValueError, match="layer 1"):
        TieredCache.offload(keys, [values[0], values[1][:, :, :10], values[2]])


def test_ask_on_an_offloaded_context(tokenizer):
    lm = LM(tiny_llama(torch.float64), byte_tokenizer(), name="t")
    ctx = lm.prefill("The quick brown fox jumps over the lazy dog. " * 30)
    full = lm.offload(ctx, device=1e12, bits=None)
    questions = ["what?", "who is it?"]  # different lengths: rows are left-padded, decode steps masked
    assert lm.ask(full, questions, max_new_tokens=8) == lm.ask(ctx, questions, max_new_tokens=8)
    assert full.cache.steps > 0  # generated tokens went through selection (the padded rows' masks too)
    small = lm.offload(ctx, device=0.3, page=16, window=32, dense=0)
    assert small.cache.full_nbytes == ctx.full_nbytes
    esize = small.cache.layers[0].keys.element_size()  # the budget is a fraction of the KV as stored
    assert small.cache.device_bytes <= 0.3 * ctx.full_nbytes * esize / 2
    assert isinstance(lm.ask(small, "what?", max_new_tokens=4), str)
    with pytest.raises(TypeError, match="TierConfig"):
        lm.offload(ctx, TierConfig(), device=0.5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_pages_round_trip(bits):
    gen = torch.Generator().manual_seed(3)
    p, d = 16, 32
    k = torch.randn(2, 3, 5, p, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 5, p, d, generator=gen, dtype=torch.float64)
    codec = _Codec(bits, p, d, d, torch.float64, vgroup=16)
    kmin, kmax = k.amin(3), k.amax(3)
    rec = codec.encode(k, v, kmin, kmax)
    assert rec.dtype == torch.uint8 and rec.shape == (2, 3, 5, codec.record_bytes)
    assert codec.record_bytes == 2 * p * d * bits // 8 + 2 * 2 * p * (d // 16)  # codes + value scale/zero
    k2, v2 = codec.decode(codec.split(rec), *codec.key_range(kmin, kmax))
    kstep = (kmax - kmin).unsqueeze(3) / (2**bits - 1) * (1 + 1e-3)  # the range is rounded to float16
    assert bool(((k2 - k).abs() <= kstep / 2 + 2e-3).all())  # each key within half a step of its channel's range
    vg = v.reshape(2, 3, 5, p, 2, 16)
    vstep = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / (2**bits - 1)
    assert bool(((v2.reshape(vg.shape) - vg).abs() <= vstep / 2 + 1e-3).all())  # float16 scale and zero
    plain = _Codec(None, p, d, d, torch.float64, vgroup=16)
    assert all(torch.equal(a, b) for a, b in zip(plain.decode(plain.split(plain.encode(k, v, kmin, kmax))), (k, v)))


def test_compressed_pages_attend_exactly_over_their_dequantized_kv(model, prefilled, tmp_path):
    cfg = TierConfig(bits=4, device=1e12, page=16, window=32)
    cache = _offload(prefilled, cfg)
    # the reference: the same KV with every page replaced by what its record decodes to
    keys, values = [], []
    for lay, k, v in zip(cache.layers, *prefilled):
        n, p = lay.n_pages, cfg.page
        dk, dv = lay.codec.decode(lay.codec.split(lay.host_rec), *lay.codec.key_range(lay.kmin, lay.kmax))
        keys.append(torch.cat([dk.reshape(2, k.shape[1], n * p, -1), k[:, :, n * p :]], dim=2))
        values.append(torch.cat([dv.reshape(2, v.shape[1], n * p, -1), v[:, :, n * p :]], dim=2))
        assert (dk.reshape(keys[-1][:, :, : n * p].shape) - k[:, :, : n * p]).abs().max() > 0  # really quantized
    out = _decode(model, cache)
    assert _close(out, _reference(model, (keys, values))) < 1e-9
    # the same records from disk
    disk = _offload(prefilled, TierConfig(bits=4, device=1e12, page=16, window=32, host_bytes=0, disk_dir=str(tmp_path)))
    assert _close(_decode(model, disk), out) == 0.0
    cache.close()
    disk.close()


def test_compressed_pages_hold_more_in_the_same_budget(prefilled):
    kv = tuple([t.bfloat16() for t in ts] for ts in prefilled)  # the budget is a fraction of the 16-bit KV
    full = sum(2 * k.numel() * k.element_size() for k in kv[0])
    plain = _offload(kv, TierConfig(bits=None, device=0.3, page=16, window=32, dense=0))
    packed = _offload(kv, TierConfig(bits=4, device=0.3, page=16, window=32, dense=0))
    assert packed.layers[-1].slots >= 2.5 * plain.layers[-1].slots
    assert 3 * packed.host_bytes < plain.host_bytes
    for dense in (0, 1):  # every byte on the device counted, within the budget and near it
        packed = _offload(kv, TierConfig(bits=4, device=0.3, page=16, window=32, dense=dense))
        assert 0.25 * full < packed.device_bytes <= 0.3 * full
    with pytest.raises(ValueError, match="bits"):
        TierConfig(bits=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (pinned pages read by the device)")
@pytest.mark.parametrize("bits", [None, 4])
def test_gpu_gathers_pinned_pages_itself(prefilled, bits):
    keys, values = prefilled
    cfg = TierConfig(bits=bits, device=0.3, page=16, window=32, dense=0)
    cpu = TieredCache.offload(keys, values, cfg)
    gpu = TieredCache.offload(keys, values, cfg, "cuda")
    lay = gpu.layers[1]
    assert lay.host_view is not None and lay.host_view.device.type == "cuda"
    assert torch.equal(lay.host_view.cpu(), cpu.layers[1].host_rec)  # the device reads the host's page bytes
    # pinned at exactly the pages' bytes (torch's pinned allocator would round up to a power of two)
    assert lay.host_rec.is_pinned()
    assert lay._pinned.buf.numel() == lay.host_rec.numel() == gpu.host_bytes // len(gpu.layers)
    q = torch.randn(2, 4 * keys[0].shape[1], 1, keys[0].shape[-1], dtype=torch.float64)
    for a, b in zip(cpu.layers, gpu.layers):
        assert (a.attend(q, 0.1).cpu() - b.attend(q.cuda(), 0.1).cpu()).abs().max() < 1e-9
        assert torch.equal(a.slot_page.sort(-1).values, b.slot_page.cpu().sort(-1).values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the packed-KV kernel)")
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_kernel_attends_over_the_packed_pool(bits):
    gen = torch.Generator(device="cuda").manual_seed(4)
    keys = torch.randn(2, 2, 1100, 64, generator=gen, device="cuda").bfloat16()
    values = torch.randn(2, 2, 1100, 64, generator=gen, device="cuda").bfloat16()
    cache = TieredCache.offload([keys], [values], TierConfig(bits=bits, device=0.4, page=32, window=64, dense=0))
    lay = cache.layers[0]
    q = torch.randn(2, 6, 1, 64, generator=gen, device="cuda").bfloat16()
    assert lay._kernel_reads_pool(q)
    packed = lay.attend(q, 0.125)  # the kernel over the pool's codes
    sdpa = lay.attend(q, 0.125, torch.ones(2, 1, 1, lay.keys.shape[2], dtype=torch.bool, device="cuda"))  # dequantized
    assert lay.stats["fetched"] == 2 * 2 * lay.slots  # the second step chose the same pages
    assert (packed.float() - sdpa.float()).abs().max() < 2e-2
    cache.close()


@pytest.mark.parametrize("bits", [4, 8])
def test_static_decode_equals_dynamic(model, prefilled, bits):
    from memfit.kv.static import GraphDecoder

    cfg = TierConfig(bits=bits, device=0.4, page=16, window=32, dense=1)
    dyn = _offload(prefilled, cfg)
    want = _decode(model, dyn)
    static = _offload(prefilled, cfg).to_static(8)
    dec = GraphDecoder(model, static, graph=False)
    torch.manual_seed(2)
    nxt = torch.randint(0, 256, (2, 5))  # the tokens _decode feeds
    got = [dec.step(nxt[:, t : t + 1]).clone() for t in range(5)]
    assert max((g - w[:, -1]).abs().max().item() for g, w in zip(got, want)) < 1e-5
    assert static.steps == 5 and static.fetched_pages == dyn.fetched_pages
    assert static.get_seq_length() == CONTEXT + 5
    static.to_dynamic()
    assert static.layers[0].keys.shape[2] == dyn.layers[0].keys.shape[2]
    with pytest.raises(ValueError, match="16-bit pages"):
        _offload(prefilled, TierConfig(bits=None, device=1e12, page=16, window=32)).to_static(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_graph_replay_equals_eager_static_steps(bits):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.kv.static import GraphDecoder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    cfg._attn_implementation = "memfit"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 259, (2, 1500), device="cuda")
    ref = DynamicCache()
    with torch.no_grad():
        model(ids, **with_cache(model, ref), use_cache=True)
    keys, values = [lay.keys for lay in ref.layers], [lay.values for lay in ref.layers]
    tc = TierConfig(bits=bits, device=0.3, page=32, window=64, dense=1)
    nxt = torch.randint(0, 259, (2, 6), device="cuda")
    out = []
    for graph in (False, True):
        cache = TieredCache.offload(keys, values, tc).to_static(8)
        dec = GraphDecoder(model, cache, graph=graph)
        out.append(([dec.step(nxt[:, t : t + 1]).float().clone() for t in range(6)], cache.fetched_pages))
        cache.close()
    (eager, fe), (replayed, fr) = out
    assert fe == fr > 0
    assert max((a - b).abs().max().item() for a, b in zip(eager, replayed)) < 1e-2


@pytest.mark.parametrize("pin", [0, 3])
def test_question_pins_the_pages_it_attends_most(model, prefilled, pin, monkeypatch):
    seen = {}
    orig = TieredLayer._pin_pages

    def spy(self, keys, query, scaling):
        seen[id(self)] = (keys, query, scaling)
        orig(self, keys, query, scaling)

    monkeypatch.setattr(TieredLayer, "_pin_pages", spy)
    cfg = TierConfig(bits=4, device=0.2, page=16, window=32, dense=0, pin=pin, probe=4)
    keys, values = prefilled
    cache = _offload(([k.bfloat16() for k in keys], [v.bfloat16() for v in values]), cfg)
    torch.manual_seed(5)
    question = torch.randint(0, 256, (2, 12))
    pos = torch.arange(CONTEXT, CONTEXT + 12).expand(2, -1)
    model(question, position_ids=pos, **with_cache(model, cache), use_cache=True)  # exact: reads every page
    layer = cache.layers[1]
    if not pin:
        assert layer.pins is None
        return
    assert layer.pins.shape == (2, 2, 3)
    k, q, scaling = seen[id(layer)]  # every key, and the question's last 4 query rows
    assert q.shape[2] == 4
    nk, n = k.shape[2], layer.n_pages
    mass = torch.zeros(2, 2, n, dtype=torch.float64)
    for r in range(2):
        for hq in range(4):
            for i in range(4):  # query row i is token nk - 4 + i: it sees the keys up to itself
                p = torch.softmax(q[r, hq, i].double() @ k[r, hq // 2, : nk - 3 + i].double().T * scaling, -1)
                mass[r, hq // 2] += p[: n * 16].reshape(n, 16).sum(-1)
    assert torch.equal(layer.pins.sort(-1).values, mass.topk(3, dim=-1).indices.sort(-1).values)
    model(question[:, :1], position_ids=pos[:, -1:] + 1, **with_cache(model, cache), use_cache=True)
    for r in range(2):  # kept while answering, whatever the step's bound says
        for h in range(2):
            assert bool(torch.isin(layer.pins[r, h], layer.slot_page[r, h]).all())
    cache.close()



def test_fetch_cap_replaces_the_lowest_pages_with_the_highest_misses():
    gen = torch.Generator().manual_seed(3)
    b, h, g, n, p, d, slots = 2, 2, 2, 24, 8, 16, 8
    keys = torch.randn(b, h, n * p, d, generator=gen, dtype=torch.float64)
    values = torch.randn(b, h, n * p, d, generator=gen, dtype=torch.float64)
    cfg = TierConfig(bits=None, page=p, window=0, sink=0, pin=0, fetch_cap=0.25)  # 2 of 8 slots a step
    layer = TieredLayer(keys, values, cfg, slots, n, torch.device("cpu"), None, None)
    q0 = torch.randn(b, h * g, 1, d, generator=gen, dtype=torch.float64)
    layer.select(q0)  # an empty pool fills whole, whatever the cap
    first = layer.bound(q0).topk(slots, dim=-1).indices
    assert torch.equal(layer.slot_page.sort(-1).values, first.sort(-1).values)
    fetched = int(layer.stats["fetched"])
    assert fetched == b * h * slots
    for _ in range(5):
        before = layer.slot_page.clone()
        q = torch.randn(b, h * g, 1, d, generator=gen, dtype=torch.float64)
        bound = layer.bound(q)
        want = bound.topk(slots, dim=-1).indices
        layer.select(q)
        assert int(layer.stats["fetched"]) - fetched == int((before != layer.slot_page).sum())
        fetched = int(layer.stats["fetched"])
        for r in range(b):
            for hh in range(h):
                old, now, w = set(before[r, hh].tolist()), set(layer.slot_page[r, hh].tolist()), want[r, hh].tolist()
                misses = [x for x in w if x not in old]  # highest bound first
                came, left = now - old, old - now
                assert came == set(misses[:2])  # at most the cap, the best misses
                unchosen = sorted((x for x in old if x not in w), key=lambda x: bound[r, hh, x].item())
                assert left == set(unchosen[: len(came)])  # evicted: the unchosen pages of lowest bound
        assert bool((layer.where >= 0).sum(-1).eq(slots).all())  # the page -> slot map stays consistent
        for r in range(b):
            for hh in range(h):
                for s_, pg in enumerate(layer.slot_page[r, hh].tolist()):
                    assert layer.where[r, hh, pg] == s_
                    assert torch.equal(layer.pooled["k"][r, hh, s_], keys[r, hh, pg * p : (pg + 1) * p])
    with pytest.raises(ValueError, match="fetch_cap"):
        TierConfig(fetch_cap=0)
