"""Question answering over a small synthetic document set (company profiles), several questions each."""

from __future__ import annotations

import random

from memfit.eval.filler import TokenCounter, filler_sentences
from memfit.eval.tasks.base import Question, Sample

_FIRST = ["Alma", "Bruno", "Clara", "Dario", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karin", "Luca",
          "Marta", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tilda", "Viktor"]
_LAST = ["Berg", "Costa", "Dahl", "Eklund", "Ferro", "Gallo", "Hartmann", "Ivers", "Janssen", "Kowal", "Lindqvist",
         "Moreau", "Novak", "Ortega", "Petrov", "Quist", "Rossi", "Sandberg", "Toivonen", "Vidal"]
_CITIES = ["Lisbon", "Oslo", "Vienna", "Dublin", "Prague", "Bergen", "Porto", "Krakow", "Ghent", "Turin", "Malmo",
           "Seville", "Bremen", "Lyon", "Tartu", "Split", "Graz", "Aarhus", "Cork", "Bilbao"]
_PRODUCTS = ["bicycles", "umbrellas", "telescopes", "violins", "kayaks", "lanterns", "typewriters", "sailboats",
             "clocks", "tents", "skates", "kites", "pianos", "compasses", "microscopes", "hammocks", "teapots",
             "backpacks", "candles", "globes"]


def documents_qa(seed: int, length: int, count: TokenCounter, asked: int = 3) -> Sample:
    """Profiles of companies (founder, city, product, year), each padded with filler; ``asked``
    questions about different companies, asked one after another on the same context. Every
    answer starts "The company that makes X was founded by" (it steers a small model to the
    right document); which fact is checked (founder, city or year) varies. There are always at
    least ``asked`` documents (~450 tokens each), so a budget under ~1.4K tokens is exceeded."""
    rng = random.Random(f"qa:{seed}:{length}")
    products = rng.sample(_PRODUCTS, len(_PRODUCTS))
    docs, facts = [], []
    used = 0
    i = 0
    while i < len(products):
        p = products[i]
        founder = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        city, year = rng.choice(_CITIES), rng.randint(1850, 1990)
        core = f"Document {i + 1}. The company that makes {p} was founded by {founder} in {city} in {year}."
        doc = core + " " + " ".join(filler_sentences(rng, rng.randint(24, 32)))
        cost = count(doc)
        if used + cost > length and i >= asked:
            break
        docs.append(doc)
        facts.append((p, founder, city, str(year)))
        used += cost
        i += 1
    picked = rng.sample(range(len(facts)), asked)
    questions = []
    for j, idx in enumerate(picked):
        p, founder, city, year = facts[idx]
        kind = (seed + j) % 3
        text, answer = [(f"Who founded the company that makes {p}?", founder),
                        (f"Who founded the company that makes {p}, and in which city?", city),
                        (f"Who founded the company that makes {p}, and in which year?", year)][kind]
        questions.append(Question(text, (answer,), f"The company that makes {p} was founded by"))
    return Sample("documents_qa", length, seed, "\n\n".join(docs), tuple(questions), {"documents": len(docs)})
