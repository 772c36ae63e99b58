import json

import torch
from conftest import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from memfit.cli import app

runner = CliRunner()


def _model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_llama(torch.float32).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_store_put_ls_ask_rm(tmp_path):
    d = _model_dir(tmp_path)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The vault code is 4821. " * 30)
    url = f"file://{tmp_path / 'store'}"
    r = runner.invoke(app, ["store", "put", "-c", str(ctx), "-p", "kivi(bits=4,group=16,residual=16)", "-s", url, "-m", str(d)])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip()
    assert len(key) == 32 and "miss" in r.stderr
    r = runner.invoke(app, ["store", "ls", "-s", url])
    assert r.exit_code == 0 and key in r.stdout and "kivi(bits=4,group=16,residual=16)" in r.stdout
    r = runner.invoke(app, ["ask", "-q", "Code?", "-c", str(ctx), "-p", "kivi(bits=4,group=16,residual=16)", "-s", url,
                            "-m", str(d), "--max-new-tokens", "3"])
    assert r.exit_code == 0 and "restored" in r.stderr
    r = runner.invoke(app, ["store", "rm", key, "-s", url])
    assert r.exit_code == 0 and runner.invoke(app, ["store", "ls", "-s", url]).stdout.strip() == ""
    r = runner.invoke(app, ["store", "rm", key, "-s", url])
    assert r.exit_code == 2 and "no stored context" in r.stderr
    r = runner.invoke(app, ["store", "rm", "../../etc", "-s", url])
    assert r.exit_code == 2 and "invalid context key" in r.stderr
    r = runner.invoke(app, ["store", "ls", "-s", "ftp://x"])
    assert r.exit_code == 2 and "unknown store URL" in r.stderr


def test_bench_store_runs_and_plots(tmp_path, redis_server):
    d = _model_dir(tmp_path)
    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "store", "-m", str(d), "-n", "300", "-p", "none", "-p", "kivi(bits=4,group=16,residual=16)",
                            "--store-dir", str(tmp_path / "s"), "--redis", redis_server.url, "--repeats", "1",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert {(x["policy"].split("(")[0], x["tier"]) for x in rows} == {
        (p, t) for p in ("none", "kivi") for t in ("prefill", "mem", "file", "redis")}
    for x in rows:
        if x["tier"] in ("file", "redis"):
            assert x["stored_bytes"] > x["kv_bytes"] and x["overhead"] < 0.5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the benchmark leaves no entry behind in the tiers it timed (the Redis one is a real server)
    from memfit.store.disk import DiskTier
    from memfit.store.redis_tier import RedisTier

    assert list(RedisTier(redis_server.url).keys()) == []
    assert list(DiskTier(tmp_path / "s" / "tier").keys()) == []
