import pytest
import torch
from torch import nn

from conftest import decode_matches_dequantized, quant_layer

from memfit.kernels import tile_gemv
from memfit.weights import QuantLinear, linear
from memfit.weights.grid import hqq

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [32, 64])
def test_tiles_hold_every_code_exactly(bits, group):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (70, 4 * group), dtype=torch.uint8)  # 70 rows: a partial block
    tiles = tile_gemv.pack_tiles(codes, bits, group, block_n=32)
    assert tile_gemv.groups_a_step(4) == 4 and tile_gemv.groups_a_step(18) == 2 and tile_gemv.groups_a_step(9) == 1
    u = tile_gemv.unit(bits, group)  # a tile row: the group, or 16 bytes of the widest part if less
    assert u == min(group, 128 // tile_gemv.PARTS[bits][0][0])
    assert [t.shape[-1] for t in tiles] == [u * w // 8 for w, _ in tile_gemv.PARTS[bits]]
    assert tiles[0].shape[1] == 4 * group // u
    assert sum(t.numel() for t in tiles) == 96 * 4 * group * bits // 8  # 3 blocks of 32 rows, bits per code
    assert torch.equal(tile_gemv.unpack_tiles(tiles, bits, 70), codes)


def test_tile_layout_puts_a_programs_group_in_one_block():
    """Block b, unit g is tiles[b, g]: row r's bytes hold, in slot i, channels g U + i R + j, each
    4-byte word in the order j, j + 2, j + 1, j + 3."""
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    codes[5, 32 + 2 * 8 + 5] = 3  # group 1 of 32 channels, 2-bit: R = 8 bytes, slot 2, channel 5 of the slot
    (t,) = tile_gemv.pack_tiles(codes, 2, 32, block_n=4)
    assert t.shape == (2, 2, 4, 8)
    assert t.nonzero().tolist() == [[1, 1, 1, 6]] and t[1, 1, 1, 6] == 3 << 4  # channel 5: 2nd word, byte 2
    # 4-bit in groups of 64: units of 32 channels (16 bytes a row, one thread's load)
    codes = torch.zeros(8, 128, dtype=torch.uint8)
    codes[5, 64 + 32 + 16 + 5] = 9  # group 1, its 2nd unit (unit 3), slot 1, channel 5 of the slot
    (t,) = tile_gemv.pack_tiles(codes, 4, 64, block_n=4)
    assert t.shape == (2, 4, 4, 16)
    assert t.nonzero().tolist() == [[1, 3, 1, 6]] and t[1, 3, 1, 6] == 9 << 4


def test_reference_equals_the_layers_dequantized_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(256, 100)
    uc = hqq(lin.weight.data, 3, 32)
    q = QuantLinear.from_codes(lin, uc.codes, 3, scale=uc.scale.half(), zero=uc.zero.half(), group_size=32)
    scale, zero = q.grid()
    tiles = tile_gemv.pack_tiles(q.codes(), 3, 32)
    pad = tiles[0].shape[0] * tiles[0].shape[2] - 100
    s = nn.functional.pad(scale, (0, 0, 0, pad)).T.half()
    o = nn.functional.pad(-zero * scale, (0, 0, 0, pad)).T.half()
    x = torch.randn(4, 256)
    ref = x @ q.dequantize(torch.float32).T
    torch.testing.assert_close(tile_gemv.tile_gemv_reference(x, tiles, 3, 100, s, o), ref, rtol=0, atol=2e-3)


def test_bad_tiles_are_named():
    with pytest.raises(ValueError, match="bits"):
        tile_gemv.pack_tiles(torch.zeros(4, 64, dtype=torch.uint8), 9, 64)
    with pytest.raises(ValueError, match="group_size"):
        tile_gemv.pack_tiles(torch.zeros(4, 96, dtype=torch.uint8), 3, 64)
    with pytest.raises(ValueError, match="multiple of 32"):  # 3 = 2 + 1 bits: a 1-bit part needs 32 channels a group
        tile_gemv.pack_tiles(torch.zeros(4, 64, dtype=torch.uint8), 3, 16)
    assert not tile_gemv.fits(3, 16) and tile_gemv.fits(4, 16) and tile_gemv.fits(3, 32)


def test_kernel_preference_is_checked():
    q = QuantLinear(64, 8, 4, 32)
    with pytest.raises(ValueError, match="unknown kernel"):
        q.set_prefer("marlin")
    for name in ("tiles", "tinygemm", "planes", "tiles-a8", None):
        q.set_prefer(name)
        assert q.prefer == name and q.kernel == "dequantize"  # on the CPU every layer dequantizes


def _layer(out, inp, bits, group, meta_bits=0):
    q = quant_layer(out, inp, bits, group, meta_bits)
    q.set_prefer("tiles")
    return q


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,meta_bits,inp", [
    (1, 64, 0, 512), (2, 64, 0, 512), (3, 32, 0, 576), (3, 64, 8, 1024), (4, 64, 0, 512), (4, 128, 8, 512),
    (4, 16, 0, 512), (5, 128, 0, 512), (6, 64, 0, 512), (7, 32, 0, 256), (8, 64, 8, 512)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_tile_kernel_matches_the_dequantized_matmul(bits, group, meta_bits, inp, rows):
    q = _layer(200, inp, bits, group, meta_bits)  # 200 rows: a partial block of outputs
    planes, codes = q.planes.clone(), q.codes()
    x, ref, _ = decode_matches_dequantized(q, rows, "triton-tiles")  # float16 products, float32 sums
    # the tiles are the only copy of the codes on the GPU; the planes come back exactly from them
    ws, cnt = tile_gemv._workspace(x.device, 200, 7)  # left at zero for the next call
    assert not ws.any() and not cnt.any()
    assert q.planes.numel() == 0 and torch.equal(q.codes(), codes) and torch.equal(q.state_dict()["planes"], planes)
    _, parts, s, o = q._fast
    ng = inp // group
    # units a step, programs along K, warps: the same sums
    for groups, split, warps in ((1, 1, 4), (2, 1, 4), (1, 2, 8), (2, 3, 4), (8, 2, 8), (8, 1, 4)):
        if (ng // tile_gemv.groups_a_step(ng, groups)) % split:
            continue
        y2 = tile_gemv.tile_gemv(x, parts, bits, 200, s, o, groups=groups, split=split, warps=warps) + q.bias
        assert (y2.float() - ref).abs().max().item() < 1e-2 * ref.abs().max().item()
    big = torch.randn(40, inp, device="cuda", dtype=torch.bfloat16)  # prefill: dequantized from the tiles
    torch.testing.assert_close(q(big).float(), nn.functional.linear(big.float(), q.dequantize(torch.float32), q.bias.float()),
                               rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    q.cpu()  # the planes move along, the tiles stay behind
    assert q._fast is None and torch.equal(q.planes, planes.cpu())


@pytest.mark.gpu
@cuda
def test_tile_kernel_equals_its_plain_triton_form():
    """The PTX dequantization equals the plain Triton one (which the interpreter can run)."""
    q = _layer(256, 512, 3, 64)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    q(x)
    _, parts, s, o = q._fast
    a = tile_gemv.tile_gemv(x, parts, 3, 256, s, o, asm=True).float()
    b = tile_gemv.tile_gemv(x, parts, 3, 256, s, o, asm=False).float()
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert q.kernel == "triton-tiles" and not q._tiles_ok(x.float())  # float32 activations: float32 sums (planes)


@pytest.mark.gpu
@cuda
def test_decode_kernel_routing_by_default(monkeypatch):
    """Read whole: the tiles at every width but for 4-bit layers of up to TINYGEMM_MAX weights, which
    run tinygemm (or when asked for); read below the stored width, or asked for, the bit planes."""
    for bits in (2, 3, 5, 8):
        assert quant_layer(64, 256, bits, 64).kernel == "triton-tiles"
    assert quant_layer(64, 256, 4, 64).kernel == "tinygemm-int4"
    monkeypatch.setattr(linear, "TINYGEMM_MAX", 64 * 256 - 1)
    assert quant_layer(64, 256, 4, 64).kernel == "triton-tiles"
    q = quant_layer(64, 256, 4, 64)
    q.set_prefer("tinygemm")
    assert q.kernel == "tinygemm-int4"
    q = quant_layer(64, 256, 3, 64, 0, 8)
    q.set_read_bits(3)
    assert q.kernel == "triton-gemv"
    q = quant_layer(64, 256, 3, 64)
    q.set_prefer("planes")
    assert q.kernel == "triton-gemv"


def test_int8_input_reference_rounds_only_the_products_input():
    """``a8``: the codes meet ``x`` rounded to int8 in blocks of 32 channels (within half a step of
    each block's scale), the offsets meet ``x`` itself."""
    torch.manual_seed(0)
    x = torch.randn(3, 256) * torch.linspace(0.1, 10, 256)
    xq, xsc = tile_gemv.quantize_input(x)
    assert xq.dtype == torch.int8 and xsc.shape == (3, 8) and xq.abs().max() <= 127
    back = (xq.float().reshape(3, 8, 32) * xsc[..., None]).reshape(3, 256)
    assert ((back - x).abs().reshape(3, 8, 32) <= xsc[..., None] / 2 + 1e-6).all()
    codes = torch.randint(0, 8, (40, 256), dtype=torch.uint8)
    tiles = tile_gemv.pack_tiles(codes, 3, 64)
    s = torch.rand(4, 64).half() * 0.02 + 0.01
    o = torch.randn(4, 64).half() * 0.05
    got = tile_gemv.tile_gemv_a8_reference(x, tiles, 3, 40, s, o)
    w_codes = codes.float() * s.float().T.repeat_interleave(64, 1)[:40]
    want = back @ w_codes.T + x @ o.float().T.repeat_interleave(64, 1)[:40].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    exact = tile_gemv.tile_gemv_reference(x, tiles, 3, 40, s, o)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group", [(2, 64), (3, 64), (4, 64), (4, 32), (5, 128), (8, 64)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_input_kernel_matches_its_reference(bits, group, rows):
    q = _layer(200, 512, bits, group)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    q(x)  # builds the tiles
    _, parts, s, o = q._fast
    ref = tile_gemv.tile_gemv_a8_reference(x, parts, bits, 200, s, o)
    for groups, split in ((4, None), (1, 1), (2, 2)):
        y = tile_gemv.tile_gemv(x, parts, bits, 200, s, o, groups=groups, split=split, a8=True).float()
        assert (y - ref).abs().max().item() < 1e-2 * ref.abs().max().item()
    q.set_prefer("tiles-a8")  # the layer's own path
    assert q.kernel == "triton-tiles-a8"
    y = q(x).float() - q.bias.float()
    assert (y - ref).abs().max().item() < 1e-2 * ref.abs().max().item()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("prefer", ["tiles", "tiles-a8"])
def test_tile_kernel_replays_from_a_cuda_graph(prefer):
    """Captured in a CUDA graph (what a compiled decode step does) and replayed on new input, the layer
    gives what it gives eagerly: nothing in the call copies from host memory or keeps a stale input."""
    q = _layer(200, 512, 3, 64)
    q.set_prefer(prefer)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(x)  # builds the tiles and compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, q(x), rtol=0, atol=0)


def _with_lowrank(q, rank, seed=0):
    """``q`` with random 8-bit twin factors of ``rank`` attached; the float32 ``L R``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lc = torch.randint(-127, 128, (q.out_features, rank), generator=g, dtype=torch.int8)
    rc = torch.randint(-127, 128, (rank, q.in_features), generator=g, dtype=torch.int8)
    ls, rs = torch.rand(q.out_features, generator=g) * 2e-2, torch.rand(rank, generator=g) * 2e-2
    q.attach_lowrank(lc, ls, rc, rs)
    return (lc.float() * ls.half().float()[:, None]) @ (rc.float() * rs.half().float()[:, None])


def test_lowrank_reference_adds_x_r_l():
    """The torch reference of the fused twin product: the tiles' product plus (x R^T) L^T (CPU)."""
    q = quant_layer(64, 128, 4, 32, device="cpu")
    lr = _with_lowrank(q, 5)
    parts = tile_gemv.pack_tiles(q.codes(), 4, 32)
    scale, zero = q.grid()
    pad = (0, 0, 0, parts[0].shape[0] * parts[0].shape[2] - 64)
    s, o = nn.functional.pad(scale, pad).T.half(), nn.functional.pad(-zero * scale, pad).T.half()
    x = torch.randn(3, 128)
    lowrank = tuple(q._buffers[n] for n in linear.LOWRANK_BUFFERS)
    torch.testing.assert_close(tile_gemv.tile_gemv_reference(x, parts, 4, 64, s, o, lowrank),
                               tile_gemv.tile_gemv_reference(x, parts, 4, 64, s, o) + x @ lr.T)
    with pytest.raises(ValueError, match="lowrank must be int8"):
        tile_gemv._check_lowrank((lowrank[0].float(), *lowrank[1:]), 64, 128, 2)
    with pytest.raises(ValueError, match="lowrank must be int8"):
        tile_gemv._check_lowrank(lowrank, 64, 256, 2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,group,inp,rank", [(4, 64, 512, 70), (3, 32, 576, 1), (2, 64, 1024, 16),
                                                 (4, 32, 4096, 130)])
@pytest.mark.parametrize("rows", [1, 5])
def test_twin_layer_adds_its_low_rank_part_in_the_tile_launch(bits, group, inp, rank, rows):
    """A twin layer on the tiles: grid product plus (x R^T) L^T from one launch, equal to the dequantized
    matmul, at any split along K, with int8 input too; the workspaces and flags left at zero."""
    q = _layer(200, inp, bits, group)
    _with_lowrank(q, rank)
    assert q.kernel == "triton-tiles"
    x, ref, _ = decode_matches_dequantized(q, rows, "triton-tiles")
    plain = nn.functional.linear(x.float(), q.dequantize(torch.float32, lowrank=False), q.bias.float())
    assert (ref - plain).abs().max() > 0.05 * ref.abs().max()  # the low-rank part is not negligible
    _, parts, s, o = q._fast
    lowrank = tuple(q._buffers[n] for n in linear.LOWRANK_BUFFERS)
    want = tile_gemv.tile_gemv_reference(x, parts, bits, 200, s, o, lowrank)
    ng = inp // group
    for split, a8 in ((1, False), (2, False), (4, False), (1, True), (2, True)):
        if (ng // tile_gemv.groups_a_step(ng, 8)) % split:
            continue
        for _ in range(3):  # again: the flags and counts were put back
            y = tile_gemv.tile_gemv(x, parts, bits, 200, s, o, split=split, a8=a8, lowrank=lowrank)
            assert (y.float() - want).abs().max().item() < 1e-2 * want.abs().max().item(), (split, a8)
    assert all(not ws.any() and not cnt.any() for ws, cnt in tile_gemv._WORKSPACE.values())
    assert all(not w[2].any() and not w[3].any() for w in tile_gemv._LOWRANK_WORKSPACE.values())  # u's counts, flags


@pytest.mark.gpu
@cuda
def test_twin_tile_kernel_replays_from_a_cuda_graph():
    q = _layer(300, 1024, 4, 64)
    _with_lowrank(q, 40)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, q(x), rtol=0, atol=0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("epilogue", ["kernel", "torch"])
@pytest.mark.parametrize("outs", [(128, 64, 96), (200, 56)])
def test_stacked_twin_layers_match_the_separate_layers(outs, epilogue, monkeypatch):
    """Twin layers stacked (q/k/v-like): one launch whose blocks each read their own layer's rows of L and u
    (a block table); layers whose rows do not fill whole blocks of 32 (200 + 56) add the factors after the
    kernel instead. Either way the outputs equal the separate layers', with ``u L^T`` added in the launch
    or by torch from the ``u`` it hands back (``linear.TWIN_EPILOGUE``)."""
    monkeypatch.setattr(linear, "TWIN_EPILOGUE", epilogue)
    layers = []
    for i, out in enumerate(outs):
        q = _layer(out, 512, 4, 64)
        if i != 1:  # one layer without factors
            _with_lowrank(q, 7 + 13 * i, seed=i)
        layers.append(q)
    stacked = QuantLinear.stack(layers)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    want = torch.cat([m(x).float() for m in layers], -1)
    ref = nn.functional.linear(x.float(), stacked.dequantize(torch.float32), stacked.bias.float())
    for _ in range(2):
        y = stacked(x).float()
        assert (y - want).abs().max().item() < 1e-2 * want.abs().max().item()
        assert (y - ref).abs().max().item() < 1e-2 * ref.abs().max().item()
    assert (stacked._lr_table is not None) == all(o % 32 == 0 for o in outs[:-1])


@pytest.mark.gpu
@cuda
def test_twin_layer_compiled_adds_u_l_in_torch(monkeypatch):
    """Under torch.compile a twin layer's launch hands ``u`` back and the compiled graph adds ``u L^T``
    (``TWIN_EPILOGUE = "auto"``); the result equals the eager layer's (the product in the launch), in a
    CUDA graph too, and the in-launch path still gives the same afterwards (its flags were left clear)."""
    monkeypatch.setattr(linear, "TWIN_EPILOGUE", "auto")
    torch.manual_seed(0)
    q = _layer(256, 1024, 4, 64)
    _with_lowrank(q, 40, seed=0)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    want = q(x).float()
    compiled = torch.compile(q, dynamic=False)
    for _ in range(2):
        y = compiled(x).float()
        assert (y - want).abs().max().item() < 1e-2 * want.abs().max().item()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = compiled(x)
    g.replay()
    assert (out.float() - want).abs().max().item() < 1e-2 * want.abs().max().item()
    # eager again: in the launch (the flag it waits on was left clear by the launches that handed u back)
    assert (q(x).float() - want).abs().max().item() < 1e-2 * want.abs().max().item()


def test_stacked_lowrank_reference_reads_each_blocks_rows_of_l():
    """The block table of stacked twin layers (CPU): each block of 32 outputs its layer's u offset, rank and
    rows of the flat L; the reference with it equals the stacked layer's own dequantized matmul. Layers
    whose rows do not fill whole blocks get no table (their factors are added after the kernel)."""
    layers = []
    for i, (out, rank) in enumerate(((64, 5), (32, 0), (64, 3))):
        q = quant_layer(out, 128, 4, 32, device="cpu")
        if rank:
            _with_lowrank(q, rank, seed=i)
        layers.append(q)
    stacked = QuantLinear.stack(layers)
    table = tile_gemv.lowrank_blocks(stacked.lr_segments, 160, "cpu")
    assert table.tolist() == [[0, 5, 0], [0, 5, 160], [5, 0, 320], [5, 3, 320], [5, 3, 416]]
    parts = tile_gemv.pack_tiles(stacked.codes(), 4, 32)
    scale, zero = stacked.grid()
    s, o = scale.T.half(), (-zero * scale).T.half()
    x = torch.randn(2, 128)
    lowrank = (*(stacked._buffers[n] for n in linear.LOWRANK_BUFFERS), table)
    want = x @ stacked.dequantize(torch.float32).T
    torch.testing.assert_close(tile_gemv.tile_gemv_reference(x, parts, 4, 160, s, o, lowrank), want,
                               rtol=1e-3, atol=1e-3 * want.abs().max().item())
    assert tile_gemv.lowrank_blocks([(0, 40, 0, 2, 0), (40, 72, 2, 2, 80)], 72, "cpu") is None
