"""A history of what clients asked a memfit service and what it answered, and the checker that
gives a run's verdict (Jepsen-style: the service is judged on the whole history, not per request).

A history is JSON lines, one operation each, written by the clients (and by whoever injects faults)
as operations finish: ``op`` ("create", "ask", "delete", "chat", "fault", "tier_loss", "sample"),
``start`` / ``end`` (seconds, one clock), ``status`` (HTTP status; None: no answer, e.g. a refused
connection), ``context_id``, ``answer`` and ``expected`` (what the in-process library answers),
``code`` (the error code of a non-200), ``replica``. A ``tier_loss`` says the service reported
losing stored contexts: ``context_ids``, or none for every context created before it. A ``sample``
records a replica's ``rss`` bytes and open ``fds``.

What :func:`check` calls a violation:

- ``server_error``: a 5xx other than the documented ones (:data:`DOCUMENTED_5XX`);
- ``wrong_answer``: a 200 whose answer differs from the expected one;
- ``lost_context``: a 404 for a context whose creation was acknowledged before the request began,
  with no delete of it begun and no reported tier loss covering it before the request ended (a 404
  with code ``context_lost`` is such a report);
- ``answered_after_delete``: a 200 for a context whose deletion was acknowledged before the request
  began (and not created again since);
- ``unbounded_memory`` / ``unbounded_fds``: a replica's last sample exceeds its first by more than
  the given factor;
- ``corrupt_entry``: a ``scan`` of a disk tier (taken once its writers are gone) found an entry that
  fails its checksum: a write was left half done.

A ``fault`` operation spans the fault's window (injected at ``start``, undone at ``end``):
:func:`summary` reports the latency of plain chats before, during and after faults.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DOCUMENTED_5XX = {(503, "store_unavailable")}  # no tier can serve: the client may retry


@dataclass(frozen=True)
class Violation:
    kind: str
    index: int  # the operation's line in the history (0-based)
    detail: str


def record(out: IO[str], op: str, start: float, **fields) -> dict:
    """Append one finished operation to the history ``out`` (a text file opened for appending)."""
    line = {"op": op, "start": start, "end": time.time(), **fields}
    out.write(json.dumps(line) + "\n")
    out.flush()
    return line


def read(path: "str | Path") -> list[dict]:
    """The operations of a history file (a torn last line, from a killed writer, is skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    ops = []
    for n, text in enumerate(lines):
        try:
            ops.append(json.loads(text))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise ValueError(f"{path}: line {n + 1} is not JSON") from None
    return ops


def check(ops: Iterable[dict], growth: float = 2.0) -> list[Violation]:
    """Every violation in the history ``ops`` (see the module docstring). ``growth``: how many times
    its first sample a replica's memory or open files may reach by its last."""
    ops = list(ops)
    out: list[Violation] = []
    for i, op in enumerate(ops):
        for key in ("op", "start", "end"):
            if key not in op:
                raise ValueError(f"operation {i} has no {key!r}: {op}")
    by_context: dict[str, list[tuple[int, dict]]] = {}
    for i, op in enumerate(ops):
        if op.get("context_id"):
            by_context.setdefault(op["context_id"], []).append((i, op))
    losses = [op for op in ops if op["op"] == "tier_loss"]

    for i, op in enumerate(ops):
        status, kind = op.get("status"), op["op"]
        if status is not None and status >= 500 and (status, op.get("code")) not in DOCUMENTED_5XX:
            out.append(Violation("server_error", i, f"{kind} answered {status} {op.get('code') or ''}".rstrip()))
        if kind not in ("ask", "chat") or status != 200:
            continue
        if op.get("expected") is not None and op.get("answer") != op["expected"]:
            out.append(Violation("wrong_answer", i, f"{op.get('answer')!r} where {op['expected']!r} was expected"))

    for cid, seq in by_context.items():
        for i, op in seq:
            if op["op"] != "ask":
                continue
            if op.get("status") == 404:
                acked = [o for _, o in seq if o["op"] == "create" and o.get("status") == 200 and o["end"] < op["start"]]
                if not acked:
                    continue
                made = max(acked, key=lambda o: o["end"])
                # a delete that may have landed after that creation (answered or not), or a loss the
                # service reported covering this context, explains the 404
                deleted = any(o["op"] == "delete" and o["start"] < op["end"] and o["end"] > made["start"]
                              for _, o in seq)
                lost = op.get("code") == "context_lost" or any(
                    o["start"] < op["end"] and (cid in o["context_ids"] if o.get("context_ids") else made["start"] < o["end"])
                    for o in losses)
                if not (deleted or lost):
                    out.append(Violation("lost_context", i, f"{cid}: 404 after its creation was acknowledged "
                                         "(no delete, no reported tier loss)"))
            elif op.get("status") == 200:
                gone = [o for _, o in seq if o["op"] == "delete" and o.get("status") in (200, 204)
                        and o["end"] < op["start"]]
                if not gone:
                    continue
                last = max(gone, key=lambda o: o["end"])
                remade = any(o["op"] == "create" and o["start"] < op["end"] and o["end"] > last["start"]
                             for _, o in seq)
                if not remade:
                    out.append(Violation("answered_after_delete", i, f"{cid}: answered after its deletion was "
                                         "acknowledged"))

    for i, op in enumerate(ops):
        if op["op"] == "scan" and op.get("corrupt"):
            out.append(Violation("corrupt_entry", i, f"disk tier of replica {op.get('replica')}: {op['corrupt']} "
                                 "entries fail their checksum"))
    samples: dict[str, list[tuple[int, dict]]] = {}
    for i, op in enumerate(ops):
        if op["op"] == "sample":
            samples.setdefault(str(op.get("replica")), []).append((i, op))
    for replica, seq in samples.items():
        (_, first), (j, last) = seq[0], seq[-1]
        for field, name in (("rss", "unbounded_memory"), ("fds", "unbounded_fds")):
            if first.get(field) and last.get(field, 0) > growth * first[field]:
                out.append(Violation(name, j, f"replica {replica}: {field} {first[field]} -> {last[field]}"))
    return sorted(out, key=lambda v: v.index)


def chat_latency(ops: list[dict], settle: float = 5.0) -> dict:
    """Latency (seconds) of answered plain chats by phase: ``before`` the first fault, ``during`` a
    fault's window (or within ``settle`` seconds after it: a Redis tier retries after 5 s), ``between``
    faults, ``after`` the last one; each with its count, p50 and p99."""
    windows = sorted((op["start"], op["end"] + settle) for op in ops if op["op"] == "fault")
    phases: dict[str, list[float]] = {"before": [], "during": [], "between": [], "after": []}
    for op in ops:
        if op["op"] != "chat" or op.get("status") != 200:
            continue
        if not windows or op["end"] < windows[0][0]:
            phase = "before"
        elif op["start"] > windows[-1][1]:
            phase = "after"
        elif any(a < op["end"] and op["start"] < b for a, b in windows):
            phase = "during"
        else:
            phase = "between"
        phases[phase].append(op["end"] - op["start"])

    def pct(xs: list[float], q: float) -> float | None:
        return round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    return {k: {"n": len(v), "p50_s": pct(v, 0.5), "p99_s": pct(v, 0.99)} for k, v in phases.items()}


def summary(ops: list[dict], violations: list[Violation]) -> dict:
    """Counts for a run's JSON: operations by kind and status, faults, violations by kind, and the
    latency of plain chats around faults."""
    counts: dict[str, dict[str, int]] = {}
    for op in ops:
        per = counts.setdefault(op["op"], {})
        key = str(op.get("status") if op["op"] != "fault" else op.get("fault"))
        per[key] = per.get(key, 0) + 1
    kinds: dict[str, int] = {}
    for v in violations:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    return {"operations": len(ops), "by_op": counts, "violations": kinds, "chat_latency": chat_latency(ops),
            "first_violations": [v.__dict__ for v in violations[:20]]}
