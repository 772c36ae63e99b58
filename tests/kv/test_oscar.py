import pytest
import torch
from conftest import decode_error, restores_only_with_model, tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv import oscar
from memfit.kv.cache import CompressedCache
from memfit.kv.plan import KVShape, policy_nbytes
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.rotate import hadamard


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_keys_basis_follows_the_queries():
    """Queries that live in a few directions: the keys' basis is their eigenbasis (first the
    directions they look in) followed by the Hadamard matrix, and orthonormal."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 256
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    q = (torch.randn(2, n, d, generator=g) * torch.tensor([6.0, 3.0] + [0.1] * (d - 2))) @ mix.T  # 2 query heads
    k, v = torch.randn(2, 1, n, d, generator=g)
    cal = oscar.fit([q], [k], [v], [None], sinks=0, group=16)
    rot = cal.rot_k[0, 0]
    torch.testing.assert_close(rot.T @ rot, torch.eye(d), atol=1e-5, rtol=0)
    uq = rot @ hadamard(d).T
    assert torch.linalg.matrix_norm(uq[:, :2].T @ mix[:, :2]) ** 2 > 1.99  # spans the queries' plane
    assert all(min(abs(c - x) for x in oscar.CLIPS) < 1e-6 for c in cal.clip.flatten().tolist())


def test_clips_keep_the_tail_keys_that_attention_reads():
    """Head 0's queries look for rare needle keys far out in one direction: clipping would cut them,
    so its keys keep their whole range at 2 bits; head 1 (plain Gaussian keys) is clipped."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 512
    q, k, v = torch.randn(3, 2, n, d, generator=g)  # 2 KV heads, one query head each
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q[0] += 4 * u
    k[0, ::16] += 9 * u
    clip = oscar.fit([q], [k], [v], [None], sinks=0, group=16).clip  # [width, keys/values, layer, head]
    assert clip[0, 0, 0, 0] == 1.0 > clip[0, 0, 0, 1]
    assert (clip[0, 1] < 1.0).all()  # 2-bit values of Gaussian tokens: clipped
    assert (clip[2] == 1.0).all()  # 8 bits: 256 levels resolve the bulk without clipping


def test_oscar_cache_decodes_spills_forks_and_restores_with_the_model():
    model = tiny_llama()
    oscar.provide(model, oscar.calibrate(model, _ids(300, 2)))
    ids = _ids(160, 1)
    with torch.no_grad():
        ref = model(ids).logits
    cache, err8 = decode_error(model, ids, "oscar(bits=8,group=16,residual=16)")
    _, err2 = decode_error(model, ids, "oscar(bits=2,group=16,residual=16)")
    assert err8 < 2e-3 < err2 < 0.1  # rotated back exactly at 8 bits; 2 bits close
    layer = cache.layers[0]
    assert isinstance(layer.qk, oscar.OscarRun) and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    assert layer.qk.sink is not None and layer.qk.sink.shape[-2] == 4
    assert cache.nbytes == policy_nbytes(cache.policy, 120, KVShape(2, 2, 16, 4))  # exact, sinks included
    assert layer.not_packed() is not None  # the kernel reads one rotation for all heads: torch path
    assert not any("rot" in name for name in cache.to_state()[0])  # the calibration is the model's, not the cache's
    restores_only_with_model(cache, model)
    fork = cache.fork()  # a fork's spills: coded with the same calibration, no sinks of their own
    with torch.no_grad():
        got = [model(ids[:, t : t + 1], **with_cache(model, fork)).logits for t in range(120, 160)]
    assert fork.layers[0].qk is not None and fork.layers[0].qk.sink is None
    assert (torch.cat(got, 1) - ref[:, 120:]).abs().max() < 0.01 * ref.abs().max()


def test_calibration_saves_loads_and_refuses_what_is_not_its_own(tmp_path):
    model = tiny_llama()
    cal = oscar.calibrate(model, _ids(200, 3))
    path = tmp_path / "c.safetensors"
    cal.save(path, "abc")
    back = oscar.Calibration.load(path, "abc")
    for name in ("rot_k", "rot_v", "clip"):
        assert torch.equal(getattr(back, name), getattr(cal, name))
    assert back.tokens == 200
    with pytest.raises(ValueError, match="calibrated for model 'abc'"):
        oscar.Calibration.load(path, "other")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the calibration"):
        oscar.Calibration.load(path)
    with pytest.raises(ValueError, match="at least 68 tokens"):
        oscar.calibrate(model, _ids(60, 3))


def test_the_api_calibrates_once_and_keeps_it_under_the_fingerprint(tiny_lm, tokenizer, monkeypatch, tmp_path):
    import memfit.api

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(memfit.api, "OSCAR_TOKENS", 256)  # the essay's first 256 tokens: enough for a tiny model
    ids = _ids(300, 8)
    ctx = tiny_lm.prefill_ids(ids, "kvzip(keep=0.5,heads=uniform)+oscar(bits=4,group=16,residual=16)")
    assert isinstance(ctx.cache.layers[0].qk, oscar.OscarRun)
    saved = tmp_path / "oscar" / f"{tiny_lm.fingerprint}.safetensors"
    assert saved.is_file()
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=20)
    back = CompressedCache.from_state(*ctx.cache.to_state(), model=tiny_lm.model)
    assert back.nbytes == ctx.nbytes
    assert tiny_lm.ask(type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm), ["x", "yz"], max_new_tokens=20) == a

    def refuse(*_a, **_k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(oscar, "calibrate", refuse)  # a second LM of the same model reads the file
    again = memfit.api.LM(tiny_lm.model, tokenizer, name="tiny-llama")
    again.prefill_ids(ids, "oscar(bits=2,group=16,residual=16)")
    saved.write_bytes(b"not a calibration")  # a corrupt file is fitted again, not used
    monkeypatch.undo()
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(memfit.api, "OSCAR_TOKENS", 256)
    memfit.api.LM(tiny_lm.model, tokenizer, name="tiny-llama").prefill_ids(ids, "oscar(bits=2,group=16,residual=16)")
    assert oscar.Calibration.load(saved, tiny_lm.fingerprint).tokens > 0


def test_bad_oscar_uses_name_the_problem():
    with pytest.raises(PolicyError, match="heads=uniform"):
        parse_policy("kvzip(keep=0.5)+oscar(bits=2)")
    with pytest.raises(PolicyError, match="oscar"):
        parse_policy("oscar(bits=3)")
    with pytest.raises(PolicyError, match="sinks"):
        parse_policy("oscar(sinks=-1)")
    with pytest.raises(PolicyError, match="clip"):
        parse_policy("oscar(clip=1.5)")
    assert parse_policy("snapkv(keep=0.5)+oscar(bits=2,value_bits=4)").quant.vbits == 4
    with pytest.raises(ValueError, match="no calibration"):
        CompressedCache.for_model(tiny_llama(), "oscar(bits=2)")
