"""memfit's attention function against transformers' SDPA path."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from memfit.kv.attention import memfit_attention_forward


class _Layer(torch.nn.Module):
    num_key_value_groups = 3
    layer_idx = 0


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_masked_grouped_attention_equals_transformers_sdpa(rows):
    """A masked call with fewer KV heads than query heads (a question over a cache, recomputed
    rows) reads K and V grouped on a CPU instead of repeated per head: the same output."""
    torch.manual_seed(0)
    n = 300
    q, k, v = torch.randn(2, 9, rows, 16), torch.randn(2, 3, n, 16), torch.randn(2, 3, n, 16)
    mask = torch.arange(n) <= torch.arange(n - rows, n).unsqueeze(-1)
    mask = mask[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :7] = False  # a padded row
    layer = _Layer().eval()
    got, _ = memfit_attention_forward(layer, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, rows, 9, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
