import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, tiny_qwen

from memfit.weights import QuantLinear, WeightQuant, quantize_, save_quantized, weight_bytes
from memfit.weights import linear
from memfit.weights.fuse import Part, fuse_projections, is_fused, unfuse_projections


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("make,meta_bits", [(tiny_llama, 0), (tiny_qwen, 0), (tiny_llama, 8)])
def test_fused_projections_give_the_same_logits_and_bytes(make, meta_bits):
    model, ref = make(torch.float32), make(torch.float32)
    cfg = WeightQuant(bits=4, group_size=32, method="hqq", meta_bits=meta_bits)
    quantize_(model, cfg, progress=False)
    quantize_(ref, cfg, progress=False)
    before = weight_bytes(model)
    assert fuse_projections(model) == 2 * 2  # q/k/v and gate/up in each of 2 layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, Part) and isinstance(attn.qkv_proj, QuantLinear)
    assert attn.qkv_proj.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert mlp.gate_up_proj.out_features == 2 * mlp.up_proj.out_features
    assert weight_bytes(model) == before  # the same codes and grids, held once
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    shared = attn.q_proj._shared
    assert shared.x is None and shared.y is None  # nothing of the forward is kept past it
    assert fuse_projections(model) == 0  # idempotent
    assert unfuse_projections(model) == 4 and not is_fused(model)
    for a, b in zip(model.modules(), ref.modules()):  # the separate layers back, code for code
        if isinstance(b, QuantLinear):
            assert isinstance(a, QuantLinear) and a.out_features == b.out_features
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
    assert model.state_dict().keys() == ref.state_dict().keys()  # Qwen's q/k/v biases back, Llama's none added


def test_a_part_called_alone_or_out_of_order_gets_its_own_product():
    model = tiny_llama(torch.float32)
    quantize_(model, WeightQuant(bits=4, group_size=32, method="rtn"), progress=False)
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.dequantize(torch.float32), attn.k_proj.dequantize(torch.float32)
    fuse_projections(model)
    x1, x2 = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(attn.k_proj(x1), x1 @ k.T)
    torch.testing.assert_close(attn.q_proj(x2), x2 @ q.T)  # a new input: not the rows of x1's product
    torch.testing.assert_close(attn.k_proj(x2), x2 @ k.T)
    torch.testing.assert_close(attn.q_proj(x1), x1 @ q.T)


def test_layers_that_differ_stay_apart_and_a_fused_model_is_not_saved_by_mistake(tmp_path):
    model = tiny_llama(torch.float32)
    report = quantize_(model, WeightQuant(bits=4, group_size=32, method="rtn", skip=("lm_head", "*.k_proj")),
                       progress=False)
    assert fuse_projections(model) == 2  # gate/up only: k_proj is a plain Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    with pytest.raises(ValueError, match="unfuse_projections"):
        save_quantized(model, byte_tokenizer(), tmp_path / "q", report)
    with pytest.raises(ValueError, match="stack"):
        QuantLinear.stack([QuantLinear(64, 8, 4, 32), QuantLinear(64, 8, 3, 32)])
    with pytest.raises(ValueError, match="rows"):
        QuantLinear(64, 8, 4, 32).rows(4, 12)


def test_fused_projections_compile_without_a_graph_break():
    model = tiny_llama(torch.float32)
    quantize_(model, WeightQuant(bits=4, group_size=32, method="rtn"), progress=False)
    ids = torch.randint(0, 256, (1, 8))
    want = _logits(model, ids)
    fuse_projections(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    torch.testing.assert_close(_logits(compiled, ids), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(compiled, ids), want, rtol=1e-5, atol=1e-5)
    assert model.model.layers[1].mlp.gate_proj._shared.y is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:TensorFloat32")  # inductor's note about float32 matmuls, raised as an error
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fused_tile_kernels_compiled_give_the_separate_layers_logits(bits, monkeypatch):
    """On the GPU the stack runs one tile GEMV where there were three (and two): compiled with inductor,
    its logits stay those of the separate layers run eagerly (the same codes, the same per-row sums)."""
    model = tiny_llama(torch.bfloat16).cuda()
    quantize_(model, WeightQuant(bits=bits, group_size=32, method="hqq"), progress=False)
    ids = torch.randint(0, 256, (1, 1), device="cuda")
    want = _logits(model, ids).float()
    fuse_projections(model)
    monkeypatch.setattr(linear, "TINYGEMM_MAX", 0)  # the tiles at every width, whatever the size
    assert model.model.layers[0].self_attn.qkv_proj.kernel == "triton-tiles"
    eager = _logits(model, ids).float()  # builds the stacks' tiles, outside what torch.compile traces
    assert (eager - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    torch._dynamo.reset()
    got = _logits(torch.compile(model, fullgraph=True), ids).float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_16_bit_projections_stack_too_and_come_back_as_they_were(make):
    from memfit.weights.fuse import StackedLinear

    model, ref = make(torch.float32), make(torch.float32)
    assert fuse_projections(model) == 4
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, StackedLinear) and isinstance(attn.k_proj, Part)
    assert attn.qkv_proj.weight.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, 64)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(model) == n_params(ref)  # held once
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert unfuse_projections(model) == 4 and not is_fused(model)
    assert model.state_dict().keys() == ref.state_dict().keys()  # Qwen's q/k/v biases back, Llama's none added
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n


def test_twin_layers_stack_with_their_factors_and_come_back_exactly():
    """Twin layers (different ranks, one without factors) stack: the same products and bytes, R's rows
    one after another and each L kept apart; rows() gives each layer back, factors and all."""
    torch.manual_seed(0)
    layers = []
    for out, rank in ((64, 5), (32, 0), (32, 3)):
        q = QuantLinear(64, out, 4, 32, bias=True, dtype=torch.float32)
        q.planes.random_(0, 256)
        q.scale.uniform_(0.01, 0.02)
        q.zero.uniform_(0, 15)
        q.bias.data.normal_()
        if rank:
            q.attach_lowrank(torch.randint(-127, 128, (out, rank), dtype=torch.int8), torch.rand(out) * 1e-2,
                             torch.randint(-127, 128, (rank, 64), dtype=torch.int8), torch.rand(rank) * 1e-2)
        layers.append(q)
    stacked = QuantLinear.stack(layers)
    # the same bytes, but L's float16 scales for the rows of the layer without factors (zeros)
    assert stacked.rank == 8 and stacked.nbytes == sum(m.nbytes for m in layers) + 2 * 32
    x = torch.randn(3, 64)
    torch.testing.assert_close(stacked(x), torch.cat([m(x) for m in layers], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.dequantize(torch.float32),
                               torch.cat([m.dequantize(torch.float32) for m in layers]))
    # u L^T a layer at a time (what torch adds after a launch that hands u back) = the block-diagonal L
    u = torch.randn(3, 8)
    torch.testing.assert_close(stacked._lowrank_from_u(u), u @ stacked._factors()[0].T, rtol=1e-5, atol=1e-5)
    for m, (a, b) in zip(layers, ((0, 64), (64, 96), (96, 128))):
        back = stacked.rows(a, b)
        assert back.rank == m.rank and back.lr_segments is None
        for name in ("planes", "scale", "zero", *(linear.LOWRANK_BUFFERS if m.rank else ())):
            assert torch.equal(back._buffers[name], m._buffers[name]), name
    with pytest.raises(ValueError, match="one stacked layer"):
        stacked.rows(60, 70)  # across two stacked layers' factors
    with pytest.raises(ValueError, match="not stacked twin layers"):
        QuantLinear.stack([stacked, layers[0]])
