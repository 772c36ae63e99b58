import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from memfit.cli import app
from memfit.eval.perplexity import SHIPPED_TEXT, perplexity
from memfit.eval.runner import load_records, run_eval, summarize

runner = CliRunner()


def test_eval_runs_end_to_end_and_writes_valid_json(tiny_lm, tmp_path):
    recs = run_eval(tiny_lm, ["niah_multiquery", "common_words"], ["none", "kivi(bits=2,group=16,residual=16)"],
                    [300], samples=2, seed=0, out_dir=tmp_path, max_new_tokens=4, progress=False)
    assert len(recs) == 2 * 2 * 2
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs
    for r in recs:
        assert {"task", "length", "policy", "correct", "nbytes", "full_nbytes", "prefill_s", "answer_s"} <= r.keys()
        assert 0.0 <= r["correct"] <= 1.0 and r["nbytes"] > 0
    multi = [r for r in recs if r["task"] == "niah_multiquery"]
    assert all(len(r["scores"]) == 5 for r in multi)
    rows = summarize(recs)
    none = next(r for r in rows if r["policy"] == "none")
    kivi = next(r for r in rows if r["policy"] != "none")
    assert none["compression"] == pytest.approx(0.25)  # the tiny model stores float64: 4x a 16-bit cache
    assert kivi["compression"] > none["compression"]
    assert set(none["per_position"]) == {1, 2, 3, 4, 5}


def test_perplexity_none_equals_a_plain_forward(tiny_lm):
    text = SHIPPED_TEXT.read_text()[:1500]
    ppl = perplexity(tiny_lm, text, "none", chunk=50)
    ids = tiny_lm.tokenizer(text, return_tensors="pt")["input_ids"]
    split = int(ids.shape[1] * 0.5)
    with torch.no_grad():
        logits = tiny_lm.model(ids).logits[0]
    ref = math.exp(F.cross_entropy(logits[split:-1], ids[0, split + 1 :]).item())
    assert ppl == pytest.approx(ref, rel=1e-9)
    assert perplexity(tiny_lm, text, "kivi(bits=2,group=16,residual=16)", chunk=50) != pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="too short"):
        perplexity(tiny_lm, "ab", "none")


def test_cli_eval_and_plot(tmp_path):
    d = tmp_path / "model"
    tiny_llama(torch.float32).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "res"
    text = tmp_path / "ppl.txt"
    text.write_text(SHIPPED_TEXT.read_text()[:600])
    r = runner.invoke(app, ["eval", "-m", str(d), "-t", "niah_single", "-p", "none", "-p", "snapkv(keep=0.5)",
                            "-n", "200", "-s", "2", "-o", str(out), "--max-new-tokens", "3", "--perplexity",
                            "--perplexity-text", str(text)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 2 and set(summary["perplexity"]) == {"none", "snapkv(keep=0.5,heads=uniform,window=32,kernel=7)"}
    assert "accuracy" in r.stdout and "perplexity" in r.stdout
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("pareto.png", "per_task.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len(load_records(out)) == 4
    r = runner.invoke(app, ["eval", "-m", str(d), "-t", "bogus"])
    assert r.exit_code == 2 and "unknown task(s) bogus" in r.stderr
    r = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert r.exit_code == 2
