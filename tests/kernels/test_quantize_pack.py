import pytest
import torch

from memfit.hfcompat import with_cache
from memfit.kernels import quantize_pack
from memfit.kv.quant import dequantize, quantize_keys, quantize_values

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_tensors_take_the_torch_path():
    k = torch.randn(1, 2, 64, 64)
    assert not quantize_pack.supports(k, 4, 64)
    a, b = quantize_keys(k, 4, 32), quantize_keys(k, 4, 32, use_kernels=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_equals_the_torch_reference_exactly(bits, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(bits * d)
    full = torch.randn(2, 3, 300, d, device="cuda", generator=g).to(dtype) * 3
    full[0, 1, 5, 7] = 200.0  # an outlier: its group's range must follow
    x = full[:, :, :256]  # a slice (not contiguous in tokens), as the cache's window spill is
    for group in (32, 64):
        want, got = quantize_keys(x, bits, group, use_kernels=False), quantize_keys(x, bits, group)
        for n in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, n), getattr(want, n)), (n, group)
    for vgroup in (d // 2, d, 32) if d == 64 else (d // 2, d):
        xv = full[:, :, :293]  # not a multiple of the kernel's token block
        want, got = quantize_values(xv, bits, vgroup, use_kernels=False), quantize_values(xv, bits, vgroup)
        for n in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, n), getattr(want, n)), (n, vgroup)
        err = (dequantize(got) - xv.float()).abs().max()
        assert err <= (got.scale.float().max() / 2 + 1e-3)  # within half a step of the largest group's


@pytest.mark.gpu
@gpu
def test_cache_spills_through_the_kernel_on_cuda():
    from memfit.kv.cache import CompressedCache

    torch.manual_seed(0)
    cache = CompressedCache("kivi(bits=4,group=32,residual=32)", 1)
    k = torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    want = quantize_keys(k[:, :, : layer.qk.num_tokens], 4, 32, use_kernels=False)
    assert torch.equal(layer.qk.codes, want.codes) and torch.equal(layer.qk.scale, want.scale)


@pytest.mark.gpu
@gpu
def test_outliers_are_quantized_on_the_torch_path_and_decoded_by_the_kernel_on_cuda():
    from memfit.kv.cache import CompressedCache

    x = torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(3))
    x[0, 1, 7, 5] = 80.0
    for quantize in (quantize_keys, quantize_values):
        on_gpu, on_cpu = quantize(x.cuda(), 4, 64, outliers=0.01), quantize(x, 4, 64, outliers=0.01)
        assert torch.equal(on_gpu.out_idx.cpu(), on_cpu.out_idx) and torch.equal(on_gpu.out_val.cpu(), on_cpu.out_val)
        # the same computation on another device: at most one step apart where rounding falls differently
        assert (dequantize(on_gpu).cpu() - dequantize(on_cpu)).abs().max() <= on_cpu.scale.float().max() + 1e-3
    cache = CompressedCache("kivi(bits=4,group=64,residual=16,outliers=0.01)", 1).use_kernels()
    k = torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.bfloat16)
    cache.update(k, k.clone(), 0)
    assert cache.layers[0].qk.out_idx is not None
    assert cache.layers[0].fast_decode(k[:, :, :1])  # the decode kernel reads the sparse outliers' lists


@pytest.mark.gpu
@gpu
def test_pre_rope_keys_on_cuda_read_back_rotated():
    from conftest import tiny_llama
    from transformers import DynamicCache

    from memfit.kv.cache import CompressedCache

    model = tiny_llama(torch.float32).cuda()
    ids = torch.randint(0, 250, (1, 90), device="cuda")
    cache = CompressedCache.for_model(model, "kivi(bits=8,group=16,residual=16,pre_rope=true)").use_kernels()
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        model(ids, **with_cache(model, ref))
    layer = cache.layers[0]
    assert layer.pre_rope and not layer.fast_decode(ids[:, None, :1].float())  # the kernel reads post-RoPE keys only
    keys = ref.layers[0].keys
    assert (layer.materialize()[0] - keys).abs().max() < 0.02 * keys.abs().max()
