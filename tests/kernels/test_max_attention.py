"""KVzip's max attention on the GPU: the Triton kernel against the pure-torch reference, and the
fused attention (output + log-sum-exp) against SDPA."""

import pytest
import torch

from memfit.hfcompat import with_cache
from memfit.kernels import max_attention as kernel
from memfit.kv.attention import attention_with_lse, max_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_tensors_take_the_torch_path():
    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 30, 64)
    assert not kernel.supported(q, k)
    assert max_attention(q, k, torch.zeros(1, 4, 8), 0.1).shape == (1, 2, 30)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("nq,nk", [(37, 300), (130, 1000)])
def test_kernel_equals_the_torch_reference(d, nq, nk):
    g = torch.Generator(device="cuda").manual_seed(d + nq)
    b, hq, h = 2, 8, 2
    q = torch.randn(b, hq, nq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, h, nk + 5, d, device="cuda", generator=g).bfloat16()[:, :, 5:]  # a slice, as the cache's
    lse = torch.randn(b, hq, nq, device="cuda", generator=g) + 8.0
    got = kernel.max_attention(q, k, lse, d ** -0.5)
    want = max_attention(q.cpu().float(), k.cpu().float(), lse.cpu(), d ** -0.5)  # the torch path
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cudnn", [True, False])
def test_fused_attention_on_cuda_equals_sdpa(cudnn, monkeypatch):
    monkeypatch.setattr("memfit.kv.attention._cudnn_ok", cudnn)  # False: the flash kernel
    g = torch.Generator(device="cuda").manual_seed(3)
    b, hq, h, nq, n, d = 1, 8, 2, 100, 400, 64
    nk = n + nq
    q, k, v = (torch.randn(b, x, y, d, device="cuda", generator=g).bfloat16() for x, y in ((hq, nq), (h, nk), (h, nk)))
    causal = (torch.arange(nk, device="cuda") <= torch.arange(n, nk, device="cuda").unsqueeze(-1))[None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.125, enable_gqa=True)
    out, lse = attention_with_lse(q, k, v, causal, 0.125, split=True)  # context + causal square: two flash calls
    torch.testing.assert_close(out.float(), ref.transpose(1, 2).float(), rtol=2e-2, atol=2e-2)
    logits = (q.float() @ k.float().repeat_interleave(hq // h, dim=1).transpose(-1, -2)) * 0.125
    want_lse = logits.masked_fill(~causal, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-2)
    assert attention_with_lse(q, k, v, causal, 0.125, split=False) is None  # the flash kernel takes no mask


@pytest.mark.gpu
@gpu
def test_kvzip_scores_on_cuda_match_the_unfused_pass(monkeypatch):
    """The whole repeat pass on a bf16 model on CUDA: flash + kernel against SDPA + blocked
    probabilities (bf16 attention outputs differ in rounding between the two, hence the tolerance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.kv.cache import CompressedCache
    from memfit.kv.evict.kvzip import reconstruction_scores, repeat_inputs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    cfg._attn_implementation = "memfit"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 250, (1, 700), device="cuda")
    inputs = repeat_inputs([1, 2, 3], ids[0].tolist(), chunk=256, overlap=8)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr("memfit.kv.attention.attention_with_lse", lambda *a: None)
        cache = CompressedCache("none", 2, defer=True)
        with torch.no_grad():
            model(ids, **with_cache(model, cache), use_cache=True)
        runs.append(reconstruction_scores(model, cache, inputs))
    for layer in range(2):
        torch.testing.assert_close(runs[0][layer].float(), runs[1][layer].float(), rtol=5e-2, atol=5e-3)


@pytest.mark.gpu
@gpu
def test_masked_attention_on_cuda_never_runs_cudnn(monkeypatch):
    """cuDNN builds a kernel for every new masked shape, and each decode step is one (seconds for a
    first answer): memfit's attention leaves it out of masked calls with few queries, and only those."""
    import memfit.kv.attention as attention
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = []
    real = attention.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((mask is not None, torch.backends.cuda.cudnn_sdp_enabled()))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    cfg = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    cfg._attn_implementation = "memfit"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        for n in (12, 200):  # a question, a prefill chunk
            ids = torch.randint(0, 250, (2, n), device="cuda")
            padded = torch.ones(2, n, dtype=torch.long, device="cuda")
            padded[0, :3] = 0
            model(ids, attention_mask=padded)  # padding: a mask
            model(ids)  # causal, no padding: no mask
    assert [m for m, _ in seen] == [True, False, True, False]
    assert seen[0][1] is False and all(cudnn == before for _, cudnn in seen[1:])  # the others: the caller's choice
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
