"""The demo: a built-in long document (generated filler prose with planted facts), its questions,
and the run that asks them under several policies and budgets."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

_PLACES = ["the harbour", "the old mill", "the library", "the market square", "the north bridge", "the observatory",
           "the train station", "the botanical garden", "the town hall", "the museum", "the bakery", "the school"]
_PEOPLE = ["the mayor", "a fisherman", "the librarian", "two students", "an old carpenter", "the baker",
           "a travelling musician", "the night guard", "a young painter", "the postman", "the gardener"]
_ACTS = ["talked about the weather", "repaired a wooden fence", "counted the boats", "read the morning paper",
         "planted tulips along the path", "painted the shutters green", "walked slowly past the fountain",
         "sorted a box of old letters", "fed the pigeons", "swept the steps", "tuned a battered piano",
         "argued about the price of apples", "watched the clouds drift east", "carried bread to the neighbours"]
_TIMES = ["In the early morning", "Later that day", "Around noon", "Before sunset", "On most Tuesdays",
          "During the long winter", "Every spring", "After the festival", "At dawn", "In the evening"]
_DETAILS = ["The air smelled of salt and rain.", "Nobody seemed to be in a hurry.", "A bell rang somewhere far away.",
            "The streets were quiet and clean.", "Children laughed near the water.", "The lamps flickered on one by one.",
            "It was an ordinary day in the town.", "A cat slept on a warm windowsill.", "The river ran high and fast."]


@dataclass(frozen=True)
class Fact:
    statement: str
    question: str
    answer_prefix: str
    answer: str

    def is_correct(self, reply: str) -> bool:
        return self.answer.lower() in reply.lower()


def _facts(rng: random.Random) -> list[Fact]:
    code = str(rng.randint(1000, 9999))
    room = str(rng.randint(100, 899))
    year = str(rng.randint(1720, 1890))
    colour = rng.choice(["purple", "orange", "silver", "turquoise", "crimson"])
    name = rng.choice(["Elena Marsh", "Tobias Wren", "Greta Holm", "Oskar Lind", "Mira Castell"])
    city = rng.choice(["Lisbon", "Oslo", "Vienna", "Dublin", "Prague"])
    animal = rng.choice(["a tortoise", "a parrot", "a goat", "a hedgehog", "a donkey"])
    return [
        Fact(f"The secret code for the town vault is {code}.", "What is the secret code for the town vault?",
             "The secret code for the town vault is", code),
        Fact(f"The archive is kept in room {room} of the town hall.", "In which room of the town hall is the archive kept?",
             "The archive is kept in room", room),
        Fact(f"The lighthouse was built in the year {year}.", "In which year was the lighthouse built?",
             "The lighthouse was built in the year", year),
        Fact(f"The door of the observatory is painted {colour}.", "What colour is the door of the observatory?",
             "The door of the observatory is painted", colour),
        Fact(f"The harbour master is called {name}.", "What is the name of the harbour master?",
             "The harbour master is called", name),
        Fact(f"The mayor was born in {city}.", "In which city was the mayor born?", "The mayor was born in", city),
        Fact(f"The school keeps {animal} as a pet.", "What animal does the school keep as a pet?",
             "The school keeps", animal.split()[-1]),
    ]


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_TIMES)}, {rng.choice(_PEOPLE)} {rng.choice(_ACTS)} near {rng.choice(_PLACES)}."


def demo_document(num_sentences: int = 220, seed: int = 0) -> tuple[str, list[Fact]]:
    """A document of about 14 tokens per sentence (220 sentences: about 3K tokens) with the facts
    spread evenly through it, each in a paragraph of its own."""
    rng = random.Random(seed)
    facts = _facts(rng)
    paragraphs: list[str] = []
    slots = {round((i + 0.5) * num_sentences / len(facts)): f for i, f in enumerate(facts)}
    sentences: list[str] = []
    for i in range(num_sentences):
        if i in slots:
            if sentences:
                paragraphs.append(" ".join(sentences))
                sentences = []
            paragraphs.append(slots[i].statement)
        sentences.append(filler_sentence(rng) if rng.random() > 0.15 else rng.choice(_DETAILS))
        if len(sentences) >= 6:
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs), facts


# The demo's rows: the uncompressed reference, the planner at three byte budgets (it picks the
# policy), plain 4-bit KIVI, and an eviction-only baseline.
DEMO_ROWS = ("none", "budget=4", "budget=8", "budget=16", "kivi(bits=4)", "snapkv(keep=0.25)")


def parse_row(row: str) -> tuple[str, "str | float"]:
    """``"budget=8"`` (a compression factor), ``"budget=8MiB"`` (a size) or a policy spec."""
    text = row.strip()
    if text.startswith("budget="):
        value = text.split("=", 1)[1].strip()
        try:
            return "budget", float(value)
        except ValueError:
            return "budget", value  # a size such as 8MiB; the planner checks it
    return "policy", text


def run_demo(lm, rows: "list[str]", sentences: int = 140, seed: int = 0, progress=None) -> list[dict]:
    """Prefill the demo document once, compress it once per row (scores such as KVzip's computed
    once for every row that needs them), ask each row every planted question (one batch per row)
    and return one record per row."""
    from memfit.kv.policy import parse_policy

    doc, facts = demo_document(sentences, seed)
    ids = lm.encode_context(doc)
    kinds = [parse_row(r) for r in rows]
    policies, fits, plans = [], [], []
    for kind, value in kinds:
        if kind == "budget":
            policy, info = lm.plan(value, ids.shape[1])
            policies.append(policy)
            fits.append(info["budget_bytes"])
            plans.append(info)
        else:
            policies.append(parse_policy(value))
            fits.append(None)
            plans.append(None)
    t0 = time.perf_counter()
    contexts = lm.prefill_many_ids(ids, policies, fit_bytes=fits)
    prefill_s = time.perf_counter() - t0
    if progress:
        progress(1)
    suffixes = [lm.encode_question(f.question, f.answer_prefix) for f in facts]
    out = []
    for row, ctx, info in zip(rows, contexts, plans):
        t1 = time.perf_counter()
        replies = lm.generate(ctx, suffixes, max_new_tokens=12, lines=1)
        answers = [" ".join(r.split()) for r in replies]
        out.append({
            "row": row, "policy": ctx.policy.spec, "short_policy": ctx.policy.short_spec,
            "budget_bytes": info["budget_bytes"] if info else None, "tokens": ctx.num_tokens,
            "kv_bytes": ctx.nbytes, "full_kv_bytes": ctx.full_nbytes, "compression": ctx.compression,
            "correct": sum(f.is_correct(a) for f, a in zip(facts, answers)), "questions": len(facts),
            "prefill_s": ctx.prefill_seconds, "answer_s": time.perf_counter() - t1, "answers": answers,
            "expected": [f.answer for f in facts],
        })
        if progress:
            progress(1)
    out[0]["shared_prefill_s"] = prefill_s
    return out
