"""The page-copy step of tiered decoding: the kernel against its reference, and bad input."""

import pytest
import torch

from memfit.kernels.page_copy import copy_field, copy_field_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_copy_field_takes_only_the_chosen_entries(device):
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (50, 96), generator=gen, dtype=torch.uint8)
    src = src.pin_memory() if device == "cuda" else src
    index = torch.randint(0, 50, (40,), generator=gen)
    slot = torch.randperm(64, generator=gen)[:40]
    take = torch.rand(40, generator=gen) < 0.5
    out = torch.randint(0, 256, (64, 32), generator=gen, dtype=torch.uint8)
    want = out.clone()
    for e in range(40):  # the definition, entry by entry
        if take[e]:
            want[slot[e]] = src[index[e], 16:48]
    ref = out.clone()
    copy_field_reference(src, index, slot, take, ref, 16)
    assert torch.equal(ref, want)
    dev = out.to(device)
    s = src.to(device) if device == "cuda" else src
    copy_field(s, index.to(device), slot.to(device), take.to(device), dev, 16)
    assert torch.equal(dev.cpu(), want)


def test_copy_field_bad_input():
    src = torch.zeros(4, 16, dtype=torch.uint8)
    i = torch.zeros(2, dtype=torch.long)
    t = torch.ones(2, dtype=torch.bool)
    with pytest.raises(TypeError, match="uint8"):
        copy_field(src.float(), i, i, t, torch.zeros(2, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="not inside records"):
        copy_field(src, i, i, t, torch.zeros(2, 8, dtype=torch.uint8), 12)
    with pytest.raises(ValueError, match="one length"):
        copy_field(src, i, i[:1], t, torch.zeros(2, 8, dtype=torch.uint8), 0)
