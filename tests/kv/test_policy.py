import pytest

from memfit.kv.evict import SnapKV, StreamingLLM
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import KIVI


def test_parse_examples():
    assert parse_policy("none").is_none and parse_policy("").is_none
    p = parse_policy("kivi(bits=4)")
    assert p.quant == KIVI(bits=4) and p.evictions == ()
    p = parse_policy("snapkv(keep=0.25)+kivi(bits=2,group=32,residual=128)")
    assert p.evictions == (SnapKV(keep=0.25),) and p.quant == KIVI(2, 32, 128)
    p = parse_policy(" streaming( sinks=4, window=1020 ) ")
    assert p.evictions == (StreamingLLM(sinks=4, window=1020),)


@pytest.mark.parametrize("spec, short", [
    ("kvzip(keep=0.42,heads=global,chunk=2048)+kivi(bits=4,group=64,residual=32)", "kvzip(keep=0.42)+kivi(bits=4,residual=32)"),
    ("kivi", "kivi(bits=4)"),
    ("snapkv(keep=0.3,heads=adaptive)+kivi(bits=2,outliers=0.01)", "snapkv(keep=0.3,heads=adaptive)+kivi(bits=2,outliers=0.01)"),
    ("kivi(bits=8,pre_rope=1)", "kivi(bits=8,pre_rope=True)"),
    ("kivi(bits=8)+decode(max_tokens=2048)", "kivi(bits=8)+decode(max_tokens=2048)"),
])
def test_short_spec_keeps_the_first_and_the_non_default_arguments(spec, short):
    p = parse_policy(spec)
    assert p.short_spec == short and parse_policy(short) == p


def test_canonical_spec_roundtrips():
    p = parse_policy("snapkv(keep=0.3)+kivi(bits=2)")
    assert parse_policy(p.spec) == p
    assert p.spec == "snapkv(keep=0.3,heads=uniform,window=32,kernel=7)+kivi(bits=2,group=64,residual=128)"
    # an argument added later is spelled only when set, so the specs (and store keys) made before stay the same
    p = parse_policy("kivi(bits=4,outliers=0.01)")
    assert p.spec == "kivi(bits=4,group=64,residual=128,outliers=0.01)" and parse_policy(p.spec) == p


@pytest.mark.parametrize("spec, message", [
    ("foo", "unknown method 'foo'; valid methods: none, decode, gear, h2o, hadamard, kivi, klt, knorm, kvtuner, kvzip, lowrank, million, oscar, pyramidkv, qjl, snapkv, streaming, tova, xquant, zipcache"),
    ("kivi(bitz=2)", "unknown argument 'bitz'; valid arguments: bits, group, residual, outliers"),
    ("kivi(outliers=0.6)", "kivi: outliers is the fraction of elements kept in 16-bit"),
    ("kivi(bits=3)", "bits must be one of"),
    ("kivi(bits=2.5)", "must be an integer"),
    ("kivi(bits=two)", "is not a number"),
    ("snapkv(keep=1.5)", "keep must be in"),
    ("kivi(bits=2)+snapkv", "evictions must come before lowrank and quantization"),
    ("kivi+kivi", "only one quantizer"),
    ("none+kivi", "cannot be combined"),
    ("kivi(bits=2", "cannot parse"),
    ("kivi(2)", "expected name=value"),
    ("gear(rank=0)", "gear: rank must be >= 1"),
    ("gear(bits=3)", "gear: bits must be one of"),
    ("lowrank(rank=16)+gear(bits=2)", "lowrank's key coefficients are quantized with kivi only"),
    ("qjl(sketch=12)", "qjl: sketch (sign bits per key) must be a positive multiple of 8"),
    ("qjl(bits=3)", "qjl: bits must be one of"),
    ("qjl(outliers=300)", "qjl: outliers"),
    ("hadamard(clip=0)", "hadamard: clip is the fraction of each group's range kept"),
    ("hadamard(sinks=-1)", "hadamard: sinks must be >= 0"),
    ("hadamard(meta_bits=4)", "hadamard: meta_bits must be 0 (float16 scale and zero) or 8"),
    ("hadamard(bits=3)", "hadamard: bits must be one of"),
    ("hadamard(value_bits=3)", "hadamard: value_bits must be one of"),
    ("million(bits=3)", "million: bits \\* sub is the code width and must be one of"),
    ("million(outliers=300)", "million: outliers"),
    ("million(residual=-1)", "million: residual must be >= 0"),
    ("million(iters=-1)", "million: iters must be >= 0"),
])
def test_parse_errors_name_the_problem(spec, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(spec)
