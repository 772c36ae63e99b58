import json

import pytest
import torch
from typer.testing import CliRunner

from memfit.bench import parse_weight_config
from memfit.cli import app

runner = CliRunner()


def test_cli_quantize_then_compare_perplexities(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The keeper climbed the tower at dusk and lit the lamp. " * 12)
    out = tmp_path / "q4"
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--bits", "4", "--method", "hqq", "-g", "32",
                            "--meta-bits", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "14 layers quantized" in r.output and (out / "model.safetensors").is_file()
    assert json.loads((out / "memfit_quant.json").read_text())["config"]["meta_bits"] == 8
    ap = tmp_path / "ap"
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--bits", "8", "--method", "anyprec", "-g", "32",
                            "--out", str(ap)])
    assert r.exit_code == 0, r.output
    res = tmp_path / "res"
    r = runner.invoke(app, ["eval", "--perplexity-only", "-m", str(tiny_model_dir), "-m", str(out),
                            "-p", "none", "--perplexity-text", str(text), "-o", str(res)])
    assert r.exit_code == 0, r.output
    rows = json.loads((res / "perplexity.json").read_text())
    assert [row["model"] for row in rows] == [str(tiny_model_dir), str(out)]
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    assert rows[0]["kv_bits_per_element"] == 16.0 and "KV 16.000 bits an element" in r.output  # 16-bit KV
    r = runner.invoke(app, ["eval", "--perplexity-only", "-m", str(ap), "--weight-bits", "3", "--weight-bits", "8",
                            "-p", "none", "--perplexity-text", str(text), "-o", str(res)])
    assert r.exit_code == 0, r.output
    rows = json.loads((res / "perplexity.json").read_text())
    assert [row["weight_bits"] for row in rows] == [3, 8] and rows[0]["perplexity"] != rows[1]["perplexity"]


def test_cli_quantize_refuses_bad_input(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--method", "magic", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown weight quantization method" in r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--out", str(busy)])
    assert r.exit_code == 2 and "refusing" in r.output and (busy / "notes.txt").read_text() == "mine"
    r = runner.invoke(app, ["eval", "-m", str(tiny_model_dir), "-m", str(tiny_model_dir)])
    assert r.exit_code == 2 and "--perplexity-only" in r.output
    r = runner.invoke(app, ["bench", "weights", "-m", str(tiny_model_dir), "-c", "hqq"])
    assert r.exit_code == 2 and "METHOD:BITS" in r.output


def test_parse_weight_config():
    cfg = parse_weight_config("rtn:3:g128")
    assert (cfg.method, cfg.bits, cfg.group_size) == ("rtn", 3, 128)
    assert parse_weight_config("anyprec:8").method == "anyprec"
    assert parse_weight_config("guided:4:uniform").grid == "uniform"
    assert parse_weight_config("hqq:4:g32:m8").meta_bits == 8
    cfg = parse_weight_config("hqq:3:q2:r4")
    assert (cfg.qdec_channels, cfg.qdec_bits) == (0.02, 4) and parse_weight_config("hqq:3:q0.5").qdec_channels == 0.005
    with pytest.raises(ValueError, match="mMETA_BITS"):
        parse_weight_config("hqq:4:x8")
    with pytest.raises(ValueError, match="qdec_channels"):
        parse_weight_config("hqq:3:q150")


def test_cli_quantize_with_qdec(tiny_model_dir, tmp_path):
    out = tmp_path / "q3"
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--bits", "3", "--method", "rtn", "-g", "32",
                            "--qdec-channels", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "QDEC residuals in host memory" in r.output
    manifest = json.loads((out / "memfit_quant.json").read_text())
    assert manifest["format"] == 3 and manifest["config"]["qdec_channels"] == 0.05
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), "--qdec-channels", "0.02", "--qdec-bits", "3",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "qdec_bits" in r.output


def test_bench_weights_fractions_are_of_16_bit_bytes_whatever_the_loaded_dtype(tiny_model_dir):
    import memfit
    from memfit.bench import bench_weights

    for dtype in ("float32", "bfloat16"):
        lm = memfit.load_model(str(tiny_model_dir), "cpu", dtype=dtype)
        ref, row = bench_weights(lm, [parse_weight_config("rtn:4:g32")], "lighthouses " * 200)
        weights = sum(m.weight.numel() for n, m in lm.model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head")
        assert ref["config"] == dtype and ref["linear_fraction"] == {"float32": 2.0, "bfloat16": 1.0}[dtype]
        # 4 bits a weight plus a float16 scale and zero a group of 32: 5 / 16 of the 16-bit bytes
        assert row["linear_fraction"] == pytest.approx(5 / 16, rel=0.02)
        assert row["linear_bytes"] == pytest.approx(weights * 5 / 8, rel=0.02)
