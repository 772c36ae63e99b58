"""`memfit serve` as users run it: a real process on a free loopback port, driven by the official
`openai` client and raw HTTP; two replicas sharing one real redis-server."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import pytest
import torch

import memfit
from memfit.serve.chaos import free_port

POLICY = "kivi(bits=4,group=16,residual=16)"
CONTEXT = "The harbour master of Vell is Ada Quist. The ferry leaves at nine. " * 8


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


class Served:
    def __init__(self, model_dir, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
        self.proc = subprocess.Popen([sys.executable, "-m", "memfit", "serve", "--model", str(model_dir), "--port",
                                      str(self.port), "--policy", POLICY, "--served-model-name", "m", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memfit serve exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("memfit serve did not come up")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Served(model_dir, "--max-queue", "8", "--max-tokens", "64", "--max-context-tokens", "1500",
               "--max-body-mb", "0.05")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(model_dir):
    return memfit.load_model(str(model_dir))  # as the server loads it


def _chat(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=12, **kw)


def test_models_chat_and_streaming_with_the_openai_client(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["m"]  # --served-model-name
    r = _chat(c, "Hello there")
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(_chat(c, "Hello there", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    t = c.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert t.object == "text_completion" and t.usage.completion_tokens <= 5
    ts = "".join(x.choices[0].text for x in c.completions.create(model="m", prompt="Once upon a time", max_tokens=5,
                                                                  temperature=0, stream=True))
    assert ts == t.choices[0].text


def test_stored_context_answers_like_the_library(server, local):
    r = httpx.post(server.url + "/v1/contexts", json={"text": CONTEXT})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokens"] > 500 and info["compression"] > 2 and info["policy"].startswith("kivi(bits=4,group=16")
    assert httpx.get(f"{server.url}/v1/contexts/{info['id']}").json()["bytes"] == info["bytes"]
    q = "Who is the harbour master?"
    r = server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=10, extra_body={"context_id": info["id"]})
    ctx = local.prefill(CONTEXT, POLICY)
    assert ctx.key == info["id"]
    assert r.choices[0].message.content == local.ask(ctx, q, max_new_tokens=10)
    assert r.usage.prompt_tokens == ctx.num_tokens + len(local.encode_question(q))
    assert httpx.delete(f"{server.url}/v1/contexts/{info['id']}").json()["deleted"] is True
    gone = server.client().chat.completions.with_raw_response
    with pytest.raises(openai.NotFoundError):
        gone.create(model="m", messages=[{"role": "user", "content": q}], extra_body={"context_id": info["id"]})


def test_stored_documents_combined_in_a_chat_answer_like_the_library(server, local, tmp_path):
    """Documents stored with reuse "anywhere", placed by a chat's context_ids (in its own order,
    behind its own system message): the answer is the library's prefill_parts' answer."""
    docs = ["The harbour master of Vell is Ada Quist. " * 6, "The ferry to Orn leaves at nine from pier two. " * 6]
    made = [httpx.post(server.url + "/v1/contexts", json={"text": d, "reuse": "anywhere"}, timeout=60) for d in docs]
    assert all(r.status_code == 200 for r in made), [r.text for r in made]
    ids = [r.json()["id"] for r in made]
    assert all(r.json()["reuse"] == "anywhere" and r.json()["policy"].startswith("kivi(bits=4,group=16") for r in made)
    assert httpx.get(f"{server.url}/v1/contexts/{ids[0]}").json()["reuse"] == "anywhere"
    listed = {c["id"]: c for c in httpx.get(server.url + "/v1/contexts").json()["data"]}
    assert listed[ids[1]]["reuse"] == "anywhere"
    system, q = "Answer in a few words.", "When does the ferry leave?"
    r = server.client().chat.completions.create(
        model="m", temperature=0, max_tokens=8, messages=[{"role": "system", "content": system},
                                                          {"role": "user", "content": q}],
        extra_body={"context_ids": ids[::-1], "recompute": 0.25})
    ctx = local.prefill_parts([system, docs[1], docs[0]], POLICY, store=f"file://{tmp_path}", recompute=0.25)
    assert r.choices[0].message.content == local.ask(ctx, q, max_new_tokens=8)
    bad = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": q}],
                                                                "context_ids": [ids[0]], "context_id": ids[1]})
    assert bad.status_code == 400 and "not both" in bad.json()["error"]["message"]
    doc_as_context = httpx.post(server.url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": q}], "context_id": ids[0]})
    assert doc_as_context.status_code == 400 and "context_ids" in doc_as_context.json()["error"]["message"]
    missing = httpx.post(server.url + "/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": q}], "context_ids": ["0" * 32]})
    assert missing.status_code == 404
    for cid in ids:
        assert httpx.delete(f"{server.url}/v1/contexts/{cid}").status_code == 200


def test_plain_prompts_reuse_the_stored_documents_they_contain(server, local, tmp_path):
    """A plain chat whose message holds a stored document (reuse "anywhere") after other text: the
    server finds it by its first tokens and answers as the library assembling the same tokens."""
    doc = "Ledger of the port of Vell. The harbour master is Ada Quist. Ships dock at pier four. " * 3
    made = httpx.post(server.url + "/v1/contexts", json={"text": doc, "reuse": "anywhere"}, timeout=60)
    assert made.status_code == 200, made.text
    content = "Read this page from the archive:\n" + doc + "\n\nWho is the harbour master?"
    before = httpx.get(server.url + "/v1/store").json()["documents_recognised"]
    answer = _chat(server.client(), content).choices[0].message.content
    assert httpx.get(server.url + "/v1/store").json()["documents_recognised"] == before + 1
    store = memfit.open_store(f"file://{tmp_path}")
    local.prefill(doc, POLICY, store=store, reuse="anywhere")
    ids = local.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    found = local.find_documents(ids[:-1], store)
    assert len(found) == 1 and found[0][2] == made.json()["id"]
    ctx = local.prefill_assembled(torch.tensor([ids]), [found[0][:2]], POLICY, store=store)
    assert answer == local.generate(ctx, [[]], max_new_tokens=12)[0]  # the whole prompt assembled: its logits
    httpx.delete(f"{server.url}/v1/contexts/{made.json()['id']}")


def test_plain_chats_reuse_a_stored_prefix(server):
    long = CONTEXT * 2  # over one 256-token prefix chunk, under the test server's 1500-token limit
    a = _chat(server.client(), long + "\n\nFirst question?").choices[0].message.content
    before = httpx.get(server.url + "/v1/store").json()
    b = _chat(server.client(), long + "\n\nSecond question?").choices[0].message.content
    after = httpx.get(server.url + "/v1/store").json()
    assert isinstance(a, str) and isinstance(b, str)
    assert after["hits"] > before["hits"]  # the second prompt restored the first one's stored prefix
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"


@pytest.mark.parametrize("body, status, needle", [
    (b'{"messages": [', 400, "malformed JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}), 422, "bogus"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 1600}]}), 400, "at most 1500"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 60000}]}), 413, "larger than"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}), 422, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "context_id": "../../etc/passwd"}), 400, "32 lowercase"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), 422, "role"),
    (json.dumps({"messages": []}), 422, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}), 404, "does not exist"),
])
def test_bad_requests_get_openai_errors_never_500(server, body, status, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_context_ids_are_validated(server):
    assert httpx.get(server.url + "/v1/contexts/..%2F..%2Fsecret").status_code in (400, 404)
    r = httpx.get(server.url + "/v1/contexts/ABC")
    assert r.status_code == 400 and "32 lowercase" in r.json()["error"]["message"]
    assert httpx.delete(server.url + "/v1/contexts/" + "0" * 32).status_code == 404
    r = httpx.post(server.url + "/v1/contexts", json={"text": "abc", "policy": "zip(3)"})
    assert r.status_code == 400 and "unknown method" in r.json()["error"]["message"]


def test_api_key(model_dir):
    s = Served(model_dir, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert s.client("s3cret").models.list().data
    finally:
        s.stop()


def test_full_queue_answers_429_and_a_disconnected_stream_frees_its_slot(model_dir):
    s = Served(model_dir, "--max-queue", "1", "--max-tokens", "8000")
    try:  # about a minute of decoding if nobody stopped it
        body = {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 8000, "min_tokens": 8000,
                "temperature": 1.0, "seed": 1, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the stream is open and holds the only slot
            busy = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full", s.output()
        # the client went away mid-stream: its slot comes back
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health", timeout=30).json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(s.url + "/health").json()["queued"] == 0
        ok = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5,
                                                               "min_tokens": 0}, timeout=30)
        assert ok.status_code == 200
    finally:
        s.stop()


def test_two_replicas_share_contexts_through_redis(model_dir, redis_server, local):
    a = Served(model_dir, "--store", redis_server.url)
    b = Served(model_dir, "--store", redis_server.url)
    try:
        cid = httpx.post(a.url + "/v1/contexts", json={"text": CONTEXT}, timeout=60).json()["id"]
        q = "When does the ferry leave?"
        r = b.client().chat.completions.create(model="m", messages=[{"role": "user", "content": q}], temperature=0,
                                               max_tokens=8, extra_body={"context_id": cid})
        assert r.choices[0].message.content == local.ask(local.prefill(CONTEXT, POLICY), q, max_new_tokens=8)
    finally:
        a.stop()
        b.stop()


def test_load_200_requests_from_8_clients(server):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(4)]
    expected = {p: _chat(server.client(), p).choices[0].message.content for p in prompts}
    failures: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        p = prompts[i % 4]
        try:
            got = _chat(server.client(), p).choices[0].message.content
            if got != expected[p]:
                with lock:
                    failures.append(f"{i}: wrong answer {got!r}")
        except Exception as e:  # noqa: BLE001  every failure is counted, none may happen
            with lock:
                failures.append(f"{i}: {type(e).__name__}: {e}")

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))
    assert failures == []
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "queued": 0}
