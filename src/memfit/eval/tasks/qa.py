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
    questions about different companies, asked one after another on the same context."""
    rng = random.Random(f"qa:{seed}:{length}")
    products = rng.sample(_PRODUCTS, len(_PRODUCTS))
    docs, facts = [], []
    used = 0
    i = 0
    while i < len(products):
        p = products[i]
        founder = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        city, year = rng.choice(_CITIES), rng.randint(1850, 1990)
        core = (f"Document {i + 1}. The company that makes {p} was founded in {city} in {year}. "
                f"Its founder was {founder}.")
        doc = core + " " + " ".join(filler_sentences(rng, rng.randint(4, 8)))
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
        if kind == 0:
            questions.append(Question(f"In which city was the company that makes {p} founded?", (city,),
                                      f"The company that makes {p} was founded in"))
        elif kind == 1:
            questions.append(Question(f"Who founded the company that makes {p}?", (founder,),
                                      f"The company that makes {p} was founded by"))
        else:
            questions.append(Question(f"In which year was the company that makes {p} founded?", (year,),
                                      f"The company that makes {p} was founded in the year"))
    return Sample("documents_qa", length, seed, "\n\n".join(docs), tuple(questions), {"documents": len(docs)})
