"""QDEC: a quantized layer corrected on each token's largest input channels by its residual in host memory."""

import json

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import memfit
from memfit.weights import QuantLinear, WeightQuant, quantize_, save_quantized, weight_bytes
from memfit.weights import qdec
from memfit.weights.grid import rtn


def _layer(out=48, inp=128, bits=3, seed=0) -> tuple[nn.Linear, QuantLinear]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True)
    lin.weight.data = torch.randn(out, inp, generator=g) * 0.05
    lin.bias.data = torch.randn(out, generator=g) * 0.01
    uc = rtn(lin.weight.data, bits, 32)
    return lin, QuantLinear.from_codes(lin, uc.codes, bits, scale=uc.scale.half(), zero=uc.zero.half(), group_size=32)


def _x(rows=5, inp=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, inp, generator=g)
    x[..., 7] *= 30  # an outlier channel, as LLM activations have
    return x


def test_every_channel_selected_restores_the_unquantized_layer():
    lin, q = _layer()
    x = _x()
    q.attach_residual(lin.weight.data, k=128, bits=32)
    torch.testing.assert_close(q(x), lin(x), rtol=2e-6, atol=2e-6)  # float32 sums in another order only
    q.attach_residual(lin.weight.data, k=128, bits=16)  # the residual rounded to float16
    assert 0 < (q(x) - lin(x)).abs().max() < 1e-3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [5, 40])  # 2 x 5 x 6 channels: each row's own; 2 x 40 x 6 > 128: their union
def test_correction_is_the_residual_on_each_rows_top_channels(bits, rows):
    lin, q = _layer()
    x = _x(rows)
    plain = q(x)
    q.attach_residual(lin.weight.data, k=6, bits=bits)
    residual = qdec.decode_rows(q.qdec_codes, q.qdec_scale, bits).T  # [out, in], as stored
    err = (residual - (lin.weight.data - q.dequantize(torch.float32))).abs().max()
    assert 0 < err <= (lin.weight.data - q.dequantize(torch.float32)).abs().max() / ((1 << (bits - 1)) - 1)
    want = plain.clone()
    for b in range(2):
        for t in range(rows):  # each row its own 6 largest |x| channels
            top = x[b, t].abs().topk(6).indices
            want[b, t] += residual[:, top] @ x[b, t, top]
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    # the outlier channel's share of the error is what the few channels buy back
    exact = (lin(x) - plain).norm()
    assert (lin(x) - q(x)).norm() < 0.9 * exact


def test_residual_stays_in_host_memory_and_out_of_the_layer_bytes():
    lin, q = _layer()
    before = q.nbytes
    q.attach_residual(lin.weight.data, k=3, bits=8)
    assert q.nbytes == before and q.resident_nbytes == before  # the device's bytes do not change
    assert q.qdec_nbytes == 128 * 48 + 2 * 128  # a byte a weight and a float16 scale a channel
    q.to(torch.float64)  # moving or casting the layer leaves the residual as stored
    assert q.qdec_codes.dtype == torch.uint8 and q.qdec_scale.dtype == torch.float16


def test_quantize_with_qdec_reports_host_bytes_and_saves_and_loads(tmp_path, tiny_model_dir):
    lm = memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32")
    plain = tiny_llama(torch.float32)
    plain.load_state_dict(lm.model.state_dict())
    cfg = WeightQuant(bits=3, group_size=32, method="rtn", qdec_channels=0.05, qdec_bits=8)
    report = quantize_(lm.model, cfg, progress=False)
    quantize_(plain, WeightQuant(bits=3, group_size=32, method="rtn"), progress=False)
    layer = next(m for m in lm.model.modules() if isinstance(m, QuantLinear))
    assert layer.qdec_k == round(0.05 * layer.in_features) and report.host_nbytes > 0
    wb = weight_bytes(lm.model)
    assert wb["quantized"] == report.nbytes == weight_bytes(plain)["quantized"] and wb["host"] == report.host_nbytes
    out = save_quantized(lm.model, lm.tokenizer, tmp_path / "q", report)
    assert json.loads((out / "memfit_quant.json").read_text())["format"] == 3
    back = memfit.load_model(str(out), "cpu")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        got, want, without = back.model(ids).logits, lm.model(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, without)


def test_layers_called_with_one_tensor_share_its_top_k():
    """q, k and v (gate and up) get the same input tensor: one top-k serves them, until that tensor
    changes in place or another comes."""
    x = _x(3)
    a = qdec.chosen(x, 5)
    assert qdec.chosen(x, 5) is a and qdec.chosen(x, 4) is not a
    torch.testing.assert_close(a, x.reshape(-1, x.shape[-1]).abs().topk(5, dim=-1).indices)
    b = qdec.chosen(x, 5)
    x[..., 0] = 1e6  # in place: channel 0 now leads every row
    c = qdec.chosen(x, 5)
    assert c is not b and (c[:, 0] == 0).all()
    assert qdec.chosen(x.clone(), 5) is not c


def test_bad_qdec_configs_are_named():
    with pytest.raises(ValueError, match="qdec_bits"):
        WeightQuant(qdec_channels=0.02, qdec_bits=3)
    with pytest.raises(ValueError, match="qdec_channels"):
        WeightQuant(qdec_channels=1.5)
    lin, q = _layer()
    with pytest.raises(ValueError, match="k must be in 1..128"):
        q.attach_residual(lin.weight.data, k=129)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 32])
def test_gpu_layer_reads_its_residual_from_pinned_host_memory(bits):
    lin, q = _layer()
    q.attach_residual(lin.weight.data, k=6, bits=bits)
    for rows in (1, 40):  # a decode step (read through the device's view, fixed shapes) and a prefill
        x = _x(rows)
        q.cpu()
        want = q(x)
        q.cuda()
        assert q.planes.is_cuda and not q.qdec_codes.is_cuda and q.qdec_codes.is_pinned()
        assert q._qdec_views is not None and q._qdec_views[0].is_cuda
        assert q._qdec_pinned[0].buf.numel() == q.qdec_codes.numel() * q.qdec_codes.element_size()  # exact size
        torch.testing.assert_close(q(x.cuda()).cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_correction_on_a_side_stream_equals_inline_also_in_a_cuda_graph():
    """The correction overlapped with the layer's product (a side stream, joined before the sum)
    gives the inline result, eagerly and replayed from a CUDA graph with new inputs."""
    lin, q = _layer(out=256, inp=512)
    q.attach_residual(lin.weight.data, k=10, bits=8)
    q.cuda()
    x = _x(1, inp=512).cuda().bfloat16()
    try:
        QuantLinear.qdec_overlap = False
        want = q(x)
        QuantLinear.qdec_overlap = True
        assert q._qdec_begin(x) is not None  # the side-stream path is taken
        torch.testing.assert_close(q(x), want, rtol=1e-2, atol=1e-2)  # the kernel's atomic adds: any order
        static = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            q(static)  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = q(static)
        x2 = _x(1, inp=512, seed=9).cuda().bfloat16()
        static.copy_(x2)
        graph.replay()
        QuantLinear.qdec_overlap = False
        torch.testing.assert_close(out, q(x2), rtol=1e-2, atol=1e-2)
    finally:
        QuantLinear.qdec_overlap = True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,k", [(1, 6), (2, 13), (3, 4)])
def test_fused_gather_kernel_equals_the_torch_path(rows, k, monkeypatch):
    """The one-launch correction (8-bit residual read from pinned host memory) against the unfused
    torch path on the same device view."""
    from memfit.kernels import qdec_gather

    lin, q = _layer(out=3000, inp=256)  # outputs not a multiple of the kernel's block
    q.attach_residual(lin.weight.data, k=k, bits=8)
    q.cuda()
    x = _x(rows, inp=256).cuda().bfloat16()[:1]
    got = qdec.correction(x, q.qdec_codes, q.qdec_scale, 8, k, q._qdec_views)
    assert qdec_gather.supported(x, q._qdec_views[0], 8)
    monkeypatch.setattr(qdec_gather, "supported", lambda *a: False)
    want = qdec.correction(x, q.qdec_codes, q.qdec_scale, 8, k, q._qdec_views)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_bench_refuses_qdec_on_stacked_projections_before_building_a_model():
    from memfit.bench import bench_weight_decode

    with pytest.raises(ValueError, match="do not stack"):
        bench_weight_decode(qdec_channels=0.01, fuse=True)
