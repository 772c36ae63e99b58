"""The model is shared one decoding step at a time: a short answer does not wait for a long one,
and an answer past the server's time limit is cut short, freeing the model. In process (ASGI)."""

from __future__ import annotations

import asyncio

import httpx

import memfit
from memfit.serve.app import ServeConfig, create_app
from memfit.store import open_store


def _app(model_dir, tmp_path, **config):
    lm = memfit.load_model(str(model_dir))
    return lm, create_app(lm, open_store(f"file://{tmp_path}"), ServeConfig(policy="none", max_tokens=400, **config))


def _body(tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 1.0, "seed": 1}


def test_a_short_answer_does_not_wait_for_a_long_one(tiny_model_dir, tmp_path):
    lm, app = _app(tiny_model_dir, tmp_path)
    steps = [0]
    hook = lm.model.register_forward_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    done: list[tuple[str, int]] = []

    async def ask(client, name: str, tokens: int) -> httpx.Response:
        r = await client.post("/v1/chat/completions", json=_body(tokens))
        done.append((name, steps[0]))
        return r

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memfit") as client:
            long = asyncio.create_task(ask(client, "long", 300))
            while steps[0] < 5:  # the long answer is decoding
                await asyncio.sleep(0.01)
            short = await ask(client, "short", 3)
            return short, await long

    try:
        short, long = asyncio.run(run())
    finally:
        hook.remove()
    assert short.status_code == long.status_code == 200
    assert [name for name, _ in done] == ["short", "long"], done
    assert long.json()["usage"]["completion_tokens"] == 300
    assert done[0][1] < 100  # the short one finished within a few of the long one's steps


def test_an_answer_past_the_time_limit_is_cut_and_frees_the_model(tiny_model_dir, tmp_path):
    _, app = _app(tiny_model_dir, tmp_path, request_timeout=0.05)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memfit") as client:
            cut = await client.post("/v1/chat/completions", json=_body(400))
            nxt = await client.post("/v1/chat/completions", json=_body(1))
            return cut, nxt

    cut, nxt = asyncio.run(run())
    assert cut.status_code == 200 and cut.json()["choices"][0]["finish_reason"] == "length"
    assert 0 < cut.json()["usage"]["completion_tokens"] < 400
    assert nxt.status_code == 200 and app.state.server.waiting == 0


def test_with_a_store_tier_down_contexts_get_503_not_404(tiny_model_dir, tmp_path):
    """A miss while a tier cannot be reached does not prove a context is gone, and a delete or a
    create would not reach every replica: 503 store_unavailable (the client retries), never a 404
    for a context that exists or an acknowledged delete that did not happen everywhere."""
    import pytest

    lm = memfit.load_model(str(tiny_model_dir))
    store = open_store([f"file://{tmp_path}", "redis://127.0.0.1:1/0"])  # nothing listens on port 1
    app = create_app(lm, store, ServeConfig(policy="none"))
    cid = "0" * 32

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://memfit") as client:
            return [await client.post("/v1/contexts", json={"text": "some text"}),
                    await client.get(f"/v1/contexts/{cid}"), await client.delete(f"/v1/contexts/{cid}"),
                    await client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "q"}], "context_id": cid, "max_tokens": 2})]

    with pytest.warns(RuntimeWarning, match="unavailable"):
        answers = asyncio.run(run())
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable" and "redis" in r.json()["error"]["message"]
