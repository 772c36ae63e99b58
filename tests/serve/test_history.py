"""The chaos run's checker, on histories with planted violations: each must be flagged, and the
legitimate outcomes around it (a 404 after a delete or a reported tier loss, a documented 503,
concurrent operations) must not."""

import json

import pytest

from memfit.serve.history import check, read, record, summary

A, B = "a" * 32, "b" * 32


def op(kind, start, end, status=200, **fields):
    return {"op": kind, "start": start, "end": end, "status": status, **fields}


def kinds(ops):
    return [(v.kind, v.index) for v in check(ops)]


CLEAN = [
    op("create", 0, 1, context_id=A),
    op("ask", 2, 3, context_id=A, answer="42", expected="42"),
    op("create", 2, 4, context_id=B),
    op("chat", 3, 5, answer="hi", expected="hi"),
    op("delete", 6, 7, context_id=A),
    op("ask", 8, 9, 404, context_id=A),          # deleted: a clear 404 is right
    op("ask", 8, 9, 503, code="store_unavailable", context_id=B),  # documented: no tier could serve
    op("tier_loss", 10, 10, status=None, context_ids=[B]),
    op("ask", 11, 12, 404, context_id=B),        # its loss was reported
    op("ask", 0.5, 2, 404, context_id=A),        # began before the creation was acknowledged
    op("sample", 0, 0, status=None, replica=0, rss=100, fds=10),
    op("sample", 20, 20, status=None, replica=0, rss=150, fds=12),
]


def test_a_clean_history_has_no_violations():
    assert check(CLEAN) == []
    s = summary(CLEAN, [])
    assert s["operations"] == len(CLEAN) and s["by_op"]["ask"] == {"200": 1, "404": 3, "503": 1}


@pytest.mark.parametrize("planted, kind", [
    (op("ask", 5, 6, 404, context_id=B), "lost_context"),            # acknowledged, never deleted
    (op("ask", 5, 6, context_id=A, answer="41", expected="42"), "wrong_answer"),
    (op("chat", 5, 6, 500, code="server_error"), "server_error"),
    (op("create", 5, 6, 502, context_id=B), "server_error"),
    (op("ask", 5, 6, 503, code="overloaded", context_id=B), "server_error"),  # not a documented 503
    (op("ask", 8, 9, context_id=A, answer="42", expected="42"), "answered_after_delete"),
    (op("sample", 21, 21, status=None, replica=0, rss=1000, fds=12), "unbounded_memory"),
    (op("sample", 21, 21, status=None, replica=0, rss=100, fds=100), "unbounded_fds"),
    (op("scan", 22, 22, status=None, replica=1, entries=3, corrupt=1, partial=0), "corrupt_entry"),
])
def test_each_planted_violation_is_flagged(planted, kind):
    ops = CLEAN + [planted]
    assert kinds(ops) == [(kind, len(CLEAN))]


def test_concurrency_and_re_creation_are_not_violations():
    ops = [op("create", 0, 1, context_id=A), op("delete", 2, 5, None, context_id=A),  # unanswered: may have landed
           op("ask", 3, 4, 404, context_id=A),
           op("delete", 6, 7, context_id=A), op("create", 8, 9, context_id=A),  # the same text stored again
           op("ask", 10, 11, context_id=A, answer="x", expected="x"),
           op("tier_loss", 12, 12, None), op("ask", 13, 14, 404, context_id=A)]  # a loss of everything
    assert check(ops) == []
    # a loss reported before a context was made does not cover it
    late = [op("tier_loss", 0, 0, None), op("create", 1, 2, context_id=B), op("ask", 3, 4, 404, context_id=B)]
    assert kinds(late) == [("lost_context", 2)]


def test_the_history_file_round_trips_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        record(f, "create", 0.0, status=200, context_id=A)
        record(f, "ask", 0.0, status=404, context_id=A)
        f.write('{"op": "ask", "sta')  # the writer was killed mid-line
    ops = read(path)
    assert [o["op"] for o in ops] == ["create", "ask"] and ops[0]["end"] >= 0
    assert ops[1]["status"] == 404 and ops[1]["context_id"] == A
    path.write_text('{"op": 1\n' + json.dumps(op("ask", 0, 1)) + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read(path)
    with pytest.raises(ValueError, match="has no 'end'"):
        check([{"op": "ask", "start": 0}])


def test_chat_latency_is_split_before_during_and_after_fault_windows():
    ops = [op("chat", 0, 1), op("chat", 1, 3),                     # before the first fault
           op("fault", 10, 20, None, fault="disk_full"),          # a window 10..20 (+5 s settling)
           op("chat", 12, 30), op("chat", 24, 25),                # during (overlapping, settling)
           op("chat", 26, 27), op("chat", 26, 27, 503),           # between; a 503 is not an answered chat
           op("fault", 40, 41, None, fault="kill_replica"),
           op("chat", 50, 50.5)]                                  # after
    lat = summary(ops, [])["chat_latency"]
    assert {k: v["n"] for k, v in lat.items()} == {"before": 2, "during": 2, "between": 1, "after": 1}
    assert lat["before"]["p99_s"] == 2 and lat["during"]["p99_s"] == 18 and lat["after"]["p50_s"] == 0.5
    assert summary([op("chat", 0, 1)], [])["chat_latency"]["during"] == {"n": 0, "p50_s": None, "p99_s": None}
