import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, tiny_qwen
from torch import nn

import memfit
from memfit.weights import WeightQuant, load_quantized, quantize_, save_quantized, scale

IDS = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen], ids=["llama", "qwen-gqa-1-kv-head-v-bias"])
def test_folded_scales_leave_the_function_unchanged(make):
    """Any positive scales of the four inputs, folded into the op before them, give the same logits."""
    model = make()
    with torch.no_grad():
        if model.model.layers[0].self_attn.v_proj.bias is not None:
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_()  # a bias the fold must divide too
        before = model(IDS).logits
        g = torch.Generator().manual_seed(1)
        kv = model.config.num_key_value_heads
        for layer in model.model.layers:
            for kind, lins in scale._inputs(layer).items():
                n = lins[0].in_features
                if kind == "o":  # one scale a value channel, the same for its query heads
                    s = torch.rand(kv, 1, layer.self_attn.v_proj.out_features // kv, generator=g) * 4 + 0.25
                    s = s.expand(kv, n // s.shape[-1] // kv, s.shape[-1]).reshape(-1)
                else:
                    s = torch.rand(n, generator=g) * 4 + 0.25
                scale._fold(layer, kind, s, kv)
        after = model(IDS).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def _planted_outliers(model):
    """A few input channels that carry far larger activations than the rest (as LLMs' do)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[::16] *= 30
    return model


def test_searched_scales_lower_the_quantized_models_error_and_are_reported():
    ref = _planted_outliers(tiny_llama(layers=2))
    with torch.no_grad():
        target = ref(IDS).logits
    errs = {}
    for search in (False, True):
        model = _planted_outliers(tiny_llama(layers=2))
        report = quantize_(model, WeightQuant(bits=3, group_size=32, method="hqq", scale_search=search),
                           calibration=IDS, progress=False)
        with torch.no_grad():
            errs[search] = (model(IDS).logits - target).square().mean().item()
        if search:
            assert set(report.scales) == {f"{i}.{k}" for i in range(2) for k in ("qkv", "o", "gu", "down")}
            assert any(a > 0 for a in report.scales.values())
        else:
            assert report.scales == {}
    assert errs[True] < 0.8 * errs[False], errs


def test_bench_configs_and_the_cli_spell_it():
    from typer.testing import CliRunner

    from memfit.bench import parse_weight_config
    from memfit.cli import app

    assert parse_weight_config("hqq:3:g32:m8:awq").scale_search and not parse_weight_config("hqq:3").scale_search
    assert "--scale-search" in CliRunner().invoke(app, ["quantize", "--help"], terminal_width=200).output


def test_scale_search_refuses_models_it_cannot_fold_into_by_name():
    model = tiny_llama(layers=1)
    model.model.layers[0].post_attention_layernorm = None
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        quantize_(model, WeightQuant(bits=4, group_size=32, scale_search=True), calibration=IDS, progress=False)
    with pytest.raises(ValueError, match="model.model.layers"):
        scale.decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_a_scaled_folder_loads_back_the_same_and_its_config_stays_readable(tmp_path):
    model = _planted_outliers(tiny_llama(layers=1))
    report = quantize_(model, WeightQuant(bits=3, group_size=32, scale_search=True), calibration=IDS, progress=False)
    out = save_quantized(model, byte_tokenizer(), tmp_path / "q", report)
    manifest = json.loads((out / "memfit_quant.json").read_text())
    # beside the config, not in it: older memfit builds WeightQuant(**config) and would refuse a new key
    assert "scale_search" not in manifest["config"] and manifest["scale_search"] == report.scales
    loaded, config = load_quantized(out, torch.device("cpu"))
    assert config.scale_search and config.bits == 3
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        assert torch.equal(memfit.load_model(str(out), "cpu").model(IDS).logits, model(IDS).logits)
