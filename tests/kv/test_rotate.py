import math

import pytest
import torch
from conftest import tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.quant import KIVI, MetaQTensor, load_quantized
from memfit.kv.rotate import Hadamard, RotatedTensor, clip_towards_mean, hadamard


@pytest.mark.parametrize("d", [1, 2, 64, 96, 128])
def test_hadamard_is_orthonormal_with_entries_of_one_size(d):
    h = hadamard(d)
    torch.testing.assert_close(h @ h.T, torch.eye(d), atol=1e-6, rtol=0)
    block = d & -d  # 96 = 3 blocks of 32
    nonzero = h[h != 0].abs()
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, 1 / math.sqrt(block)))


def test_clip_shrinks_each_range_towards_its_mean():
    x = torch.tensor([[0.0, 1.0, 2.0, 9.0]])
    y = clip_towards_mean(x, 0.5, -1)  # mean 3: range [0, 9] -> [1.5, 6]
    assert torch.equal(y, torch.tensor([[1.5, 1.5, 2.0, 6.0]]))
    assert clip_towards_mean(x, 1.0, -1) is x


def _kv_like(n=256, d=32, seed=0):
    """Keys as real models have them: a few channels with large offsets, and a first token (the
    attention sink) far from the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, d, generator=g)
    x[..., :2] += 8.0
    x[:, :, 0] *= 6
    return x


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(k.shape[-1]), -1) @ v


def test_rotation_sinks_and_clipping_each_lower_the_attention_error_of_2_bit_kv():
    k, v = _kv_like(), _kv_like(seed=1)
    q = torch.randn(1, 2, 8, 32, generator=torch.Generator().manual_seed(2))
    ref = _attention(q, k, v)

    def err(cfg):
        out = _attention(q, cfg.quantize_keys(k).dequantize(), cfg.quantize_values(v).dequantize())
        return float((out - ref).norm() / ref.norm())

    plain = err(KIVI(bits=2, group=32))
    rotated = err(Hadamard(bits=2, group=32, sinks=0, clip=1.0))
    sinks = err(Hadamard(bits=2, group=32, sinks=1, clip=1.0))
    clipped = err(Hadamard(bits=2, group=32, sinks=1))  # 2 bits: clipped to 0.8 by default
    assert Hadamard().clip_fraction(2) == 0.8 and Hadamard().clip_fraction(4) == 1.0
    assert rotated < plain and sinks < rotated and clipped < sinks


def test_rotated_tensor_keeps_its_sinks_exactly_and_round_trips():
    x = _kv_like(n=128)
    cfg = Hadamard(bits=4, group=32, sinks=3)
    a, b = cfg.quantize_keys(x[:, :, :96]), cfg.quantize_keys(x[:, :, 96:])
    both = a.cat(b)
    assert both.num_tokens == 128 and both.sink is a.sink  # the later run's first tokens are not sinks
    assert torch.equal(both.dequantize()[:, :, :3], x[:, :, :3].half().float())
    torch.testing.assert_close(both.dequantize()[:, :, :96], a.dequantize())
    torch.testing.assert_close(both.dequantize()[:, :, 96:], b.q.dequantize() @ hadamard(32).T)
    assert both.nbytes == a.q.nbytes + b.q.nbytes + 2 * 2 * 3 * 32  # one sink: [1, 2, 3, 32] float16
    assert torch.equal(both.prefix(64).dequantize(), both.dequantize()[:, :, :64])
    assert cfg.quantize_values(x).prefix(2).sink.shape[-2] == 2  # (values: keys cut only at groups)
    big = cfg.quantize_values(torch.full((1, 1, 8, 32), 1e6))  # past float16: its sinks saturate, not inf
    assert torch.isfinite(big.sink).all() and torch.isfinite(big.dequantize()).all()
    t = {"k_" + n: v for n, v in both.tensors().items()}
    back = load_quantized(t, "k_", both.meta())
    assert isinstance(back, RotatedTensor) and torch.equal(back.dequantize(), both.dequantize())


def test_a_ragged_run_keeps_each_heads_first_tokens():
    x = _kv_like(n=128)[:, :1]  # one head's worth of rows: two heads of 64 and 64 tokens back to back
    cfg = Hadamard(bits=2, group=32, sinks=3)
    r = cfg.quantize_keys(x, starts=[0, 64])
    assert r.sink_at == (0, 1, 2, 64, 65, 66)
    out = r.dequantize()
    assert torch.equal(out[:, :, [0, 1, 2, 64, 65, 66]], x[:, :, [0, 1, 2, 64, 65, 66]].half().float())
    assert not torch.equal(out[:, :, 3], x[:, :, 3].half().float())  # the rest is quantized
    assert r.prefix(64).sink_at == (0, 1, 2) and r.nbytes == r.q.nbytes + 6 * 32 * 2
    back = load_quantized({"v_" + n: t for n, t in r.tensors().items()}, "v_", r.meta())
    assert back.sink_at == r.sink_at and torch.equal(back.dequantize(), out)


def test_hadamard_cache_decodes_and_saves_and_restores():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache("hadamard(bits=2,group=16,residual=16)", 2)
    with torch.no_grad():
        model(ids[:, :100], **with_cache(model, cache))
        for t in range(100, 120):  # the window spills while decoding: later runs join the first
            model(ids[:, t : t + 1], **with_cache(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer.qk, RotatedTensor) and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    assert layer.qk.sink.shape[-2] == 4
    back = CompressedCache.from_state(*cache.to_state())
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert back.nbytes == cache.nbytes
    fork = cache.fork()  # a fork's own first codes are not its layer's first tokens: no sinks there
    with torch.no_grad():
        for t in range(20):
            model(ids[:, t : t + 1], **with_cache(model, fork))
    assert fork.layers[0].qk is not None and fork.layers[0].qk.sink is None


def test_8_bit_grids_halve_the_grids_bytes_and_keep_each_group_on_its_codes():
    x = _kv_like(n=128)
    plain, meta = Hadamard(bits=2, group=32, sinks=0), Hadamard(bits=2, group=32, sinks=0, meta_bits=8)
    for quantize in ("quantize_keys", "quantize_values"):
        p, m = getattr(plain, quantize)(x), getattr(meta, quantize)(x)
        assert isinstance(m.q, MetaQTensor) and m.q.scale_codes.dtype == torch.uint8
        grid = lambda q: q.scale.nbytes + q.zero.nbytes  # noqa: E731
        assert m.q.scale_codes.nbytes + m.q.zero_codes.nbytes == grid(p.q) // 2
        err_p = (p.dequantize() - x).norm() / x.norm()
        err_m = (m.dequantize() - x).norm() / x.norm()
        assert err_m < 1.05 * err_p  # the grid rounded to 8 bits costs little
        back = load_quantized({"k_" + n: t for n, t in m.tensors().items()}, "k_", m.meta())
        assert torch.equal(back.dequantize(), m.dequantize()) and back.extends
    # each group still spans its elements: the zero rounded down, the scale up
    q = meta.quantize_keys(x).q
    codes = torch.stack([(q.codes >> (2 * i)) & 3 for i in range(4)], -1).reshape(1, 2, 128, 32)
    rot = (x.float() @ hadamard(32)).reshape(1, 2, 4, 32, 32)
    rot = clip_towards_mean(rot, 0.8, 3)
    z, s = q.zero.float().unsqueeze(3), q.scale.float().unsqueeze(3)
    assert (rot >= z - 1e-3 * s).all() and (rot <= z + 3 * s + 1e-3 * s).all()
    assert torch.equal(codes.reshape(rot.shape).float(), ((rot - z) / s).round().clamp(0, 3))


def test_8_bit_grids_encode_a_later_run_on_the_first_runs_ranges():
    x = _kv_like(n=128)
    cfg = Hadamard(bits=2, group=32, sinks=2, meta_bits=8)
    a = cfg.quantize_keys(x[:, :, :96])
    both = a.extend(x[:, :, 96:])
    assert both.num_tokens == 128 and both.q.ranges is a.q.ranges and both.sink is a.sink
    assert both.nbytes == a.nbytes + 32 * 2 * 2 * 32 // 8 + 2 * 2 * 32  # codes and one group's grid codes
    fresh = Hadamard(bits=2, group=32, sinks=0, meta_bits=8).quantize_keys(x[:, :, 96:])
    err = lambda r: float((r.dequantize()[:, :, -32:] - x[:, :, 96:]).norm())  # noqa: E731
    assert err(both) < 1.1 * err(fresh)  # the first run's ranges fit the later tokens
    vals = cfg.quantize_values(x[:, :, :96]).extend(x[:, :, 96:])
    assert vals.num_tokens == 128 and torch.isfinite(vals.dequantize()).all()
    torch.testing.assert_close(both.prefix(64).dequantize(), both.dequantize()[:, :, :64])
    with pytest.raises(ValueError, match="meta_bits"):
        Hadamard(meta_bits=4)


def test_8_bit_grid_cache_spills_and_forks_on_the_contexts_ranges_and_restores():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache("hadamard(bits=2,group=16,residual=16,meta_bits=8)", 2)
    with torch.no_grad():
        model(ids[:, :100], **with_cache(model, cache))
        ranges = cache.layers[0].qk.q.ranges
        for t in range(100, 120):
            model(ids[:, t : t + 1], **with_cache(model, cache))
    layer = cache.layers[0]
    assert layer.qk.q.ranges is ranges and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    back = CompressedCache.from_state(*cache.to_state())
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert back.nbytes == cache.nbytes
    fork = cache.fork()
    with torch.no_grad():
        for t in range(40):
            model(ids[:, t : t + 1], **with_cache(model, fork))
    own = fork.layers[0].qk
    assert own is not None and own.sink is None and own.q.ranges is ranges  # the parent's ranges, not 16 tokens'
