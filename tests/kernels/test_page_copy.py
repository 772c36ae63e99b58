"""The page-copy step of tiered decoding: the kernel against its reference, and bad input."""

import pytest
import torch

from memfit.kernels.page_copy import copy_records, copy_records_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [[96], [32, 48, 8, 8]])
def test_copy_records_takes_only_the_chosen_entries(device, widths):
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (50, sum(widths)), generator=gen, dtype=torch.uint8)
    index = torch.randint(0, 50, (40,), generator=gen)
    slot = torch.randperm(64, generator=gen)[:40]
    take = torch.rand(40, generator=gen) < 0.5
    outs = [torch.randint(0, 256, (64, w), generator=gen, dtype=torch.uint8) for w in widths]
    want = [o.clone() for o in outs]
    for e in range(40):  # the definition, entry by entry
        if take[e]:
            at = 0
            for w, o in zip(widths, want):
                o[slot[e]] = src[index[e], at : at + w]
                at += w
    ref = [o.clone() for o in outs]
    copy_records_reference(src, index, slot, take, ref)
    assert all(torch.equal(a, b) for a, b in zip(ref, want))
    got = [o.to(device) for o in outs]
    copy_records(src.to(device), index.to(device), slot.to(device), take.to(device), got)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


def test_copy_records_bad_input():
    src = torch.zeros(4, 16, dtype=torch.uint8)
    i = torch.zeros(2, dtype=torch.long)
    t = torch.ones(2, dtype=torch.bool)
    with pytest.raises(TypeError, match="uint8"):
        copy_records(src.float(), i, i, t, [torch.zeros(2, 16, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="do not make records"):
        copy_records(src, i, i, t, [torch.zeros(2, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="one length"):
        copy_records(src, i, i[:1], t, [torch.zeros(2, 16, dtype=torch.uint8)])
