"""Twin: low-rank 8-bit factors fitted with the grid of the rest, weighted by the activations."""

import json

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import memfit
from memfit.bench import parse_weight_config
from memfit.weights import QuantLinear, WeightQuant, quantize_, save_quantized
from memfit.weights import twin
from memfit.weights.grid import hqq


def _planted(out=96, inp=256, seed=0):
    """A weight with a few strong directions (outlier structure) on top of noise, and activations
    with a few loud channels, as LLM layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w += (torch.randn(out, 3, generator=g) * 0.3) @ torch.randn(3, inp, generator=g) * 0.2
    w[:, 5] *= 20  # an outlier input channel
    x = torch.randn(512, inp, generator=g)
    x[:, [5, 17, 40]] *= 8
    return w, x


def _output_error(w, wq, x):
    return ((x @ (w - wq).T) ** 2).mean().item()


def test_at_equal_bytes_twin_beats_plain_quantization_on_planted_outliers():
    w, x = _planted()
    rms = (x * x).mean(0).sqrt()
    rank = twin.rank_for(*w.shape, 1.0)  # one bit a weight for the factors ...
    uc, meta, f = twin.fit(w, rms, 3, 32, rank)
    wq = uc.dequantize() + twin.dequant_rows(*f[:2]) @ twin.dequant_rows(*f[2:])
    plain = hqq(w, 4, 32).dequantize()  # ... against one more bit a weight for the grid
    assert 8 * rank * sum(w.shape) + 16 * (w.shape[0] + rank) <= w.numel()  # within the same bytes
    assert _output_error(w, wq, x) < 0.8 * _output_error(w, plain, x)
    # the activation weighting is what earns it: the same rank fitted without it does worse
    uc2, _, f2 = twin.fit(w, torch.ones_like(rms), 3, 32, rank)
    wq2 = uc2.dequantize() + twin.dequant_rows(*f2[:2]) @ twin.dequant_rows(*f2[2:])
    assert _output_error(w, wq, x) < _output_error(w, wq2, x)


def test_rank_fits_the_budget():
    for out, inp, bits in ((576, 576, 0.4), (1536, 576, 0.4), (192, 576, 0.25), (64, 64, 8.0)):
        r = twin.rank_for(out, inp, bits)
        assert 8 * r * (out + inp) + 16 * (out + r) <= bits * out * inp
        assert 8 * (r + 1) * (out + inp) + 16 * (out + r + 1) > bits * out * inp or r == min(out, inp)
    assert twin.rank_for(64, 64, 0.01) == 0


def test_bad_twin_configs_are_named():
    w, x = _planted()
    with pytest.raises(ValueError, match="rank must be in 1..96"):
        twin.fit(w, torch.ones(256), 3, 32, 0)
    with pytest.raises(ValueError, match="act_rms"):
        twin.fit(w, torch.ones(10), 3, 32, 4)
    with pytest.raises(ValueError, match="rank_bits"):
        WeightQuant(method="twin", rank_bits=0)
    q = QuantLinear(256, 96, 3, 32)
    with pytest.raises(ValueError, match="low-rank factors"):
        q.attach_lowrank(torch.zeros(96, 4, dtype=torch.int8), torch.zeros(96), torch.zeros(5, 256, dtype=torch.int8),
                         torch.zeros(5))
    with pytest.raises(ValueError, match="do not buy rank 1"):
        quantize_(tiny_llama(), WeightQuant(method="twin", bits=3, group_size=32, rank_bits=0.001, calib_seqs=2,
                                             calib_len=16), progress=False)


def test_twin_layer_computes_grid_plus_low_rank_and_counts_its_bytes():
    w, x = _planted()
    lin = nn.Linear(256, 96, bias=True)
    lin.weight.data = w
    uc, meta, f = twin.fit(w, (x * x).mean(0).sqrt(), 3, 32, 8)
    q = QuantLinear.from_codes(lin, uc.codes, 3, scale=uc.scale.half(), zero=uc.zero.half(), group_size=32)
    before = q.nbytes
    q.attach_lowrank(*f)
    assert q.rank == 8 and q.nbytes == before + 8 * (96 + 256) + 2 * (96 + 8)
    lr = twin.dequant_rows(*f[:2]) @ twin.dequant_rows(*f[2:])
    torch.testing.assert_close(q.dequantize(torch.float32), uc.dequantize() + lr, rtol=0, atol=2e-3)  # float16 grid
    plain = QuantLinear.from_codes(lin, uc.codes, 3, scale=uc.scale.half(), zero=uc.zero.half(), group_size=32)
    torch.testing.assert_close(q(x), plain(x) + x @ lr.T, rtol=1e-4, atol=1e-4)


def test_twin_quantizes_saves_and_loads(tmp_path, tiny_model_dir):
    lm = memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = lm.model(ids).logits
    cfg = WeightQuant(method="twin", bits=3, group_size=32, meta_bits=8, rank_bits=1.0, calib_seqs=2, calib_len=16)
    report = quantize_(lm.model, cfg, progress=False)
    ranks = [v["rank"] for v in report.layers.values()]
    assert ranks and all(r >= 1 for r in ranks)
    layers = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert report.nbytes == sum(m.nbytes for m in layers) and all(m.rank for m in layers)
    with torch.no_grad():
        out = lm.model(ids).logits
    assert 0 < (out - ref).abs().mean() < ref.abs().mean()  # near the model, not equal to it
    saved = save_quantized(lm.model, lm.tokenizer, tmp_path / "q", report)
    manifest = json.loads((saved / "memfit_quant.json").read_text())
    assert manifest["format"] == 4 and manifest["config"]["method"] == "twin"
    back = memfit.load_model(str(saved), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, out, rtol=0, atol=0)


def test_twin_spec_parses():
    cfg = parse_weight_config("twin:3:g32:m8:l0.5")
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.meta_bits, cfg.rank_bits) == ("twin", 3, 32, 8, 0.5)
    assert parse_weight_config("twin:3:g32:m8:l0.4:even").twin_ranks == "uniform"
    assert parse_weight_config("twin:3:g32:m8:l0.4").twin_ranks == "greedy"
    with pytest.raises(ValueError, match="twin_ranks"):
        WeightQuant(method="twin", twin_ranks="random")


def test_ranks_go_where_they_save_the_most_loss_within_the_budget():
    # "flat" gains nothing from rank; "steep" gains a lot: the budget of both moves to "steep"
    options = {"flat": [(1, 10, 5.0), (2, 20, 5.0), (4, 40, 4.9)],
               "steep": [(1, 10, 100.0), (2, 20, 40.0), (4, 40, 10.0), (6, 60, 8.0)]}
    ranks = twin.allocate_ranks(options, budget=60)
    assert ranks == {"flat": 1, "steep": 4}  # 10 + 40 bits; rank 6 (60) would overrun
    spent = sum(b for n, opts in options.items() for r, b, _ in opts if r == ranks[n])
    assert spent <= 60
    # a fallback that scores better in total is kept
    assert twin.allocate_ranks(options, budget=60, fallback={"flat": 1, "steep": 4}) == {"flat": 1, "steep": 4}
    worse = {"flat": [(1, 10, 5.0), (2, 20, 1.0)], "steep": [(1, 10, 1.0), (2, 20, 0.0)]}
    # greedy: flat saves 0.4 per bit, steep 0.1: flat gets the upgrade (total 2.0)
    assert twin.allocate_ranks(worse, budget=30) == {"flat": 2, "steep": 1}
    assert twin.allocate_ranks(worse, budget=30, fallback={"flat": 1, "steep": 2}) == {"flat": 2, "steep": 1}


def test_greedy_ranks_spend_no_more_than_uniform_ones(tiny_model_dir):
    lm = memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32")
    reports = {}
    for ranks in ("uniform", "greedy"):
        model = memfit.load_model(str(tiny_model_dir), "cpu", dtype="float32").model
        cfg = WeightQuant(method="twin", bits=3, group_size=32, meta_bits=8, rank_bits=1.0, calib_seqs=2, calib_len=16,
                          twin_ranks=ranks)
        reports[ranks] = quantize_(model, cfg, progress=False)
    assert reports["greedy"].nbytes <= reports["uniform"].nbytes
    shapes = {n: lm.model.get_submodule(n).weight.shape for n in reports["greedy"].layers}
    tried = {n: twin.candidate_ranks(*shape, twin.rank_for(*shape, 1.0)) for n, shape in shapes.items()}
    assert all(v["rank"] in tried[n] for n, v in reports["greedy"].layers.items())


def _kl(model, ids, teacher):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    return (teacher.float().exp() * (teacher.float() - logp)).sum(-1).mean().item()


def test_tuning_brings_the_quantized_model_closer_to_the_original_in_the_same_bytes():
    import copy

    base = tiny_llama()
    ids = torch.randint(0, base.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    teacher = twin.teacher_logprobs(base, ids)
    assert teacher.shape == (8, 24, base.config.vocab_size) and teacher.dtype == torch.bfloat16
    cfg = dict(method="twin", bits=2, group_size=32, rank_bits=1.0)
    plain, tuned = copy.deepcopy(base), copy.deepcopy(base)
    r0 = quantize_(plain, WeightQuant(**cfg, twin_tune=0), calibration=ids, progress=False)
    r1 = quantize_(tuned, WeightQuant(**cfg, twin_tune=24), calibration=ids, progress=False)
    assert r0.tune_loss is None and r1.tune_loss[1] < r1.tune_loss[0]
    # the same grids, ranks and bytes; only the factors moved
    assert r1.nbytes == r0.nbytes and [v["rank"] for v in r1.layers.values()] == [v["rank"] for v in r0.layers.values()]
    a, b = (dict((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)) for model in (plain, tuned))
    assert all(torch.equal(a[n].codes(), b[n].codes()) for n in a)
    assert any(not torch.equal(a[n].lr_l, b[n].lr_l) for n in a)
    assert all(b[n].lr_l.dtype == torch.int8 and b[n].lr_r.dtype == torch.int8 for n in b)
    assert all(p.requires_grad for p in tuned.parameters())  # the model's own flags given back
    assert _kl(tuned, ids, teacher) < 0.9 * _kl(plain, ids, teacher)


def test_qdec_residual_is_taken_after_tuning():
    """With every channel corrected by an exact residual, a tuned twin layer equals the original:
    the residual must be taken from the tuned factors, not the ones before."""
    base = tiny_llama()
    ref = {n: m.weight.data.float().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_(base, WeightQuant(method="twin", bits=3, group_size=32, rank_bits=1.0, twin_tune=4, qdec_channels=1.0,
                                qdec_bits=32), calibration=ids, progress=False)
    x = torch.randn(3, base.config.hidden_size)
    layer = base.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer(x), x @ ref["model.layers.0.self_attn.q_proj"].T, rtol=1e-4, atol=1e-5)


def test_twin_tune_configs():
    assert WeightQuant(method="twin").twin_tune == 16
    assert parse_weight_config("twin:3:g32:m8:l0.4:t0").twin_tune == 0
    with pytest.raises(ValueError, match="twin_tune"):
        WeightQuant(method="twin", twin_tune=-1)
    with pytest.raises(ValueError, match="do not match"):
        twin.tune(nn.Linear(2, 2), [], torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, 5), steps=1)


def test_bench_refuses_twin_with_qdec_before_building_a_model():
    from memfit.bench import bench_weight_decode

    with pytest.raises(ValueError, match="separate runs"):
        bench_weight_decode(twin_rank_bits=0.4, qdec_channels=0.01, fuse=False)
    with pytest.raises(ValueError, match="twin_epilogues"):
        bench_weight_decode(twin_rank_bits=0.4, twin_epilogues=("fast",))
