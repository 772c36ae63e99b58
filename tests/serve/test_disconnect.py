"""A streamed answer whose client goes away stops decoding at once: driven at the ASGI level, so
the disconnect arrives at a known moment and the decoding steps after it can be counted."""

from __future__ import annotations

import asyncio
import json

import memfit
from memfit.serve.app import ServeConfig, create_app
from memfit.store import open_store


def _count_forwards(lm) -> list[int]:
    calls = [0]
    hook = lm.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    calls.append(hook)
    return calls


def test_a_dropped_stream_stops_decoding_within_one_step(tiny_model_dir, tmp_path):
    lm = memfit.load_model(str(tiny_model_dir))
    app = create_app(lm, open_store(f"file://{tmp_path}"), ServeConfig(policy="none", max_tokens=400))
    body = json.dumps({"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 400,
                       "min_tokens": 400, "temperature": 1.0, "seed": 1, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    calls = _count_forwards(lm)
    at_disconnect: list[int] = []

    async def run() -> list[dict]:
        sent: list[dict] = []
        token_chunk = asyncio.Event()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await token_chunk.wait()  # the client reads one token, then goes away
            at_disconnect.append(calls[0])
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and b'"content"' in message.get("body", b""):
                token_chunk.set()

        await asyncio.wait_for(app(scope, receive, send), timeout=60)
        await asyncio.sleep(0.5)  # anything still decoding would go on here
        return sent

    sent = asyncio.run(run())
    calls[1].remove()
    assert sent[0]["status"] == 200 and at_disconnect
    # the step running when the client left may finish; none starts after it
    assert calls[0] - at_disconnect[0] <= 1, (calls[0], at_disconnect[0])
    assert calls[0] < 50  # far from the 400 tokens asked for
