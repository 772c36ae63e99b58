"""The static window's append: the kernel against its reference (and the definition)."""

import pytest
import torch

from memfit.kernels.window_append import append, append_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,dv,dtype", [(128, 128, torch.float32), (64, 96, torch.bfloat16)])
def test_append_writes_the_token_at_the_length_and_counts_it(device, d, dv, dtype):
    gen = torch.Generator().manual_seed(0)
    b, h, w = 3, 4, 20
    keys = torch.randn(b, h, w, d, generator=gen).to(device, torch.bfloat16)
    values = torch.randn(b, h, w, dv, generator=gen).to(device, torch.bfloat16)
    lens = torch.full((b, h), 7, dtype=torch.int32, device=device)
    # the new token as attention hands it over: [B, 1, H, D] transposed (not contiguous), in the compute dtype
    key = torch.randn(b, 1, h, d, generator=gen).to(device, dtype).transpose(1, 2)
    value = torch.randn(b, 1, h, dv, generator=gen).to(device, dtype).transpose(1, 2)
    want_k, want_v = keys.clone(), values.clone()
    want_k[:, :, 7], want_v[:, :, 7] = key[:, :, 0].to(torch.bfloat16), value[:, :, 0].to(torch.bfloat16)
    ref_k, ref_v, ref_lens = keys.clone(), values.clone(), lens.clone()
    append_reference(ref_k, ref_v, key, value, ref_lens)
    append(keys, values, key, value, lens)
    for got, ref, want in ((keys, ref_k, want_k), (values, ref_v, want_v)):
        assert torch.equal(got, want) and torch.equal(ref, want)
    assert (lens == 8).all() and (ref_lens == 8).all()
