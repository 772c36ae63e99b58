import pytest
import torch
from conftest import tiny_llama, tiny_qwen
from transformers import DynamicCache

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache


def _held_bytes(cache: CompressedCache) -> int:
    """Bytes of the distinct storages behind the cache's tensors: what memory it really holds."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in layer.tensors().values():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_none_matches_dynamic_cache_logits(make):
    model = make(torch.float32)
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_cache, cache = DynamicCache(config=model.config), CompressedCache("none", model.config.num_hidden_layers)
        ref = [model(ids[:, :30], **with_cache(model, ref_cache)).logits]
        out = [model(ids[:, :30], **with_cache(model, cache)).logits]
        for t in range(30, 40):  # decode step by step
            ref.append(model(ids[:, t : t + 1], **with_cache(model, ref_cache)).logits)
            out.append(model(ids[:, t : t + 1], **with_cache(model, cache)).logits)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 40


def test_generate_accepts_the_cache():
    model = tiny_llama(torch.float64)
    ids = torch.randint(0, 250, (1, 50), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(model, CompressedCache("none", 2)))
    assert torch.equal(ref, out)
    out8 = model.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(model, CompressedCache("kivi(bits=8,group=16,residual=16)", 2)))
    assert out8.shape == ref.shape


def test_kivi_window_spills_in_whole_groups_and_stays_bounded():
    model = tiny_llama()
    cache = CompressedCache("kivi(bits=4,group=16,residual=32)", 2)
    ids = torch.randint(0, 250, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids[:, :70], **with_cache(model, cache))
        layer = cache.layers[0]
        assert layer.qk.num_tokens == 48 and layer.keys.shape[-2] == 22
        for t in range(70, 100):
            model(ids[:, t : t + 1], **with_cache(model, cache))
            w = layer.keys.shape[-2]
            assert 32 - 16 < w <= 32 and layer.qk.num_tokens % 16 == 0
            assert layer.qk.num_tokens + w == t + 1
    assert cache.num_tokens == 100


@pytest.mark.parametrize("spec", ["none", "kivi(bits=2,group=16,residual=8)", "kivi(bits=4)",
                                  "kivi(bits=2,group=16,residual=8,outliers=0.02)"])
def test_nbytes_is_the_storage_actually_held(spec):
    model = tiny_llama(torch.bfloat16)
    cache = CompressedCache(spec, 2)
    ids = torch.randint(0, 250, (1, 150), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids[:, :120], **with_cache(model, cache))
        for t in range(120, 150):
            model(ids[:, t : t + 1], **with_cache(model, cache))
    assert cache.nbytes == _held_bytes(cache) > 0
    assert cache.full_nbytes == 2 * 2 * 2 * 150 * 16 * 2  # K+V, layers, kv heads, tokens, head_dim, 16-bit


def test_kivi_quantized_cache_stays_close_to_full_precision():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids, **with_cache(model, DynamicCache(config=model.config))).logits[0, -1]
        errs = {}
        for bits in (8, 4, 2):
            cache = CompressedCache(f"kivi(bits={bits},group=32,residual=0)", 2)
            model(ids[:, :-1], **with_cache(model, cache))
            errs[bits] = (model(ids[:, -1:], **with_cache(model, cache)).logits[0, -1] - ref).abs().max().item()
    assert errs[8] < errs[4] < errs[2] and errs[8] < 1e-2


def test_fork_shares_the_prefix_and_leaves_it_unchanged():
    model = tiny_llama()
    cache = CompressedCache("kivi(bits=4,group=16,residual=16)", 2)
    ids = torch.randint(0, 250, (1, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        before = {k: v.clone() for k, v in cache.layers[0].tensors().items()}
        fork = cache.fork(3)
        model(torch.randint(0, 250, (3, 5)), **with_cache(model, fork))
    assert fork.num_tokens == 69 and cache.num_tokens == 64
    assert fork.nbytes == 2 * 2 * (3 * 2 * 5 * 16 * 4)  # only the new tokens (float32 window)
    for k, v in cache.layers[0].tensors().items():
        assert torch.equal(v, before[k])
    assert fork.layers[0].parent is cache.layers[0]


def test_unsupported_features_fail_loudly():
    cache = CompressedCache("none", 2)
    with pytest.raises(NotImplementedError, match="beam"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="num_layers"):
        CompressedCache("none")


def test_reserved_room_appends_in_place_and_truncates_without_a_copy():
    """KVzip's repeat pass: the context stays where it is, each pass writes only its own tokens."""
    g = torch.Generator().manual_seed(0)
    k, k2, k3 = (torch.randn(1, 2, n, 8, generator=g) for n in (10, 4, 7))
    cache = CompressedCache("none", 1, defer=True)
    cache.update(k, k * 2, 0)
    cache.reserve(6)
    buf = cache.layers[0].keys.data_ptr()
    keys, values = cache.update(k2, k2 * 2, 0)
    assert keys.data_ptr() == buf and torch.equal(keys, torch.cat([k, k2], -2)) and torch.equal(values, keys * 2)
    cache.truncate_(10)
    assert cache.get_seq_length() == 10 and cache.layers[0].keys.data_ptr() == buf
    keys, _ = cache.update(k3, k3, 0)  # more than the room: given up, the plain path
    assert keys.data_ptr() != buf and torch.equal(keys, torch.cat([k, k3], -2))
    cache.truncate_(10)
    cache.release()
    assert torch.equal(cache.layers[0].keys, k) and cache.nbytes == 2 * k.numel() * k.element_size()
    cache.reserve(6)
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()  # replaced (as compression would)
    keys, _ = cache.update(k2, k2, 0)
    assert layer._room is None and torch.equal(keys, torch.cat([k, k2], -2))  # the stale room is not written
