import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from memfit.cli import app
from memfit.eval.perplexity import SHIPPED_TEXT, perplexity, perplexity_and_bits
from memfit.eval.runner import evaluate_sample, load_records, make_samples, run_eval, summarize

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


def _spy_questions(lm, monkeypatch) -> list:
    """Record every (question, history) the model is asked (what ``encode_question`` is given)."""
    seen = []
    encode = type(lm).encode_question

    def spy(self, question, answer_prefix=None, history=None):
        seen.append((question, list(history or ())))
        return encode(self, question, answer_prefix, history)

    monkeypatch.setattr(type(lm), "encode_question", spy)
    return seen


@pytest.mark.parametrize("follow_up", ["gold", "own"])
def test_follow_up_eval_feeds_the_earlier_turns(tiny_lm, monkeypatch, follow_up):
    seen = _spy_questions(tiny_lm, monkeypatch)
    recs = run_eval(tiny_lm, ["niah_multiquery"], ["none"], [300], samples=1, seed=0, max_new_tokens=3,
                    progress=False, follow_up=follow_up)
    sample = make_samples(tiny_lm, ["niah_multiquery"], [300], 1, 0)[0]
    by_text = {q.text: q for q in sample.questions}
    said = [by_text[q].answer_prefix + r for (q, _), r in zip(seen, recs[0]["replies"])]  # the full replies
    assert [len(h) for _, h in seen] == [0, 1, 2, 3, 4]
    assert [q for q, _ in seen] == [sample.questions[i].text for i in recs[0]["question_order"]]
    for i, (_, history) in enumerate(seen):
        assert [q for q, _ in history] == [q for q, _ in seen[:i]]
        expected = said[:i] if follow_up == "own" else [by_text[q].reference for q, _ in seen[:i]]
        assert [a for _, a in history] == expected
    assert by_text[seen[0][0]].reference.endswith(f" is {by_text[seen[0][0]].answers[0]}.")
    label = {"gold": "none [follow-up]", "own": "none [follow-up, own answers]"}[follow_up]
    assert recs[0]["mode"] == {"gold": "follow-up", "own": "follow-up-own"}[follow_up]
    row = summarize(recs)[0]
    assert row["policy"] == label and row["relative"] == (1.0 if row["accuracy"] else None)
    with pytest.raises(ValueError, match="follow_up must be"):
        run_eval(tiny_lm, ["niah_single"], ["none"], [300], samples=1, follow_up="yes", progress=False)


def test_batched_answers_equal_one_at_a_time(tiny_lm):
    sample = make_samples(tiny_lm, ["niah_multiquery"], [300], 1, 0)[0]
    ctx = tiny_lm.prefill(sample.context, "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16)")
    recs = evaluate_sample(tiny_lm, sample, [ctx.policy], max_new_tokens=6, follow_up="gold")
    order = recs[0]["question_order"]
    for i, reply in enumerate(recs[0]["replies"]):
        q = sample.questions[order[i]]
        history = [(sample.questions[j].text, sample.questions[j].reference) for j in order[:i]] or None
        alone = tiny_lm.ask(ctx, q.text, max_new_tokens=6, answer_prefix=q.answer_prefix, lines=q.lines, history=history)
        assert q.answer_prefix + reply == alone


@pytest.mark.parametrize("follow_up", [None, "gold"])
def test_every_order_asks_each_question_at_every_position(tiny_lm, monkeypatch, follow_up):
    seen = _spy_questions(tiny_lm, monkeypatch)
    recs = run_eval(tiny_lm, ["niah_multiquery"], ["none"], [300], samples=1, seed=0, max_new_tokens=3,
                    progress=False, follow_up=follow_up, every_order=True)
    assert len(recs) == 5
    for pos in range(5):
        assert sorted(r["question_order"][pos] for r in recs) == [0, 1, 2, 3, 4]
    # each distinct ask once: on its own a question's reply cannot depend on the order; in a
    # conversation the 1st turn of each order is the question alone, the others each have their history
    assert len(seen) == (5 * 5 if follow_up else 5) and len({(q, tuple(h)) for q, h in seen}) == len(seen)
    reply = {}
    for r in recs:
        for i in range(5):
            if i == 0 or follow_up is None:  # the same ask (question alone) in every order: the same reply
                assert reply.setdefault(r["question_order"][i], r["replies"][i]) == r["replies"][i]
    row = summarize(recs)[0]
    assert row["per_position_balanced"]
    paired = row["last_minus_first"]
    assert paired["pairs"] == 5
    assert paired["diff"] == pytest.approx(row["per_position"][5] - row["per_position"][1])


def test_terminal_labels_drop_defaults_and_keep_the_mode():
    from memfit.eval.runner import _short

    long = "kvzip(keep=0.42,heads=global,chunk=2048)+kivi(bits=4,group=64,residual=32)"
    assert _short(long + " [follow-up]") == "kvzip(keep=0.42)+kivi(bits=4,residual=32) [follow-up]"
    assert _short("kvpress:tova(ratio=0.75)") == "kvpress:tova(ratio=0.75)"  # not a memfit spec: as it is
    cut = _short(long + " [follow-up, own answers]")  # too long even without defaults: cut before the mode
    assert len(cut) == 56 and cut == "kvzip(keep=0.42)+kivi(bits=4,re [follow-up, own answers]"


def test_per_position_accuracy_averages_the_same_samples_at_every_position():
    def rec(task, scores, order):
        return {"task": task, "length": 100, "policy": "none", "correct": sum(scores) / len(scores), "scores": scores,
                "question_order": order, "compression": 1.0, "bytes_per_token": 1.0}

    # single-question samples, all right, must not lift the 1st position of the multi-question ones
    recs = [rec("niah_single", [1.0], [0]) for _ in range(4)]
    recs += [rec("mq", [0.0, 1.0, 1.0], [0, 1, 2]), rec("mq", [1.0, 0.0, 1.0], [1, 2, 0]),
             rec("mq", [1.0, 1.0, 0.0], [2, 0, 1])]
    row = summarize(recs)[0]
    assert row["per_position"] == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 2 / 3})
    assert row["per_position_samples"] == 3 and row["per_position_balanced"]
    row = summarize(recs[:-1])[0]  # two rotations of three questions: not balanced
    assert not row["per_position_balanced"]


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
    full = perplexity_and_bits(tiny_lm, text, "none", chunk=50)
    assert full == (ppl, 8.0 * tiny_lm.model.dtype.itemsize)  # every element kept in the model's dtype
    two = perplexity_and_bits(tiny_lm, text, "hadamard(bits=2,group=16,residual=16,meta_bits=8)", chunk=50)[1]
    assert 2.0 < two < perplexity_and_bits(tiny_lm, text, "hadamard(bits=2,group=16,residual=16)", chunk=50)[1]
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


def _rec(source: str, policy: str, correct: float, **extra) -> dict:
    return {"task": "t", "length": 100, "seed": 0, "policy": policy, "source": source, "correct": correct,
            "scores": [correct], "compression": 1.0, "bytes_per_token": 1.0, **extra}


def test_a_peer_is_relative_to_its_own_baseline():
    """llama.cpp's q4_0 compares with llama.cpp's f16 (marked "baseline"), memfit's policies with
    memfit's none; a peer without a baseline (kvpress) with memfit's none."""
    recs = [_rec("memfit", "none", 0.8), _rec("memfit", "kivi(bits=4)", 0.6),
            _rec("llama.cpp", "llama.cpp:kv(f16)", 0.5, baseline=True), _rec("llama.cpp", "llama.cpp:kv(q4_0)", 0.4),
            _rec("kvpress", "kvpress:tova(ratio=0.5)", 0.2)]
    rel = {r["policy"]: r["relative"] for r in summarize(recs)}
    assert rel["kivi(bits=4)"] == pytest.approx(0.75)
    assert rel["llama.cpp:kv(f16)"] == pytest.approx(1.0)
    assert rel["llama.cpp:kv(q4_0)"] == pytest.approx(0.8)
    assert rel["kvpress:tova(ratio=0.5)"] == pytest.approx(0.25)


def test_relative_accuracy_has_a_paired_standard_error():
    """The error of accuracy / none's is a ratio estimate over the samples both ran: what the two
    share cancels (a policy equal to none has none), and a sample none did not run is left out."""
    from memfit.eval.runner import format_summary

    def runs(policy, scores, seeds=None):
        return [_rec("memfit", policy, c, seed=s) for c, s in zip(scores, seeds or range(len(scores)))]

    recs = runs("none", [1, 1, 0, 1]) + runs("kivi(bits=4)", [1, 1, 0, 1]) + runs("kivi(bits=2)", [1, 0, 0, 1, 1])
    rows = {r["policy"]: r for r in summarize(recs)}
    assert rows["none"]["relative_se"] == 0 and rows["kivi(bits=4)"]["relative_se"] == 0
    two = rows["kivi(bits=2)"]
    assert two["paired_samples"] == 4 and two["relative"] == pytest.approx(0.6 / 0.75)
    # by hand over the 4 pairs: R = 2/3, residuals p - R n = 1/3, -2/3, 0, 1/3
    assert two["relative_se"] == pytest.approx(math.sqrt((6 / 9) / 3 / 4) / 0.75)
    assert "+-31" in format_summary(list(rows.values()))
    # without none's samples there is nothing to pair with
    assert summarize(runs("kivi(bits=2)", [1, 0]))[0]["relative_se"] is None


def test_exported_samples_are_the_ids_memfit_reads(tiny_lm):
    from memfit.eval.runner import export_samples

    sample = make_samples(tiny_lm, ["niah_multiquery"], [300], 1, 0)[0]
    data = json.loads(json.dumps(export_samples(tiny_lm, [sample])))  # what the peer's worker reads
    got = data["samples"][0]
    assert got["context_ids"] == tiny_lm.encode_context(sample.context)[0].tolist()
    assert got["question_ids"] == [tiny_lm.encode_question(q.text, q.answer_prefix) for q in sample.questions]
    assert got["answers"] == [list(q.answers) for q in sample.questions]
    assert set(data["stop_ids"]) == set(tiny_lm.stop_ids)
