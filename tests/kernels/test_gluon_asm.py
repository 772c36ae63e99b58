"""The PTX that the Gluon decode kernel inlines to turn code bytes into float16 operands, run by a
small emulator of the two instructions it uses (``prmt``, ``and``): every code must come out as
the float16 subnormal ``code * 2**(bits*m) * 2**-24`` in the lane the MMA expects. (The kernel
itself is checked against the torch reference on the GPU.)"""

import random
import re

import pytest
import torch

from memfit.kernels.gluon_decode import _key_asm, _value_asm


def _run(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    regs = dict(inputs)

    def val(x: str) -> int:
        x = x.strip()
        return int(x, 0) if x[0].isdigit() else regs[x]

    for op, args in re.findall(r"(prmt\.b32|and\.b32)\s+([^;]+);", asm):
        d, *src = (a.strip() for a in args.split(","))
        if op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        else:  # prmt, default mode: each selector nibble picks one of the 8 bytes of {b, a}
            pool = (val(src[1]) << 32) | val(src[0])
            sel = val(src[2])
            regs[d] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
    return regs


def _halves(reg: int) -> tuple[int, int]:
    return reg & 0xFFFF, reg >> 16


def _subnormal(bits16: int) -> float:
    return float(torch.tensor([bits16], dtype=torch.int16).view(torch.float16).item())


@pytest.mark.parametrize("bits", [2, 4])
def test_key_codes_become_exact_subnormals(bits):
    rng = random.Random(bits)
    per, mask = 8 // bits, (1 << bits) - 1
    for _ in range(50):
        data = [rng.randrange(256) for _ in range(4)]
        out = _run(_key_asm(bits), {f"${2 * per}": int.from_bytes(bytes(data), "little")})
        for m in range(per):
            got = [*_halves(out[f"${2 * m}"]), *_halves(out[f"${2 * m + 1}"])]  # elements 0..3 = bytes 0..3
            for byte, h in zip(data, got):
                code = (byte >> (bits * m)) & mask
                assert h == code << (bits * m)  # a float16 with a zero exponent
                assert _subnormal(h) == code * 2 ** (bits * m) * 2.0**-24


@pytest.mark.parametrize("bits,word", [(4, 32), (2, 32), (4, 16), (2, 16)])
def test_value_codes_pair_two_tokens_per_register(bits, word):
    rng = random.Random(bits * word)
    per, mask, nbytes = 8 // bits, (1 << bits) - 1, word // 8
    n_out = nbytes * per
    for _ in range(50):
        a = [rng.randrange(256) for _ in range(nbytes)]  # token 2t's word
        b = [rng.randrange(256) for _ in range(nbytes)]  # token 2t+1's word
        wa, wb = int.from_bytes(bytes(a), "little"), int.from_bytes(bytes(b), "little")
        inputs = {f"${n_out}": wa, f"${n_out + 1}": wb} if word == 32 else {f"${n_out}": wa | (wb << 16)}
        out = _run(_value_asm(bits, word), inputs)
        for k in range(nbytes):
            for m in range(per):
                lo, hi = _halves(out[f"${k * per + m}"])  # channel k * per + m of the word
                assert lo == ((a[k] >> (bits * m)) & mask) << (bits * m)
                assert hi == ((b[k] >> (bits * m)) & mask) << (bits * m)
