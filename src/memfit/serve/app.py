"""OpenAI-compatible HTTP API over memfit: chat and text completions, streaming or not, plus
stored compressed contexts (``/v1/contexts``) that any replica sharing the store can answer from.

The model runs one request at a time (CPU inference gains nothing from interleaving); requests
wait in a bounded queue, and a full queue answers 429. Errors use OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from memfit.api import ANYWHERE, LM, Context
from memfit.kv.policy import Policy, PolicyError, parse_policy
from memfit.store import ContextStore, StoreUnavailable
from memfit.serve.tenants import OPEN, Identity
from memfit.store.entry import CorruptEntry, Entry, EntryMismatch

_CONTEXT_ID = re.compile(r"^[0-9a-f]{32}$")
REUSE_MIN_TOKENS = 256  # plain prompts shorter than one prefix chunk are not worth storing
RECENT_CONTEXTS = 4  # restored contexts kept ready (dequantized) for follow-up questions
MAX_DOCUMENTS = 16  # stored documents one chat may combine


@dataclass
class ServeConfig:
    policy: str = "kivi(bits=4)"
    api_key: str | None = None
    api_keys: dict[str, Identity] | None = None  # --api-keys FILE: key -> tenant (see memfit.serve.tenants)
    max_body_bytes: int = 4 << 20
    max_context_tokens: int = 8192
    max_tokens: int = 1024
    max_queue: int = 16
    model_name: str = "smollm2"  # what /v1/models lists; a request naming another model gets 404
    reuse_prompts: bool = True  # store long plain prompts and reuse their prefixes
    request_timeout: float = 300.0  # seconds of generation before an answer is cut (finish_reason "length")


def _check_id(context_id: str) -> None:
    """Context ids are store keys, 32 hex digits: nothing else may reach a tier (or a file name)."""
    if not _CONTEXT_ID.match(context_id):
        raise APIError(400, "context_id must be 32 lowercase hex digits", param="context_id")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.type, self.param, self.code)


RETRY_AFTER_S = 5  # a store tier that was down is tried again after this long (RedisTier's retry_after)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    # a 503 says when to come back, so that clients wait instead of retrying at once
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status,
                        headers=headers)


# -- request bodies: unknown fields are refused (422), as are values out of range ------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end-of-turn before this many tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)

    def stops(self) -> list[str] | None:
        s = [self.stop] if isinstance(self.stop, str) else self.stop
        if s is not None and (len(s) > 4 or any(not x for x in s)):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return s or None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    context_id: str | None = None  # memfit: answer from a stored compressed context
    # memfit: stored documents (POST /v1/contexts with "reuse": "anywhere"), in this order behind the
    # request's system message, and the fraction of their tokens recomputed (memfit.reuse)
    context_ids: list[str] | None = Field(None, min_length=1, max_length=MAX_DOCUMENTS)
    recompute: float | None = Field(None, ge=0.0, le=1.0)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ContextRequest(_Strict):
    text: str = Field(min_length=1)
    policy: str | None = None
    # "anywhere": a document that chats can place anywhere (context_ids), not only as their prefix
    reuse: Literal["prefix", "anywhere"] = "prefix"


# -- the server ------------------------------------------------------------------------------------
class Server:
    """Holds the model, the store and the queue; the FastAPI routes call into it."""

    def __init__(self, lm: LM, store: ContextStore, config: ServeConfig):
        self.lm, self.store, self.config = lm, store, config
        self.policy = parse_policy(config.policy)
        # plain prompts keep only the quantizer: an evicted cache cannot be reused as a prefix
        self.prompt_policy = Policy((), self.policy.quant, self.policy.decode)
        self.waiting = 0
        self.lock = asyncio.Lock()
        # One thread runs all model work: torch's OpenMP pool belongs to the calling thread, and a
        # pool per worker thread would leave several teams spinning on the same cores.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-model")
        self.created = int(time.time())
        # restored contexts, dequantized, newest last; read and changed on the model thread only
        self.recent: OrderedDict[str, Context] = OrderedDict()
        self.documents_recognised = 0  # stored documents found in plain prompts and reused

    # queue: one slot per request, waiting or running; the model lock lets one run at a time
    def take_slot(self) -> None:
        if self.waiting >= self.config.max_queue:
            raise APIError(429, f"server busy: {self.waiting} requests queued (limit {self.config.max_queue})",
                           "rate_limit_error", code="queue_full")
        self.waiting += 1

    def free_slot(self) -> None:
        self.waiting -= 1

    async def run(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the model thread while holding the model; the slot must be taken."""
        async with self.lock:
            return await self.on_worker(fn, *args)

    async def on_worker(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    # -- building what to decode -----------------------------------------------------------------
    def _max_tokens(self, requested: int | None) -> int:
        n = requested or self.config.max_tokens
        if n > self.config.max_tokens:
            raise APIError(400, f"max_tokens={n} exceeds this server's limit of {self.config.max_tokens}",
                           param="max_tokens")
        return n

    def _check_length(self, tokens: int, what: str) -> None:
        if tokens > self.config.max_context_tokens:
            raise APIError(400, f"{what} has {tokens} tokens; this server accepts at most "
                           f"{self.config.max_context_tokens}", param="messages", code="context_length_exceeded")

    def stored_context(self, context_id: str, who: Identity = OPEN) -> Context:
        _check_id(context_id)
        ctx = self.recent.get(context_id)
        if ctx is not None and self.store.contains(context_id):  # still stored (another replica may delete it)
            if not who.owns(ctx.tenant):
                raise _not_found(context_id)
            self.recent.move_to_end(context_id)
            return ctx
        self.recent.pop(context_id, None)
        ctx = self._restore(context_id, who)
        ctx.cache.keep_dense()
        self.recent[context_id] = ctx
        while len(self.recent) > RECENT_CONTEXTS:
            self.recent.popitem(last=False)
        return ctx

    def delete_stored(self, context_id: str, who: Identity = OPEN) -> bool:
        """Forget a context, here and in the store. On the model thread, like every use of ``recent``
        (a delete on the event loop raced a restore of the same context: a 500 in the chaos run).
        Another tenant's context is not touched (False, as for one never stored)."""
        if not who.admin:
            self.check_tiers("context_id")  # whose it is is known only where it is stored
            manifest = self.store.manifest(context_id)
            if manifest is None or manifest.get("tenant", "") != who.tenant:
                return False
        self.recent.pop(context_id, None)
        return self.store.delete(context_id)

    def list_contexts(self, who: Identity) -> dict:
        """The caller's stored contexts (an admin: every tenant's), from the entries' headers."""
        data = []
        for key, m in self.store.manifests():
            owner = m.get("tenant", "")
            if not who.owns(owner) or "cache" not in m:
                continue
            data.append({**self._describe_manifest(key, m), **({"tenant": owner} if who.admin else {})})
        return {"object": "list", "data": data}

    def _describe_manifest(self, key: str, m: dict) -> dict:
        policy = str(m.get("policy", ""))
        out = self.describe(key, int(m.get("num_tokens", 0)), int(m.get("nbytes", 0)), policy.removeprefix(ANYWHERE))
        return {**out, "reuse": "anywhere"} if policy.startswith(ANYWHERE) else out

    def usage(self, tenant: str) -> int:
        """Bytes of ``tenant``'s stored entries (contexts and cached prompts) in the shared store."""
        return sum(int(m.get("nbytes", 0)) for _, m in self.store.manifests() if m.get("tenant", "") == tenant)

    def _admit(self, who: Identity, nbytes: int, refuse: bool = True) -> bool:
        """Whether ``nbytes`` more fit in the tenant's quota; over it, a 403 (``refuse``) or False."""
        if who.quota_bytes is None:
            return True
        used = self.usage(who.tenant)
        if used + nbytes <= who.quota_bytes:
            return True
        if not refuse:
            return False
        raise APIError(403, f"tenant quota exceeded: {used} of {who.quota_bytes} bytes stored, and this context "
                       f"needs {nbytes} more; delete contexts (DELETE /v1/contexts/ID) to make room",
                       "insufficient_quota", code="quota_exceeded")

    def _restore(self, context_id: str, who: Identity = OPEN) -> Context:
        # a copy in a private tier is only known to be current while the shared tier can say so
        self.check_tiers("context_id")
        try:
            entry = self.store.get_entry(context_id)
        except (CorruptEntry, EntryMismatch) as e:
            raise APIError(404, f"context {context_id} is unusable: {e}", param="context_id") from None
        if entry is not None and not who.owns(entry.manifest.get("tenant", "")):
            raise _not_found(context_id)  # as if it never existed: no hint that another tenant has it
        if entry is not None and str(entry.manifest.get("policy", "")).startswith(ANYWHERE):
            raise APIError(400, f"{context_id} is a document stored for context_ids (reuse anywhere), not a context: "
                           "send it in context_ids", param="context_id")
        if entry is None:
            self.check_tiers("context_id")  # a tier that cannot answer: the context may still be stored there
            lost = self.store.lost_since()
            if lost is not None:  # reported, not passed off as a context that never existed
                raise APIError(404, f"no stored context {context_id}: a store tier lost its data (noticed at "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(lost))} UTC) and it may have "
                               "been there", param="context_id", code="context_lost")
            raise _not_found(context_id)
        try:
            return self.lm.context_from_entry(entry)
        except EntryMismatch as e:
            raise APIError(409, f"context {context_id} was made for another model: {e}", param="context_id") from None

    def chat_inputs(self, req: ChatRequest, who: Identity = OPEN) -> tuple[Context, list[int]]:
        """The context to read from and the tokens that follow it (model work: call on the worker)."""
        if req.context_ids is not None:
            if req.context_id is not None:
                raise APIError(400, "give context_id (one stored context) or context_ids (stored documents), not both",
                               param="context_ids")
            return self._documents_context(req, who)
        if req.context_id is not None:
            if len(req.messages) != 1 or req.messages[0].role != "user":
                raise APIError(400, "with context_id, send exactly one user message: the question about the stored "
                               "context", param="messages")
            ctx = self.stored_context(req.context_id, who)
            suffix = self.lm.encode_question(req.messages[0].text())
            self._check_length(ctx.num_tokens + len(suffix), "context + question")
            return ctx, suffix
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # templates raise on odd role orders
            raise APIError(400, f"messages cannot be formatted for this model: {e}", param="messages") from None
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return self._prompt_context(list(ids), who)

    def completion_inputs(self, req: CompletionRequest, who: Identity = OPEN) -> tuple[Context, list[int]]:
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt) if len(req.prompt) == 1 else None
        if prompt is None:
            raise APIError(400, "prompt: send one string (batches of prompts are not supported)", param="prompt")
        ids = self.lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return self._prompt_context(ids, who)

    def _prompt_context(self, ids: list[int], who: Identity = OPEN) -> tuple[Context, list[int]]:
        """The prompt's context and the tokens still to feed: the whole prompt, whose last logits
        start the answer (nothing left to feed). A prompt holding stored documents is assembled
        from them; a long one is looked up in the store (a stored prefix is reused, the rest read)
        and stored for the next request, under the caller's tenant (another tenant's prompts are
        never reused), unless that would exceed its quota."""
        self._check_length(len(ids), "prompt")
        if len(ids) < 2:
            bos = self.lm.tokenizer.bos_token_id
            if bos is None:
                raise APIError(400, "prompt needs at least two tokens", param="prompt")
            ids = [bos, *ids]
        whole = torch.tensor([ids], device=self.lm.device)
        if self.config.reuse_prompts:
            found = self._documents_in(ids[:-1], who)
            if found:
                spans, spec, entries = found
                ctx = self.lm.prefill_assembled(whole, spans, spec, store=self.store, tenant=who.tenant, known=entries)
                self.documents_recognised += len(spans)
                return ctx, []
        if self.config.reuse_prompts and len(ids) - 1 >= REUSE_MIN_TOKENS:
            # storing a prompt only speeds up the next one: a store that cannot take it does not fail the chat
            def stored(prompt: torch.Tensor) -> Context:
                return self.lm.prefill_stored(prompt, self.prompt_policy, self.store, must_store=False,
                                              tenant=who.tenant, admit=lambda c: self._admit(who, c.nbytes, refuse=False))
            ctx = stored(whole)
            # the same prompt stored without its logits (by an earlier version): its prefix, then the last token
            return (ctx, []) if ctx.logits is not None else (stored(whole[:, :-1]), ids[-1:])
        return self.lm.prefill_ids(whole, self.prompt_policy), []

    def _documents_in(self, ids: list[int], who: Identity) -> "tuple[list[tuple[int, int]], str, dict[str, Entry]] | None":
        """Stored documents found in a plain prompt (see LM.find_documents), those stored under the
        first one's policy, that policy, and their entries (read once, by key); None if there are none."""
        entries: dict[str, Entry] = {}
        found = self.lm.find_documents(ids, self.store, who.tenant, known=entries)
        specs = [str(entries[key].manifest.get("policy", "")) for _, _, key in found]
        if not found or not specs[0].startswith(ANYWHERE):
            return None
        return ([(a, b) for (a, b, _), spec in zip(found, specs) if spec == specs[0]], specs[0].removeprefix(ANYWHERE),
                entries)

    def check_tiers(self, param: str | None = None) -> None:
        """503 while a store tier is unreachable: what a request would read or change there (a
        context another replica stored, a delete every replica must see) cannot be answered for."""
        down = self.store.unavailable()
        if down:
            raise APIError(503, f"store tier unavailable: {', '.join(down)}; retry later", "server_error",
                           param=param, code="store_unavailable")

    def create_context(self, req: ContextRequest, who: Identity = OPEN) -> dict:
        try:
            policy = parse_policy(req.policy or self.policy)
        except PolicyError as e:
            raise APIError(400, str(e), param="policy") from None
        if req.reuse == "anywhere":
            return self._create_document(req.text, policy, who)
        ids = self.lm.encode_context(req.text)
        self._check_length(ids.shape[1], "context")
        self.check_tiers()  # stored where other replicas cannot see it, it would be lost to them
        ctx = self.lm.prefill_stored(ids, policy, self.store, tenant=who.tenant,
                                     admit=lambda c: self._admit(who, c.nbytes))
        return self.describe(ctx.key, ctx.num_tokens, ctx.nbytes, policy.spec, ctx.meta.get("store"))

    def _create_document(self, text: str, policy: Policy, who: Identity) -> dict:
        """A document stored for chats to place anywhere (its quantizer applied, see LM.document_kv)."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_length(len(ids), "document")
        self.check_tiers()
        cache, _, how, key = self.lm.document_kv(ids, policy, self.store, tenant=who.tenant,
                                                 admit=lambda n: self._admit(who, n))
        stored = cache.policy.spec  # the quantizer alone: documents are never evicted
        return {**self.describe(key, len(ids), cache.nbytes, stored, how), "reuse": "anywhere"}

    def _documents_context(self, req: "ChatRequest", who: Identity) -> tuple[Context, list[int]]:
        """The stored documents ``req.context_ids`` behind the request's system message, assembled
        with selective recompute, and the question (its one user message) after them."""
        msgs = req.messages
        system = msgs[0].text() if msgs[0].role in ("system", "developer") else None
        rest = msgs[1:] if system is not None else msgs
        if len(rest) != 1 or rest[0].role != "user":
            raise APIError(400, "with context_ids, send an optional system message and one user message: the question "
                           "about the documents", param="messages")
        self.check_tiers("context_ids")
        docs, specs, entries = [], set(), {}
        for cid in req.context_ids:
            _check_id(cid)
            m = self.store.manifest(cid)
            if m is None or not who.owns(m.get("tenant", "")) or not str(m.get("policy", "")).startswith(ANYWHERE):
                raise _not_found(cid)
            entry = self.store.get_entry(cid)
            if entry is None:
                raise _not_found(cid)
            docs.append(entry.tensors["token_ids"].tolist())
            entries[cid] = entry  # read once: prefill_parts takes it instead of reading it again
            specs.add((m["policy"].removeprefix(ANYWHERE), m.get("tenant", "")))
        if len(specs) != 1:
            raise APIError(400, "context_ids: the documents were stored under different policies or tenants; "
                           "store them under one", param="context_ids")
        (spec, tenant), = specs
        suffix = self.lm.encode_question(rest[0].text())
        self._check_length(sum(map(len, docs)) + len(suffix), "documents + question")
        ctx = self.lm.prefill_parts([system, *docs], spec, store=self.store, recompute=req.recompute, tenant=tenant,
                                    known=entries)
        return ctx, suffix

    def describe(self, key: str, tokens: int, nbytes: int, policy: str, status: str | None = None) -> dict:
        full = tokens * self.lm.kv_bytes_per_token
        out = {"id": key, "object": "context", "tokens": tokens, "bytes": nbytes, "full_bytes": full,
               "compression": round(full / max(1, nbytes), 3), "policy": policy}
        if status:
            out["store"] = status
        return out

    def context_info(self, context_id: str, who: Identity = OPEN) -> dict:
        _check_id(context_id)
        self.check_tiers("context_id")
        m = self.store.manifest(context_id)
        if m is not None and str(m.get("policy", "")).startswith(ANYWHERE):
            if not who.owns(m.get("tenant", "")):
                raise _not_found(context_id)
            return self._describe_manifest(context_id, m)
        ctx = self.stored_context(context_id, who)
        return self.describe(context_id, ctx.num_tokens, ctx.nbytes, ctx.policy.spec)


def _not_found(context_id: str) -> APIError:
    """The one answer for an id that was never stored, was deleted, or is another tenant's."""
    return APIError(404, f"no stored context {context_id}", param="context_id", code="context_not_found")


def _who(request: Request) -> Identity:
    return request.scope.get("state", {}).get("memfit_identity", OPEN)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(lm: LM, store: ContextStore, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    srv = Server(lm, store, config)
    app = FastAPI(title="memfit", version="0.1")
    app.state.server = srv
    app.add_middleware(_Guard, api_key=config.api_key, api_keys=config.api_keys, max_body=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg')}")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable):
        # not done, so not acknowledged: the client may retry once a tier can take it
        return _error(503, f"{exc}; retry later", "server_error", code="store_unavailable")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "memfit"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": srv.waiting}

    @app.get("/v1/store")
    async def store_stats():
        """memfit: the context store's hits, misses and bytes per tier, and the stored documents
        found in plain prompts."""
        return {**await srv.on_worker(srv.store.stats), "documents_recognised": srv.documents_recognised}

    async def _pieces(it: Iterator[str], deadline: float) -> AsyncIterator[str]:
        """The answer's pieces, the model taken for one step at a time: concurrent requests take
        turns (asyncio's lock serves waiters first come, first served), so a long answer cannot hold
        the model while shorter ones wait. Past ``deadline`` the answer stops, as if at max_tokens."""
        while time.monotonic() < deadline:
            async with srv.lock:
                piece = await srv.on_worker(next, it, None)
            if piece is None:
                return
            yield piece

    async def _answer(kind: str, req: _Sampling, inputs: Callable[[], tuple[Context, list[int]]], wrap):
        if req.model is not None and req.model != config.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist: this server serves '{config.model_name}'",
                           param="model", code="model_not_found")
        max_new = srv._max_tokens(getattr(req, "max_completion_tokens", None) or req.max_tokens)
        stop = req.stops()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kwargs = {"temperature": req.temperature, "top_p": req.top_p, "stop": stop, "seed": req.seed,
                  "min_new_tokens": min(req.min_tokens, max_new)}
        srv.take_slot()
        if not req.stream:
            try:
                ctx, suffix = await srv.run(inputs)
                info: dict = {}
                it = srv.lm.stream(ctx, suffix, max_new, info=info, **kwargs)
                try:
                    text = "".join([p async for p in _pieces(it, time.monotonic() + config.request_timeout)])
                finally:
                    srv.worker.submit(it.close)  # cut short: the model thread closes it
            finally:
                srv.free_slot()
            return wrap.full(rid, created, text, info["finish_reason"],
                             _usage(ctx.num_tokens + len(suffix), info["completion_tokens"]))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:  # read the prompt before answering 200, so that its errors get their own status
            ctx, suffix = await srv.run(inputs)
        except BaseException:
            srv.free_slot()
            raise
        slot = {"held": True}

        def release() -> None:
            if slot.pop("held", False):
                srv.free_slot()

        async def events() -> AsyncIterator[str]:
            info: dict = {}
            it = srv.lm.stream(ctx, suffix, max_new, info=info, **kwargs)
            try:
                yield _sse(wrap.chunk(rid, created, None, None, first=True))
                async for piece in _pieces(it, time.monotonic() + config.request_timeout):
                    yield _sse(wrap.chunk(rid, created, piece, None))
                yield _sse(wrap.chunk(rid, created, None, info["finish_reason"]))
                if include_usage:
                    yield _sse({**wrap.chunk(rid, created, None, None, usage_only=True),
                                "usage": _usage(ctx.num_tokens + len(suffix), info["completion_tokens"])})
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: stop decoding (after the step running now), free the slot
                srv.worker.submit(it.close)
                release()

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        who = _who(request)
        return await _answer("chat", req, lambda: srv.chat_inputs(req, who), _ChatShape(config.model_name))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        who = _who(request)
        return await _answer("text", req, lambda: srv.completion_inputs(req, who), _TextShape(config.model_name))

    @app.post("/v1/contexts")
    async def create_context(req: ContextRequest, request: Request):
        srv.take_slot()
        try:
            return await srv.run(srv.create_context, req, _who(request))
        finally:
            srv.free_slot()

    @app.get("/v1/contexts")
    async def list_contexts(request: Request):
        """memfit: the caller's stored contexts (an admin key: every tenant's)."""
        return await srv.on_worker(srv.list_contexts, _who(request))

    @app.get("/v1/contexts/{context_id}")
    async def get_context(context_id: str, request: Request):
        return await srv.on_worker(srv.context_info, context_id, _who(request))

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str, request: Request):
        _check_id(context_id)
        deleted = await srv.on_worker(srv.delete_stored, context_id, _who(request))
        await srv.on_worker(srv.check_tiers)  # not acknowledged unless every tier saw it
        if not deleted:
            raise _not_found(context_id)
        return {"id": context_id, "object": "context", "deleted": True}

    return app


class _Guard:
    """API key and body size, checked before the app sees a request. Plain ASGI (not Starlette's
    BaseHTTPMiddleware), so that streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str | None, max_body: int, api_keys: dict[str, Identity] | None = None):
        self.app, self.api_key, self.api_keys, self.max_body = app, api_key, api_keys, max_body

    def _identity(self, authorization: str | None) -> Identity | None:
        """Who the Authorization header says sent the request; None: refused."""
        if self.api_keys is not None:
            key = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
            return self.api_keys.get(key) if key is not None else None
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return None
        return OPEN

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        who = self._identity(headers.get("authorization"))
        if who is None:
            return await _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                                code="invalid_api_key")(scope, receive, send)
        scope.setdefault("state", {})["memfit_identity"] = who
        too_big = _error(413, f"request body larger than {self.max_body} bytes", code="body_too_large")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked upload: read it all (up to the limit), then hand it on
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class _ChatShape:
    model: str

    def full(self, rid: str, created: int, text: str, finish: str, usage: dict) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage}

    def chunk(self, rid: str, created: int, text: str | None, finish: str | None, first: bool = False,
              usage_only: bool = False) -> dict:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}
        if usage_only:
            return {**base, "choices": []}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@dataclass
class _TextShape:
    model: str

    def full(self, rid: str, created: int, text: str, finish: str, usage: dict) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

    def chunk(self, rid: str, created: int, text: str | None, finish: str | None, first: bool = False,
              usage_only: bool = False) -> dict:
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model}
        if usage_only:
            return {**base, "choices": []}
        return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
