"""The packed-KV decode attention: the torch reference against a plain dequantize-then-attend (CPU),
and the Gluon and Triton kernels against the reference (GPU, marked ``gpu``)."""

import functools

import pytest
import torch

from memfit.hfcompat import with_cache
from memfit.kernels import gluon_decode
from memfit.kernels.decode_attention import decode_attention, decode_attention_reference, kernel_supports
from memfit.kv.quant import dequantize, quantize_keys, quantize_values


@pytest.fixture(params=[True, False], ids=["tokens-as-M", "queries-as-M"])
def layout(request, monkeypatch):
    """Both Gluon kernels: the token-major one (where it takes the shape) and the query-major one."""
    monkeypatch.setattr(gluon_decode, "TOKENS_AS_M", request.param)
    return request.param


def _case(b=2, hq=8, h=2, n=256, w=24, d=64, bits=4, kgroup=64, vgroup=64, device="cpu", seed=0, vbits=None):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g) * 2
    v = torch.randn(b, h, n, d, generator=g)
    qk, qv = quantize_keys(k, bits, kgroup), quantize_values(v, vbits or bits, vgroup)
    kw = torch.randn(b, h, w, d, generator=g).to(torch.bfloat16)
    vw = torch.randn(b, h, w, d, generator=g).to(torch.bfloat16)
    q = torch.randn(b, hq, d, generator=g).to(torch.bfloat16)
    qlen = torch.randint(n // 2, n + 1, (b, h), generator=g, dtype=torch.int32)
    qlen[0, 0] = n
    wlen = torch.randint(1, w + 1, (b, h), generator=g, dtype=torch.int32)
    args = [q, qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, kw, vw, qlen, wlen]
    return [a.to(device) for a in args], (qk, qv)


@pytest.mark.parametrize("bits,vbits", [(2, None), (4, None), (8, None), (4, 2), (2, 4)])
def test_reference_equals_dequantize_then_attend(bits, vbits):
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs_reference

    args, (qk, qv) = _case(bits=bits, vbits=vbits)
    q, *_, kw, vw, qlen, wlen = args
    out = decode_attention_runs_reference(q, [PackedRun(*args[1:], bits, 64, vbits=vbits)])
    if vbits is None:
        assert torch.equal(out, decode_attention_reference(*args, bits=bits))
    _attends_like(out, q, dequantize(qk, torch.float64), dequantize(qv, torch.float64), kw, vw, qlen, wlen)


def _attends_like(out, q, qkeys, qvalues, kw, vw, qlen, wlen):
    """``out`` is each query head's softmax attention over its KV head's first ``qlen`` quantized
    tokens (``qkeys``/``qvalues``, dequantized) and first ``wlen`` 16-bit ones (float64 sums)."""
    keys = torch.cat([qkeys.double(), kw.double()], dim=2)
    values = torch.cat([qvalues.double(), vw.double()], dim=2)
    b, hq, d = q.shape
    h, n = keys.shape[1], qkeys.shape[2]
    for i in range(b):
        for j in range(hq):
            kh = j // (hq // h)
            idx = torch.cat([torch.arange(int(qlen[i, kh])), n + torch.arange(int(wlen[i, kh]))])
            att = (q[i, j].double() @ keys[i, kh, idx].T / d ** 0.5).softmax(-1)
            torch.testing.assert_close(out[i, j].double(), att @ values[i, kh, idx], rtol=1e-4, atol=1e-4)


def _rope_case(bits, device="cpu", theta=10000.0, **shape):
    """A run whose quantized keys are pre-RoPE (KVQuant), with the model-side RoPE that reads them."""
    from memfit.kernels.decode_attention import PackedRun
    from memfit.kv.rope import RoPE

    args, codes = _case(bits=bits, device=device, **shape)
    d = args[0].shape[-1]
    rope = RoPE.default(d, theta, scaling=1.25)
    run = PackedRun(*args[1:], bits, shape.get("kgroup", 64), **rope.kernel_args(device))
    return args, codes, run, rope


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pre_rope_runs_are_rotated_at_each_tokens_index(bits):
    """Pre-RoPE codes read as a run: dequantized, rotated at positions 0.. (transformers' rotate_half
    RoPE, with its attention scaling), then attended; the 16-bit tokens as they are."""
    from memfit.kernels.decode_attention import decode_attention_runs_reference

    args, (qk, qv), run, rope = _rope_case(bits)
    q, *_, kw, vw, qlen, wlen = args
    rotated = rope.rotate(dequantize(qk, torch.float32), torch.arange(qk.num_tokens))
    out = decode_attention_runs_reference(q, [run])
    _attends_like(out, q, rotated, dequantize(qv, torch.float64), kw, vw, qlen, wlen)
    with pytest.raises(ValueError, match="rope must be a float32"):
        decode_attention_runs_reference(q, [type(run)(**{**run.__dict__, "rope": run.rope[:3]})])


def test_the_kernels_rope_table_is_built_once_per_inv_freq_tensor():
    from memfit.kernels.decode_attention import _rope_table

    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    table = _rope_table(inv, 64)
    assert _rope_table(inv, 64) is table and _rope_table(inv.clone(), 64) is not table
    ang = torch.arange(64.0)[:, None] * inv[None, :]
    assert torch.equal(table, torch.stack((ang.cos(), ang.sin())))
    assert _rope_table(inv, 32).shape == (2, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [dict(b=1, hq=32, h=8, n=4096, w=100, d=128), dict(b=3, hq=9, h=3, n=1024, w=7, d=64),
                                   dict(b=2, hq=8, h=8, n=512, w=128, d=128, kgroup=32)])
def test_the_kernel_rotates_pre_rope_keys_like_the_reference(bits, shape):
    """Pre-RoPE runs take the Triton kernel (the rotation in registers, from the tile's first
    position and a per-offset table); the Gluon kernel refuses them by name."""
    from memfit.kernels.decode_attention import decode_attention_runs, decode_attention_runs_reference

    args, _, run, _ = _rope_case(bits, device="cuda", theta=500000.0, **shape)
    q = args[0]
    ref = decode_attention_runs_reference(q, [run])
    for split in (None, 256):  # the launch's own slices, and 256-token ones
        out = decode_attention_runs(q, [run], split_len=split)
        err = (out - ref).abs().max().item()
        print(f"bits={bits} {shape} split={split} pre-RoPE max abs error {err:.2e}")
        assert err < 1e-2
    with pytest.raises(ValueError, match="Gluon kernel does not take"):
        decode_attention_runs(q, [run], impl="gluon")


def _outlier_case(bits, pre_rope=False, rows=None, device="cpu", b=2, hq=8, h=2, n=256, w=24, d=64, kgroup=64,
                  vgroup=64):
    """A run with KVQuant's sparse outliers (2% of each head's keys and values, some planted far out),
    pre-RoPE keys or not, as the layer builds it (``kernel_outliers``); ``rows``: a one-row tensor read
    by that many rows (a fork's parent). Returns the run, the query and what it should attend over."""
    from memfit.kernels.decode_attention import Outliers, PackedRun
    from memfit.kv.quant import kernel_outliers
    from memfit.kv.rope import RoPE

    g = torch.Generator().manual_seed(3)
    k = torch.randn(b, h, n, d, generator=g) * 2
    k[..., 3] *= 20  # an outlier channel (keys) and outlier tokens (values)
    v = torch.randn(b, h, n, d, generator=g)
    v[:, :, ::7, 5] += 30
    qk, qv = quantize_keys(k, bits, kgroup, outliers=0.02), quantize_values(v, bits, min(vgroup, d), outliers=0.02)
    rope = RoPE.default(d, 10000.0, scaling=1.25) if pre_rope else None
    ra = rope.kernel_args("cpu") if rope else {}
    rows = rows or b
    kw = torch.randn(rows, h, w, d, generator=g).to(torch.bfloat16)
    vw = torch.randn(rows, h, w, d, generator=g).to(torch.bfloat16)
    q = torch.randn(rows, hq, d, generator=g).to(torch.bfloat16)
    qlen = torch.randint(n // 2, n + 1, (rows, h), generator=g, dtype=torch.int32)
    wlen = torch.randint(1, w + 1, (rows, h), generator=g, dtype=torch.int32)
    t = [x.expand(rows, *x.shape[1:]) for x in (qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero)]
    run = PackedRun(*t, kw, vw, qlen, wlen, bits, kgroup, **ra, kout=kernel_outliers(qk, rows, kgroup, ra or None),
                    vout=kernel_outliers(qv, rows, kgroup))
    keys = dequantize(qk, torch.float32)
    if rope is not None:
        keys = rope.rotate(keys, torch.arange(n))
    moved = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    run = PackedRun(**{f: Outliers(*map(moved, x.__dict__.values())) if isinstance(x, Outliers) else moved(x)
                       for f, x in run.__dict__.items()})
    dense = [x.expand(rows, -1, -1, -1) for x in (keys, dequantize(qv, torch.float32))]
    return run, q.to(device), (*dense, kw, vw, qlen, wlen)


@pytest.mark.parametrize("pre_rope", [False, True], ids=["post-rope", "pre-rope"])
@pytest.mark.parametrize("bits", [2, 4])
def test_sparse_outliers_are_added_to_the_dequantized_codes(bits, pre_rope):
    """A run's outliers (their exact values less the dense codes', after RoPE where the codes are
    stored before it) make the reference attend over exactly what ``dequantize`` gives, also read
    by several rows from a one-row tensor; without them it differs."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs_reference

    for rows in (None, 3):
        run, q, dense = _outlier_case(bits, pre_rope, rows=rows, b=1 if rows else 2)
        assert run.kout.ptr.shape[-1] == 256 // 64 + 1 and int(run.kout.ptr[-1, -1, -1]) == len(run.kout.tok)
        for o in (run.kout, run.vout):
            sums = []  # the pairs a CUDA graph captures add up to the same corrections
            for pairs in (False, True):
                rh, tok, ch, val = o.per_row_head(*o.ptr.shape[:2], all_pairs=pairs)
                sums.append(torch.zeros(o.ptr.shape[0] * o.ptr.shape[1], 256, 64).index_put_(
                    (rh, tok, ch), val, accumulate=True))
            torch.testing.assert_close(sums[1], sums[0])
        out = decode_attention_runs_reference(q, [run])
        _attends_like(out, q, *dense)
        plain = decode_attention_runs_reference(q, [PackedRun(**{**run.__dict__, "kout": None, "vout": None})])
        assert (plain - out).abs().max() > 1e-2
    with pytest.raises(ValueError, match="kout.ptr must be int32"):
        decode_attention_runs_reference(q, [PackedRun(**{**run.__dict__, "kout": type(run.kout)(
            run.kout.ptr.long(), run.kout.tok, run.kout.ch, run.kout.val)})])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pre_rope", [False, True], ids=["post-rope", "pre-rope"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [dict(b=1, hq=32, h=8, n=4096, w=100, d=128), dict(b=3, hq=9, h=3, n=1024, w=7, d=64),
                                   dict(b=1, rows=3, hq=8, h=2, n=512, w=30, d=128, kgroup=32)])
@pytest.mark.parametrize("vgroup", [64, 128])
def test_the_kernel_adds_sparse_outliers_like_the_reference(bits, pre_rope, shape, vgroup):
    """Runs with outliers: the keys' summed per token beforehand and added to the logits, the values'
    added from the saved logits as slices of their own, by the Triton kernel and by the Gluon kernel's
    token-major variant (where it takes the shapes; pre-RoPE runs and the query-major variant it refuses
    by name). The planted outliers give outputs up to ~20, where float16 operands round at ~1e-2: the
    error is bounded relative to that scale (5e-3 of it: on an H100 the 4-bit fork case with 32-token
    groups gave 3.3e-3 of outputs up to 16), and must be far below what the outliers change."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference

    run, q, _ = _outlier_case(bits, pre_rope, device="cuda", vgroup=vgroup, **shape)
    ref = decode_attention_runs_reference(q, [run])
    bare = decode_attention_runs_reference(q, [PackedRun(**{**run.__dict__, "kout": None, "vout": None})])
    effect, tol = (bare - ref).abs().max().item(), 5e-3 * max(1.0, ref.abs().max().item())
    d, nvg, g = q.shape[-1], run.vs.shape[-1], q.shape[1] // run.heads()
    gluon = not pre_rope and gluon_decode.supports(d, bits, run.kgroup, nvg, g) and gluon_decode.takes_outliers(
        d, bits, nvg, g)
    for impl in ("triton", "gluon") if gluon else ("triton",):
        for split in (None, 256):
            out = decode_attention_runs(q, [run], split_len=split, impl=impl)
            err = (out - ref).abs().max().item()
            print(f"bits={bits} pre_rope={pre_rope} {shape} vgroup={vgroup} {impl} split={split} outliers max abs "
                  f"error {err:.2e} (tolerance {tol:.2e}, the outliers move the output by {effect:.2e})")
            assert err < tol < effect / 50
    if not gluon:
        with pytest.raises(ValueError, match="Gluon kernel does not take"):
            decode_attention_runs(q, [run], impl="gluon")


def test_attention_received_is_each_tokens_softmax_weight():
    """``lse=True`` gives each query head's log-sum-exp over every run; ``attention_received`` turns it
    into the attention each token of one run receives, summed over its KV head's query heads: the
    columns of the reference's softmax."""
    from memfit.kernels.decode_attention import (
        PackedRun,
        attention_received,
        decode_attention_runs,
        decode_attention_runs_reference,
    )

    args, (qk, _) = _case(b=2, hq=8, h=2, n=256, w=24, d=64, bits=4)
    q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen = args
    first = PackedRun(kc, ks, kz, vc, vs, vz, kw[:, :, :0], vw[:, :, :0], qlen, 0, 4, 64)
    second = PackedRun.window_only(kw, vw, wlen, 4, 64)
    out, lse = decode_attention_runs(q, [first, second], lse=True)
    assert torch.equal(out, decode_attention_runs_reference(q, [first, second]))
    codes, = attention_received(q, first, lse)
    window, = attention_received(q, second, lse)
    # the softmax over both runs' tokens, by hand
    k = torch.cat([dequantize(qk).float(), kw.float()], dim=2)
    valid = torch.cat([torch.arange(256) < qlen[..., None], torch.arange(24) < wlen[..., None]], dim=-1)
    logits = (q.float().reshape(2, 2, 4, 64) @ k.transpose(-1, -2)) * 64 ** -0.5
    p = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1).sum(2)
    torch.testing.assert_close(torch.cat([codes, window], dim=-1), p, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lse, logits.masked_fill(~valid[:, :, None], float("-inf")).logsumexp(-1).reshape(2, 8))
    assert float(codes[0, 0, int(qlen[0, 0]):].abs().sum()) == 0.0 and torch.allclose(p.sum(-1), torch.full((2, 2), 4.0))


def test_cpu_falls_back_to_the_reference():
    args, _ = _case(bits=2)
    assert not kernel_supports(args[0], args[1], args[2], args[5], 2)
    assert torch.equal(decode_attention(*args, bits=2), decode_attention_reference(*args, bits=2))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(args[0][:, :3], *args[1:], bits=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [dict(b=1, hq=32, h=8, n=4096, w=100, d=128), dict(b=3, hq=9, h=3, n=1024, w=7, d=64),
                                   dict(b=2, hq=8, h=8, n=512, w=128, d=128, kgroup=32),
                                   dict(b=2, hq=32, h=8, n=960, w=60, d=128, vgroup=128),
                                   dict(b=1, hq=7, h=1, n=288, w=1, d=64, kgroup=32, vgroup=32),
                                   dict(b=2, hq=24, h=2, n=640, w=33, d=128)])
def test_kernels_match_the_reference(bits, shape, layout):
    args, _ = _case(bits=bits, device="cuda", **shape)
    assert kernel_supports(args[0], args[1], args[2], args[5], bits)  # a kernel runs, not the fallback
    ref = decode_attention_reference(*args, bits=bits)
    runs = [("triton", None, "magic"), ("triton", 256, "magic"), ("gluon", None, "magic"), ("gluon", 256, "magic")]
    if "vgroup" not in shape:  # the bf16-operand modes (kept for comparison) on the first shapes only
        runs += [("triton", None, "fp16"), ("triton", None, "fp32")]
    gluon_fits = gluon_decode.supports(shape["d"], bits, shape.get("kgroup", 64), shape["d"] // shape.get("vgroup", 64),
                                       shape["hq"] // shape["h"])
    for impl, split, dequant in runs:
        if impl == "gluon" and not gluon_fits:
            with pytest.raises(ValueError, match="Gluon kernel does not take"):
                decode_attention(*args, bits=bits, impl=impl)
            continue
        out = decode_attention(*args, bits=bits, split_len=split if split and split % shape.get("kgroup", 64) == 0 else None,
                               dequant=dequant, impl=impl)
        err = (out - ref).abs().max().item()
        print(f"bits={bits} {shape} {impl} {dequant} max abs error {err:.2e}")
        assert err < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_lengths_given_as_numbers_equal_uniform_tensors(device):
    args, _ = _case(bits=4, device=device, b=2, hq=8, h=2, n=256, w=24, d=64)
    args[9].fill_(192)
    args[10].fill_(17)
    by_tensor = decode_attention(*args, bits=4)
    by_number = decode_attention(*args[:9], 192, 17, bits=4, out_dtype=torch.bfloat16)
    assert by_number.dtype == torch.bfloat16
    assert (by_number.float() - by_tensor).abs().max() < 1e-2
    assert torch.equal(decode_attention(*args[:9], 192, 17, bits=4), by_tensor)
    with pytest.raises(ValueError, match="qlen must be an int or a"):
        decode_attention(*args[:9], args[9][:1], 17, bits=4)
    # lengths past the buffers mean "all of them" (as in the reference), never a read beyond them
    full = decode_attention_reference(*args[:9], 256, 24, bits=4)
    assert (decode_attention(*args[:9], args[9] + 10_000, args[10] + 10_000, bits=4) - full).abs().max() < 1e-2
    assert (decode_attention(*args[:9], 10_000, 10_000, bits=4) - full).abs().max() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_operands_saturate_instead_of_overflowing():
    """The kernel multiplies in float16: a query beyond its range must not turn the output into nan."""
    args, _ = _case(bits=4, device="cuda", b=1, hq=4, h=1, n=256, w=8, d=64)
    q = args[0].clone()
    q[0, 0, 0] = 1e6  # a bf16 query logit far past float16's 65504
    out = decode_attention(q, *args[1:], bits=4)
    assert torch.isfinite(out).all()
    ok = slice(1, None)  # the other query heads are unaffected
    assert (out[:, ok] - decode_attention_reference(q, *args[1:], bits=4)[:, ok]).abs().max() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_cache_decodes_through_the_kernel_like_the_reference(bits, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import memfit.kv.layer as layer_mod  # where the layer calls the kernel
    from memfit.kv.cache import CompressedCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    cfg._attn_implementation = "memfit"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    calls = []
    real = layer_mod.decode_attention_runs
    monkeypatch.setattr(layer_mod, "decode_attention_runs", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 300, (3, 700), device="cuda")
    feed = torch.randint(0, 300, (3, 20), device="cuda")
    logits = {}
    for kernels in (True, False):
        cache = CompressedCache.for_model(model, f"kivi(bits={bits},group=64,residual=64)").use_kernels(kernels)
        out = []
        with torch.no_grad():
            model(ids, **with_cache(model, cache))
            for i in range(20):
                out.append(model(feed[:, i : i + 1], **with_cache(model, cache)).logits[:, -1].float())
        logits[kernels] = torch.stack(out)
    assert len(calls) == 20 * 2  # every decode step of both layers went through the kernel
    err = (logits[True] - logits[False]).abs().max().item()
    print(f"bits={bits}: logits max abs difference kernel vs dequantize+SDPA {err:.3e}")
    assert err < 0.1 * logits[False].abs().max().item()


def test_gluon_kernel_runs_only_on_triton_releases_it_was_tested_with(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(gluon_decode, "gluon", object())  # as if Gluon imported
    monkeypatch.setattr(gluon_decode, "triton", SimpleNamespace(__version__="3.6.0"), raising=False)
    monkeypatch.delenv("MEMFIT_GLUON", raising=False)
    fits = functools.partial(gluon_decode.supports, 128, 4, 64, 1, 4)
    assert fits() and not gluon_decode.supports(96, 4, 64, 1, 4) and not gluon_decode.supports(128, 4, 128, 1, 4)
    monkeypatch.setenv("MEMFIT_GLUON", "0")
    assert not fits()
    monkeypatch.setattr(gluon_decode.triton, "__version__", "3.7.0")
    monkeypatch.setenv("MEMFIT_GLUON", "")
    assert not fits()  # an untested release: the Triton kernel runs
    monkeypatch.setenv("MEMFIT_GLUON", "1")
    assert fits()


def _ragged_case(b=2, hq=8, h=2, d=64, bits=4, kgroup=64, vgroup=64, device="cpu", seed=0, max_groups=4, max_w=40):
    """Runs of different lengths per row and head, stored back to back (flat, read from offsets),
    and the same tokens per row and head for an explicit check."""
    from memfit.kernels.decode_attention import PackedRun

    g = torch.Generator().manual_seed(seed)
    nq = torch.randint(0, max_groups + 1, (b, h), generator=g) * kgroup
    nw = torch.randint(0, max_w + 1, (b, h), generator=g)
    nq[0, 0], nw[-1, -1] = max_groups * kgroup, max(1, int(nw[-1, -1]))
    k = torch.randn(1, 1, int(nq.sum()), d, generator=g) * 2
    v = torch.randn(1, 1, int(nq.sum()), d, generator=g)
    qk, qv = quantize_keys(k, bits, kgroup), quantize_values(v, bits, vgroup)
    kw = torch.randn(1, 1, int(nw.sum()), d, generator=g).to(torch.bfloat16)
    vw = torch.randn(1, 1, int(nw.sum()), d, generator=g).to(torch.bfloat16)
    q = torch.randn(b, hq, d, generator=g).to(torch.bfloat16)
    starts = lambda n: (n.flatten().cumsum(0) - n.flatten()).reshape(b, h)  # noqa: E731
    run = PackedRun(qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, kw, vw, nq.int(), nw.int(), bits,
                    kgroup, qoff=starts(nq), woff=starts(nw), nq=int(nq.max()), nw=int(nw.max()))
    dense_k = torch.cat([dequantize(qk, torch.float64), torch.zeros(1, 1, 0, d, dtype=torch.float64)], 2)[0, 0]
    dense_v = dequantize(qv, torch.float64)[0, 0]
    per_head = {}
    for i in range(b):
        for j in range(h):
            a, n = int(starts(nq)[i, j]), int(nq[i, j])
            c, m = int(starts(nw)[i, j]), int(nw[i, j])
            per_head[i, j] = (torch.cat([dense_k[a : a + n], kw[0, 0, c : c + m].double()]),
                              torch.cat([dense_v[a : a + n], vw[0, 0, c : c + m].double()]))
    moved = {f: getattr(run, f).to(device) if isinstance(getattr(run, f), torch.Tensor) else getattr(run, f)
             for f in run.__dataclass_fields__}
    return q.to(device), PackedRun(**moved), per_head


def test_runs_read_from_offsets_equal_attention_over_each_heads_tokens():
    from memfit.kernels.decode_attention import decode_attention_runs, decode_attention_runs_reference

    for bits in (2, 4):
        q, run, per_head = _ragged_case(bits=bits, kgroup=32, vgroup=32)
        out = decode_attention_runs_reference(q, [run])
        b, hq, d = q.shape
        h = run.qoff.shape[1]
        for i in range(b):
            for j in range(hq):
                keys, values = per_head[i, j // (hq // h)]
                att = (q[i, j].double() @ keys.T / d ** 0.5).softmax(-1)
                torch.testing.assert_close(out[i, j].double(), att @ values, rtol=1e-4, atol=1e-4)
        # two runs (the same tokens twice) attend like one run holding both
        twice = decode_attention_runs(q, [run, run])
        assert (twice - out).abs().max() < 1e-5
    with pytest.raises(ValueError, match="qoff must be an int64"):
        decode_attention_runs(q, [type(run)(**{**run.__dict__, "qoff": run.qoff.int()})])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [dict(b=1, hq=32, h=8, d=128, max_groups=40), dict(b=3, hq=9, h=3, d=64),
                                   dict(b=4, hq=32, h=8, d=128, kgroup=32, max_groups=20)])
def test_kernels_read_ragged_runs_forks_and_several_runs_like_the_reference(bits, shape, layout):
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference

    q, ragged, _ = _ragged_case(bits=bits, device="cuda", **shape)
    b, hq, d = q.shape
    # a uniform run shared by every row (stride-0 batch, a fork's parent) and one of the rows' own
    args, _ = _case(b=1, hq=hq, h=shape["h"], n=256, w=20, d=d, bits=bits, kgroup=shape.get("kgroup", 64),
                    device="cuda", seed=1)
    shared = PackedRun(*(t.expand(b, *t.shape[1:]) for t in args[1:9]), 256, 20, bits, shape.get("kgroup", 64))
    own, _ = _case(b=b, hq=hq, h=shape["h"], n=128, w=5, d=d, bits=bits, kgroup=shape.get("kgroup", 64),
                   device="cuda", seed=2)
    mine = PackedRun(*own[1:11], bits, shape.get("kgroup", 64))
    window = PackedRun.window_only(own[7], own[8], 3, bits, shape.get("kgroup", 64))
    for runs in ([ragged], [shared, ragged, mine], [ragged, window]):
        ref = decode_attention_runs_reference(q, runs)
        for impl in ("auto", "triton"):
            err = (decode_attention_runs(q, runs, impl=impl) - ref).abs().max().item()
            print(f"bits={bits} {shape} runs={len(runs)} {impl}: max abs error {err:.2e}")
            assert err < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,vbits", [(4, 2), (2, 4)])
@pytest.mark.parametrize("shape", [dict(b=2, hq=32, h=8, n=1024, w=40, d=128, vgroup=128),
                                   dict(b=2, hq=32, h=8, n=512, w=9, d=128), dict(b=3, hq=9, h=3, n=768, w=7, d=64)])
def test_the_gluon_kernel_reads_values_narrower_or_wider_than_keys(bits, vbits, shape, layout):
    """Keys and values of two widths in one run (``hadamard(bits=4, value_bits=2)``): the Gluon
    kernel reads them; the Triton kernel, which reads one width, refuses by name."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference
    from memfit.kv.rotate import hadamard

    args, _ = _case(bits=bits, vbits=vbits, device="cuda", **shape)
    q = args[0]
    for rot in (None, hadamard(shape["d"], "cuda")):
        run = PackedRun(*args[1:], bits, 64, rotation=rot, vbits=vbits)
        ref = decode_attention_runs_reference(q, [run])
        for split in (None, 256):
            err = (decode_attention_runs(q, [run], split_len=split) - ref).abs().max().item()
            print(f"keys {bits} / values {vbits} bits {shape} rotated={rot is not None}: max abs error {err:.2e}")
            assert err < 1e-2
        with pytest.raises(ValueError, match="one width"):
            decode_attention_runs(q, [run], impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_the_merge_returns_the_log_sum_exp_of_the_reference(bits):
    """``lse=True`` on the GPU: both merges (plain, and rotated slices turned back) write each query
    head's log-sum-exp, that of the reference's logits."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference
    from memfit.kv.rotate import hadamard

    args, _ = _case(b=2, hq=32, h=8, n=1024, w=20, d=128, bits=bits, device="cuda", seed=5)
    plain = PackedRun(*args[1:11], bits, 64)
    turned = PackedRun(*args[1:11], bits, 64, rotation=hadamard(128, "cuda"))
    for runs in ([plain], [turned, PackedRun.window_only(args[7], args[8], 5, bits, 64)]):
        ref, ref_lse = decode_attention_runs_reference(args[0], runs, lse=True)
        for impl in ("auto", "triton"):
            out, lse = decode_attention_runs(args[0], runs, impl=impl, lse=True)
            err = (lse - ref_lse).abs().max().item()
            print(f"bits={bits} runs={len(runs)} {impl}: lse max abs error {err:.2e}")
            assert err < 1e-2 and (out - ref).abs().max().item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_kernels_read_rotated_runs_like_the_reference(bits, layout):
    """Runs stored in a rotated basis (the Hadamard quantizer's): the kernels attend with the query
    rotated and rotate their slices' outputs back; the reference rotates the tokens back."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference
    from memfit.kv.rotate import hadamard

    q, ragged, _ = _ragged_case(b=2, hq=32, h=8, d=128, bits=bits, max_groups=20, device="cuda")
    rot = hadamard(128, "cuda")
    args, _ = _case(b=2, hq=32, h=8, n=512, w=20, d=128, bits=bits, device="cuda", seed=3)
    uniform = PackedRun(*args[1:11], bits, 64, rotation=rot)
    window = PackedRun.window_only(args[7], args[8], 5, bits, 64)
    turned = PackedRun(**{**ragged.__dict__, "rotation": rot})
    for runs in ([uniform], [turned, window], [uniform, ragged, turned]):
        ref = decode_attention_runs_reference(q, runs)
        for impl in ("auto", "triton"):
            err = (decode_attention_runs(q, runs, impl=impl) - ref).abs().max().item()
            print(f"bits={bits} rotated runs={len(runs)} {impl}: max abs error {err:.2e}")
            assert err < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_ragged_runs_in_short_slices_with_empty_runs_and_known_totals(bits, layout):
    """Ragged runs cut into many short slices (most past a short run's end), runs with no quantized
    token, and the launch sized by a known total: each gives the reference's output."""
    from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, decode_attention_runs_reference

    q, run, _ = _ragged_case(b=5, hq=16, h=4, d=128, bits=bits, device="cuda", max_groups=12)
    counted = PackedRun(**{**run.__dict__, "total_q": int(run.qlen.sum())})
    ref = decode_attention_runs_reference(q, [run])
    for r in (run, counted):
        for split_len in (None, 64, 128):
            err = (decode_attention_runs(q, [r], split_len=split_len) - ref).abs().max().item()
            assert err < 1e-2, (split_len, r.total_q, err)


def test_a_work_list_holds_each_busy_slice_once_and_every_window_slice():
    from memfit.kernels.decode_attention import work_list

    lens, sl, nqs, nwin = [0, 64, 65, 300, 128], 64, 5, 2
    entries, counts = work_list(lens, sl, nqs, nwin)
    assert counts == [0, 1, 2, 5, 2]
    quantized = [(e // 65536, e % 65536) for e in entries if e % 65536 < nqs]
    assert sorted(quantized) == sorted((rh, s) for rh, c in enumerate(counts) for s in range(c))
    assert [s for _, s in quantized] == sorted(s for _, s in quantized)  # slice-major: first slices first
    window = sorted((e // 65536, e % 65536) for e in entries if e % 65536 >= nqs)
    assert window == [(rh, nqs + j) for rh in range(len(lens)) for j in range(nwin)]
    assert work_list([1000], 64, 3, 0) == ([0, 1, 2], [3])  # lengths past the slices are cut to them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_uneven_runs_through_a_work_list_equal_the_reference_also_in_a_cuda_graph(bits, layout):
    """Uneven ragged runs are launched over a work list (only the slices that hold tokens), built
    once from their lengths; the merge leaves the unlaunched slices out. A CUDA graph captured before
    the list exists falls back to the full grid; one captured after reads the list."""
    from memfit.kernels import decode_attention as da

    q, run, _ = _ragged_case(b=3, hq=32, h=8, d=128, bits=bits, device="cuda", max_groups=30, seed=4)
    run = da.PackedRun(**{**run.__dict__, "total_q": int(run.qlen.sum())})  # the total says they are uneven
    args, _ = _case(b=3, hq=32, h=8, n=256, w=7, d=128, bits=bits, device="cuda", seed=5)
    own = da.PackedRun(*args[1:11], bits, 64)
    for runs in ([run], [own, run], [run, run]):
        ref = da.decode_attention_runs_reference(q, runs)
        for rep in range(2):  # built, then read from the cache
            err = (da.decode_attention_runs(q, runs) - ref).abs().max().item()
            assert err < 1e-2, (len(runs), rep, err)
    assert any(k[0] == "work" for k in da._built_from(run.qlen))
    fresh = da.PackedRun(**{**run.__dict__, "qlen": run.qlen.clone()})  # lengths no list was built from
    ref = da.decode_attention_runs_reference(q, [fresh])
    with pytest.MonkeyPatch.context() as mp:  # compile the full grid's kernels outside the capture
        mp.setattr(da, "_cached_work", lambda *a: None)
        da.decode_attention_runs(q, [fresh])
    for _ in range(2):  # first captured without the list (the full grid), then with it
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            out = da.decode_attention_runs(q, [fresh])
        graph.replay()
        torch.cuda.synchronize()
        assert (out - ref).abs().max().item() < 1e-2
        da.decode_attention_runs(q, [fresh])  # eager: builds the list
    assert any(k[0] == "work" for k in da._built_from(fresh.qlen))
