"""`memfit eval`: tasks x policies x lengths x samples -> one JSON record per sample and policy."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from memfit.api import LM
from memfit.eval.tasks import Sample, get_task
from memfit.kv.policy import Policy, PolicyError, parse_policy


# summary-row labels of the conversation modes (records' "mode"), after the policy
MODE_LABELS = {"follow-up": " [follow-up]", "follow-up-own": " [follow-up, own answers]"}
FOLLOW_UPS = {"gold": "follow-up", "own": "follow-up-own"}  # run_eval's follow_up -> record mode


def family(policy: Policy) -> str:
    """Method family of a policy, for plotting lines: its method names joined with '+'."""
    if policy.is_none:
        return "none"
    return "+".join(m.split("(")[0] for m in policy.spec.split("+"))


def _record_mode(follow_up: str | None) -> str:
    """The records' "mode" for ``follow_up`` (None, "gold" or "own"); anything else is an error."""
    if follow_up is None:
        return "independent"
    if follow_up not in FOLLOW_UPS:
        raise ValueError(f"follow_up must be None, 'gold' or 'own', got {follow_up!r}")
    return FOLLOW_UPS[follow_up]


def make_samples(lm: LM, tasks: list[str], lengths: list[int], samples: int, seed: int) -> list[Sample]:
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [get_task(t)(seed + i, n, count) for t in tasks for n in lengths for i in range(samples)]


def export_samples(lm: LM, samples: list[Sample]) -> dict:
    """The samples as token ids, exactly what memfit's prefill and ask read (its own chat formatting),
    for a peer toolkit run in another process: byte-identical prompts on both sides."""
    return {"model": lm.name, "stop_ids": sorted(lm.stop_ids), "samples": [{
        "task": s.task, "length": s.length, "seed": s.seed,
        "context_ids": lm.encode_context(s.context)[0].tolist(),
        "question_ids": [lm.encode_question(q.text, q.answer_prefix) for q in s.questions],
        "answer_prefixes": [q.answer_prefix for q in s.questions],
        "answers": [list(q.answers) for q in s.questions],
        "lines": [q.lines for q in s.questions],
    } for s in samples]}


def _orders(sample: Sample, every_order: bool) -> list[list[int]]:
    """The question orders a sample is asked in: one rotation chosen by its seed, or every rotation."""
    n = len(sample.questions)
    rotate = lambda k: list(range(k, n)) + list(range(k))  # noqa: E731
    return [rotate(k) for k in range(n)] if every_order else [rotate(sample.seed % n)]


def _turn(sample: Sample, order: list[int], i: int, follow_up: str | None) -> tuple:
    """The i-th ask of ``order``: (question, earlier (question, reference answer) turns or None)."""
    q = sample.questions[order[i]]
    if follow_up != "gold":
        return q, None
    return q, tuple((sample.questions[j].text, sample.questions[j].reference) for j in order[:i])


def _answer_batched(lm: LM, ctx, asks: list[tuple], max_new_tokens: int, batch: int = 8) -> dict[tuple, str]:
    """Replies to independent asks (question, history), each distinct one answered once, as batches
    over the shared compressed context (one fork per batch instead of one per question)."""
    todo = list(dict.fromkeys(asks))
    out: dict[tuple, str] = {}
    for lines in sorted({q.lines for q, _ in todo}):  # generate reads every row to the same line count
        same = [a for a in todo if a[0].lines == lines]
        for k in range(0, len(same), batch):
            part = same[k : k + batch]
            suffixes = [lm.encode_question(q.text, q.answer_prefix, list(h) if h else None) for q, h in part]
            texts = lm.generate(ctx, suffixes, max_new_tokens, lines=lines)
            out.update({a: a[0].answer_prefix + t for a, t in zip(part, texts)})
    return out


def evaluate_sample(lm: LM, sample: Sample, policies: list[Policy], max_new_tokens: int = 24,
                    follow_up: str | None = None, every_order: bool = False) -> list[dict]:
    """Prefill once, compress once per policy, ask every question one after another (query-agnostic).
    The order of several questions is rotated by the sample's seed, so that accuracy per position
    (1st question asked, 2nd, ...) is not confounded with what is asked; with ``every_order`` the
    questions are asked in every rotation (one record each), so that each question is asked once at
    every position of the same compressed context and positions compare like with like (paired).
    Each question is asked on its own of the compressed context, or with ``follow_up`` as the next
    turn of one conversation: the k-th question then also reads the k - 1 earlier questions and
    their reference answers (``"gold"``, SCBench's multi-turn setting: a wrong earlier answer cannot
    mislead a later one) or the model's own answers (``"own"``)."""
    mode = _record_mode(follow_up)
    contexts = lm.prefill_many(sample.context, policies)
    orders = _orders(sample, every_order)
    records = []
    for pol, ctx in zip(policies, contexts):
        t0 = time.perf_counter()
        if follow_up == "own":  # each turn reads the replies before it: one question at a time
            all_replies = []
            for order in orders:
                replies: list[str] = []
                questions = [sample.questions[i] for i in order]
                for i, q in enumerate(questions):
                    history = list(zip((x.text for x in questions), replies))
                    replies.append(lm.ask(ctx, q.text, max_new_tokens=max_new_tokens, answer_prefix=q.answer_prefix,
                                          lines=q.lines, history=history))
                all_replies.append(replies)
        else:  # no turn depends on a reply: every (question, history) of every order asked once, in batches
            asks = [[_turn(sample, order, i, follow_up) for i in range(len(order))] for order in orders]
            answered = _answer_batched(lm, ctx, [a for row in asks for a in row], max_new_tokens)
            all_replies = [[answered[a] for a in row] for row in asks]
        answer_s = (time.perf_counter() - t0) / len(orders)
        for order, replies in zip(orders, all_replies):
            questions = [sample.questions[i] for i in order]
            scores = [q.score(r) for q, r in zip(questions, replies)]
            records.append({
                "task": sample.task, "length": sample.length, "seed": sample.seed, "policy": pol.spec,
                "family": family(pol), "source": "memfit", "tokens": ctx.num_tokens,
                "correct": sum(scores) / len(scores), "scores": scores,
                "nbytes": ctx.nbytes, "full_nbytes": ctx.full_nbytes, "bytes_per_token": ctx.nbytes / ctx.num_tokens,
                "compression": ctx.compression, "prefill_s": ctx.prefill_seconds, "answer_s": answer_s,
                "replies": [r[len(q.answer_prefix):] for q, r in zip(questions, replies)],
                "expected": [list(q.answers) for q in questions], "question_order": order,
                "mode": mode,
            })
    return records


def run_eval(lm: LM, tasks: list[str], policies: list[str], lengths: list[int], samples: int, seed: int = 0,
             out_dir: Path | None = None, max_new_tokens: int = 24, progress: bool = True,
             follow_up: str | None = None, every_order: bool = False) -> list[dict]:
    """Every sample of ``tasks`` x ``lengths`` under every policy (see ``evaluate_sample``), records
    appended to ``out_dir``/results.jsonl as they come."""
    _record_mode(follow_up)  # fail before any work on a bad mode
    pols = [parse_policy(p) for p in policies]
    for t in tasks:
        get_task(t)  # fail before any work on an unknown task
    items = make_samples(lm, tasks, lengths, samples, seed)
    out_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        out_file = (out_dir / "results.jsonl").open("a", encoding="utf-8")
    records: list[dict] = []
    try:
        for sample in tqdm(items, desc="eval", unit="sample", disable=not progress):
            for rec in evaluate_sample(lm, sample, pols, max_new_tokens, follow_up, every_order):
                rec["model"] = lm.name
                records.append(rec)
                if out_file:
                    out_file.write(json.dumps(rec) + "\n")
                    out_file.flush()
    finally:
        if out_file:
            out_file.close()
    return records


def load_records(path: Path) -> list[dict]:
    """Records from a results folder (every *.jsonl in it) or one .jsonl file."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .jsonl results in {path}")
    records = []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{i + 1}: not a JSON record ({e})") from None
    return records


def _sample_key(r: dict) -> tuple:
    """What identifies a sample across policies: its task, length and seed (the same text and questions)."""
    return r["task"], r["length"], r.get("seed")


def _first_last_paired(full: list[dict], nq: int) -> dict | None:
    """Last position minus first over the questions asked at both in the same sample (every-order
    runs): mean difference and its standard error, in accuracy units; None without such pairs."""
    at: dict[tuple, dict[int, float]] = defaultdict(dict)
    for x in full:
        for pos, (q, score) in enumerate(zip(x.get("question_order", range(nq)), x["scores"])):
            at[(*_sample_key(x), q)][pos] = score
    diffs = [p[nq - 1] - p[0] for p in at.values() if 0 in p and nq - 1 in p]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return {"diff": mean, "se": (var / len(diffs)) ** 0.5, "pairs": len(diffs)}


def _per_position(rs: list[dict]) -> tuple[dict[int, float], bool, int, dict | None]:
    """Accuracy by the position a question was asked in (1st, 2nd, ...) over the samples with the
    most questions, so that every position averages the same samples (single-question tasks would
    otherwise all count as 1st), and whether the order rotation was balanced: each question of a
    sample asked equally often at each position (a sample count that is a multiple of the question
    count), and the paired last-minus-first difference (see ``_first_last_paired``). Returns
    ({position: accuracy}, balanced, number of samples, paired difference or None)."""
    multi = [x for x in rs if len(x.get("scores", [])) > 1]
    if not multi:
        return {}, True, 0, None
    nq = max(len(x["scores"]) for x in multi)
    full = [x for x in multi if len(x["scores"]) == nq]
    asked: dict[int, Counter] = defaultdict(Counter)  # position -> which question index was asked there
    for x in full:
        for i, q in enumerate(x.get("question_order", range(nq))):
            asked[i][q] += 1
    balanced = all(len(set(c.values())) == 1 and len(c) == nq for c in asked.values())
    positions = {i + 1: sum(x["scores"][i] for x in full) / len(full) for i in range(nq)}
    return positions, balanced, len(full), _first_last_paired(full, nq)


def _relative_se(rs: list[dict], base: list[dict] | None) -> tuple[float | None, int]:
    """Standard error of accuracy / baseline accuracy over the samples both hold (a ratio estimate
    of paired samples: ``sd(p_i - R n_i) / (sqrt(m) mean(n))``, so what the two share cancels), and
    how many samples that is. None with fewer than two pairs or a zero baseline."""
    if not base:
        return None, 0
    ref = {_sample_key(x): x["correct"] for x in base}
    pairs = [(x["correct"], ref[_sample_key(x)]) for x in rs if _sample_key(x) in ref]
    m = len(pairs)
    n_sum = sum(n for _, n in pairs)
    if m < 2 or n_sum == 0:
        return None, m
    ratio = sum(p for p, _ in pairs) / n_sum
    var = sum((p - ratio * n) ** 2 for p, n in pairs) / (m - 1)
    return math.sqrt(var / m) / (n_sum / m), m


def summarize(records: list[dict]) -> list[dict]:
    """Per (source, policy): accuracy, mean compression, accuracy relative to "none", per-task accuracy.
    A peer toolkit's records are relative to its own 16-bit cache where one of its policies is marked
    ``"baseline": true`` (llama.cpp's f16 KV), else to memfit's "none". ``relative_se``: the standard
    error of ``relative`` over the samples the policy shares with its baseline (``paired_samples``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        label = r["policy"] + MODE_LABELS.get(r.get("mode"), "")
        groups[(r.get("source", "memfit"), label)].append(r)
    mean = lambda rs: sum(x["correct"] for x in rs) / len(rs)  # noqa: E731
    base = {k[1]: rs for k, rs in groups.items()
            if k[0] == "memfit" and k[1] in ("none", *("none" + m for m in MODE_LABELS.values()))}
    own_base = {k[0]: rs for k, rs in groups.items() if k[0] != "memfit" and rs[0].get("baseline")}
    rows = []
    for (source, pol), rs in groups.items():
        acc = mean(rs)
        per_task: dict[str, list[float]] = defaultdict(list)
        for x in rs:
            per_task[f"{x['task']}@{x['length']}"].append(x["correct"])
        positions, balanced, n_multi, paired = _per_position(rs)
        none_rs = own_base[source] if source in own_base else base.get("none" + _mode_label(pol))
        none_acc = mean(none_rs) if none_rs else None
        se, pairs = _relative_se(rs, none_rs)
        rows.append({
            "source": source, "policy": pol, "family": rs[0].get("family", pol), "samples": len(rs),
            "accuracy": acc, "relative": acc / none_acc if none_acc else None,
            "relative_se": se, "paired_samples": pairs,
            "compression": sum(x["compression"] for x in rs) / len(rs),
            "bytes_per_token": sum(x["bytes_per_token"] for x in rs) / len(rs),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
            "per_position": positions, "per_position_samples": n_multi, "per_position_balanced": balanced,
            "last_minus_first": paired,
        })
    rows.sort(key=lambda r: (r["source"] != "memfit", -r["bytes_per_token"]))
    return rows


def _mode_label(label: str) -> str:
    return next((m for m in MODE_LABELS.values() if label.endswith(m)), "")


def _short(label: str, width: int = 56) -> str:
    """A row label for the terminal: a memfit policy without its default arguments, cut to
    ``width`` characters keeping its mode suffix readable."""
    mode = _mode_label(label)
    base = label[: len(label) - len(mode)]
    try:
        base = parse_policy(base).short_spec
    except PolicyError:  # another source's label (kvpress:...): as it is
        pass
    label = base + mode
    if len(label) <= width:
        return label
    return label[: width - len(mode)] + mode


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'source':<8} {'policy':<56} {'n':>4} {'accuracy':>8} {'vs none':>12} {'compr.':>7} {'B/token':>8}"]
    for r in rows:
        rel = f"{100 * r['relative']:.0f}%" if r["relative"] is not None else "-"
        if r["relative"] is not None and r.get("relative_se") is not None and r["relative_se"] > 0:
            rel += f" +-{100 * r['relative_se']:.0f}"  # one standard error, paired with the baseline's samples
        lines.append(f"{r['source']:<8} {_short(r['policy']):<56} {r['samples']:>4} {100 * r['accuracy']:>7.1f}% "
                     f"{rel:>12} {r['compression']:>6.2f}x {r['bytes_per_token']:>8.0f}")
    tasks = sorted({t for r in rows for t in r["per_task"]})
    if tasks:
        lines.append("")
        lines.append("accuracy per task (%): " + " | ".join(tasks))
        for r in rows:
            lines.append(f"{_short(r['policy']):<56} " + " ".join(f"{100 * r['per_task'].get(t, float('nan')):>5.0f}"
                                                            for t in tasks))
    multi = [r for r in rows if len(r["per_position"]) > 1]
    if multi:
        lines.append("")
        lines.append("accuracy by the position a question was asked in, over the samples with the most questions (%):")
        for r in multi:
            note = "" if r["per_position_balanced"] else "  (not balanced: use a multiple of the question count as --samples)"
            paired = r.get("last_minus_first")
            if paired:
                note += (f"  q{len(r['per_position'])}-q1 {100 * paired['diff']:+.1f} +- {100 * paired['se']:.1f} "
                         f"(paired, {paired['pairs']} questions)")
            lines.append(f"{_short(r['policy']):<56} n={r['per_position_samples']:<3} "
                         + " ".join(f"q{k}={100 * v:.0f}" for k, v in r["per_position"].items()) + note)
    return "\n".join(lines)
