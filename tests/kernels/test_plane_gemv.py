import pytest
import torch
from conftest import decode_matches_dequantized, quant_layer
from torch import nn


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("bits,read,group,meta_bits,inp", [
    (2, 2, 64, 0, 512), (3, 3, 32, 0, 576), (3, 3, 48, 8, 576), (5, 5, 128, 0, 512), (8, 8, 64, 8, 512),
    (8, 3, 64, 0, 576), (8, 6, 16, 0, 512), (4, 2, 256, 6, 512)])  # 576 = 2.25 steps of 256 channels
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_plane_gemv_matches_the_dequantized_matmul(bits, read, group, meta_bits, inp, rows):
    q = quant_layer(200, inp, min(bits, read), group, meta_bits, bits)  # 200 rows: a partial block of outputs
    q.set_read_bits(read)
    q.set_prefer("planes")  # read whole, a layer's default is the tile GEMV
    decode_matches_dequantized(q, rows, "triton-gemv")


def test_more_rows_than_a_gemv_go_through_the_dequantized_matmul():
    q = quant_layer(64, 256, 3, 32, 0, 3)
    x = torch.randn(2, 40, 256, device="cuda", dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    for y, r in ((q(x), ref), (q(x[:, :1]), ref[:, :1])):  # 80 rows: dequantized; 2 rows: the GEMV
        assert (y.float() - r).abs().max() < 1e-2 * r.abs().max()
