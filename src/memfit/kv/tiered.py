"""Decoding over a KV cache that does not fit on the fast tier: pages across device, host and disk.

A prefilled context's KV is cut into pages of ``page`` tokens per (row, KV head). Every page lives
in host memory (pinned, on a CUDA machine) or, past ``host_bytes``, in a file on local disk; the
device keeps only a small summary of each page (the per-channel min and max of its keys), a pool
of ``slots`` pages per (row, KV head) sized by the device budget, and a window of the most recent
tokens. At each decode step and layer:

1. **select**: each page's summary bounds the best score any of its keys can get from the step's
   query (Quest: sum over channels of max(q * kmin, q * kmax), taken over the query heads of the
   GQA group, so a group shares its pages); the ``slots`` pages with the highest bound are chosen;
2. **fetch**: chosen pages already in the pool stay (consecutive steps choose mostly the same
   pages); the others replace the pool's unchosen ones, read from host memory or disk (disk reads
   in a thread pool);
3. **attend**: exactly over the pool and the window (SDPA). Nothing else is read.

With ``slots`` equal to the number of pages every page is chosen and attention is full attention.
``fetch="all"`` is the baseline offloading systems improve on: each step copies every page of the
layer to the device and attends over all of them.

The cache plugs into ``model(..., past_key_values=cache)`` / ``model.generate`` of a model loaded
with memfit's attention function (``memfit.load_model``): decode steps hand the layer to the
attention call (``attention.push_packed``), which passes the step's query in. Calls with more than
one new token (a question after the context) read every page (exact attention).
Tokens that arrive after offloading (questions, generated tokens) stay in the device window.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from memfit.kv.attention import push_packed


class TierReadError(RuntimeError):
    """A page could not be read from its tier (a missing or short file): never attended as zeros."""


@dataclass(frozen=True)
class TierConfig:
    """Where an offloaded cache's bytes live.

    ``device``: the fast tier's budget, as a fraction of the 16-bit KV (<= 1) or in bytes (> 1):
    it holds the page summaries, the window and the pool of pages attended each step.
    ``host_bytes``: host memory for pages (None: every page on the host); the rest go to files
    under ``disk_dir`` (None: a temporary directory). ``fetch``: "select" (memfit) or "all" (copy
    every page each step: the baseline). ``workers``: threads reading disk pages."""

    device: float = 0.1
    page: int = 32
    window: int = 64
    sink: int = 1  # first pages always chosen (attention sinks)
    dense: int = 2  # first layers keep every page on the device (their attention is too spread to select: Quest)
    host_bytes: int | None = None
    disk_dir: str | None = None
    fetch: str = "select"
    workers: int = 4

    def __post_init__(self):
        if self.page < 1 or self.window < 0:
            raise ValueError(f"page must be >= 1 and window >= 0, got page={self.page}, window={self.window}")
        if not self.device > 0:
            raise ValueError(f"device budget must be > 0 (a fraction of the KV, or bytes), got {self.device}")
        if self.fetch not in ("select", "all"):
            raise ValueError(f"fetch must be 'select' or 'all', got {self.fetch!r}")
        if self.host_bytes is not None and self.host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {self.host_bytes}")


class _DiskPages:
    """One layer's pages on disk: a file of [B, H, N, 2 (K, V), P, D] 16-bit elements, read page by
    page with ``pread`` (a missing or truncated file raises, it never maps to garbage)."""

    def __init__(self, path: Path, k: torch.Tensor, v: torch.Tensor):
        self.path = path
        self.shape = k.shape  # [B, H, N, P, D]
        pages = torch.stack([k, v], dim=3).contiguous()  # [B, H, N, 2, P, D]
        with open(path, "wb") as f:
            f.write(pages.view(torch.uint8).numpy().tobytes())
        self.page_bytes = 2 * k.shape[-2] * k.shape[-1] * k.element_size()
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise TierReadError(f"disk tier file {self.path} cannot be opened: {e.strerror}") from None
        return self.fd

    def read(self, flat: list[int], out: torch.Tensor) -> None:
        """Pages with flat indices ``flat`` (into [B * H * N]) into ``out`` [len, 2, P, D]."""
        fd = self._open()
        buf = out.view(torch.uint8).view(len(flat), -1).numpy()
        for i, p in enumerate(flat):
            got = os.preadv(fd, [memoryview(buf[i])], p * self.page_bytes)
            if got != self.page_bytes:
                raise TierReadError(f"disk tier file {self.path} is short: page {p} needs bytes "
                                    f"{p * self.page_bytes}..{(p + 1) * self.page_bytes}, read {got}")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape[:3]) * self.page_bytes


class TieredLayer(CacheLayerMixin):
    """One layer of a :class:`TieredCache` (see the module doc)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cfg: TierConfig, slots: int, host_pages: int,
                 device: torch.device, disk: Path | None, pool: ThreadPoolExecutor | None):
        super().__init__()
        b, h, t, d = keys.shape
        p = cfg.page
        n = max(0, (t - cfg.window) // p)  # full pages; the rest of the context stays in the window
        self.cfg, self.n_pages, self.slots = cfg, n, min(slots, n)
        self.device, self.dtype = device, keys.dtype
        self.seen = t
        self.is_initialized = True
        paged_k = keys[:, :, : n * p].reshape(b, h, n, p, d)
        paged_v = values[:, :, : n * p].reshape(b, h, n, p, values.shape[-1])
        # each page's key summary, on the device: what selection reads every step
        self.kmin = paged_k.amin(3).to(device)
        self.kmax = paged_k.amax(3).to(device)
        # homes: pages [0, host_pages) on the host, the others on disk (index - host_pages)
        self.host_pages = min(host_pages, n)
        self.host_k = self._host_copy(paged_k[:, :, : self.host_pages])
        self.host_v = self._host_copy(paged_v[:, :, : self.host_pages])
        self.disk = None
        if self.host_pages < n:
            if disk is None:
                raise ValueError("pages past host_bytes need a disk directory")
            self.disk = _DiskPages(disk, paged_k[:, :, self.host_pages :].cpu(), paged_v[:, :, self.host_pages :].cpu())
        self.pool = pool
        self.keys = keys[:, :, n * p :].to(device).clone()  # the window: context tail, then new tokens
        self.values = values[:, :, n * p :].to(device).clone()
        self._empty_pool(b)
        self.stats = {"steps": 0, "fetched": 0}  # decode steps, pages copied to the device; shared with forks
        self.owner = True  # forks share the tiers and leave them open

    def _empty_pool(self, rows: int) -> None:
        """A pool of ``self.slots`` pages per (row, KV head), none filled yet."""
        h, p = self.kmin.shape[1], self.cfg.page
        self.pool_k = torch.zeros(rows, h, self.slots, p, self.keys.shape[-1], dtype=self.dtype, device=self.device)
        self.pool_v = torch.zeros(rows, h, self.slots, p, self.values.shape[-1], dtype=self.dtype, device=self.device)
        self.slot_page = torch.full((rows, h, self.slots), -1, dtype=torch.long, device=self.device)
        self.where = torch.full((rows, h, self.n_pages), -1, dtype=torch.long, device=self.device)  # page -> slot, -1: not in the pool

    # -- sizes ------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.n_pages * self.cfg.page + self.keys.shape[-2]
        return stored + query_length, self.seen - stored

    def lazy_initialization(self, key_states, value_states) -> None:  # built from a prefilled context
        pass

    def device_bytes(self) -> int:
        ts = (self.kmin, self.kmax, self.keys, self.values, self.pool_k, self.pool_v, self.slot_page, self.where)
        return sum(t.numel() * t.element_size() for t in ts)

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.host_k, self.host_v))

    def disk_bytes(self) -> int:
        return self.disk.nbytes if self.disk is not None else 0

    # -- pages ------------------------------------------------------------------------------------
    def read_pages(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages by flat index into [B * H * N] (CPU, long) from their homes: ([M, P, D] keys, values)
        on the host (pinned on a CUDA machine, for an asynchronous copy)."""
        b, h, _, p, d = self.pool_k.shape
        n = self.n_pages
        page = flat % n
        on_host = page < self.host_pages
        src = self._stored_row(flat // n)  # (row, head) of the storage
        host_flat = src * self.host_pages + page
        m = flat.numel()
        k = torch.empty(m, p, d, dtype=self.dtype, pin_memory=self.pinned)
        v = torch.empty(m, p, self.pool_v.shape[-1], dtype=self.dtype, pin_memory=self.pinned)
        if bool(on_host.any()):
            idx = on_host.nonzero().squeeze(1)
            hf = host_flat[idx]
            k[idx] = self.host_k.view(-1, p, d).index_select(0, hf)
            v[idx] = self.host_v.view(-1, p, v.shape[-1]).index_select(0, hf)
        if not bool(on_host.all()):
            idx = (~on_host).nonzero().squeeze(1)
            nd = n - self.host_pages
            disk_flat = (src[idx] * nd + page[idx] - self.host_pages).tolist()
            kv = torch.empty(len(disk_flat), 2, p, d, dtype=self.dtype)
            if self.pool is None:
                self.disk.read(disk_flat, kv)
            else:
                list(self.pool.map(lambda c: self.disk.read(disk_flat[c[0]:c[1]], kv[c[0]:c[1]]),
                                   _chunks(len(disk_flat), self.cfg.workers)))
            k[idx], v[idx] = kv[:, 0], kv[:, 1]
        return k, v

    @property
    def pinned(self) -> bool:
        """Host pages and staging buffers are pinned where the device is a GPU (asynchronous copies)."""
        return self.device.type == "cuda"

    def _host_copy(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied once into contiguous host memory (flat page indexing reads it as [B*H*N, P, D]),
        pinned where the device is a GPU."""
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=self.pinned).copy_(x)

    def _stored_row(self, rows: torch.Tensor) -> torch.Tensor:
        """Decode (row, head) pairs, flat, -> the storage's (a fork of one row into several reads it)."""
        h, sb = self.kmin.shape[1], self.kmin.shape[0]
        return rows if sb == self.pool_k.shape[0] else rows % h

    def all_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every page, on the device: [B, H, N * P, D] keys and values."""
        b, h, _, p, d = self.pool_k.shape
        sb, n = self.kmin.shape[0], self.n_pages
        if n == 0:
            return self.keys[:, :, :0], self.values[:, :, :0]
        if self.host_pages == n:  # the baseline's copy: one contiguous transfer per tensor
            k = self.host_k.to(self.device, non_blocking=True)
            v = self.host_v.to(self.device, non_blocking=True)
        else:
            k, v = self.read_pages(torch.arange(sb * h * n))
            k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
        return k.reshape(sb, h, n * p, d).expand(b, -1, -1, -1), v.reshape(sb, h, n * p, -1).expand(b, -1, -1, -1)

    def bound(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H, N]: an upper bound of the score q·k (unscaled) of any key of each page, the max over
        the query rows and the query heads of each KV head's group. ``query`` [B, Hq, nq, D]."""
        b, hq, nq, d = query.shape
        h = self.kmin.shape[1]
        q = query.reshape(b, h, (hq // h) * nq, d).to(self.kmin.dtype)  # a group's heads are adjacent
        s = q.clamp(min=0) @ self.kmax.transpose(-1, -2) + q.clamp(max=0) @ self.kmin.transpose(-1, -2)  # rows broadcast
        return s.amax(2)

    def select(self, query: torch.Tensor) -> None:
        """Bring the pages ``query`` bounds highest into the pool (those already there stay)."""
        b, h, s = self.slot_page.shape
        n = self.n_pages
        bound = self.bound(query)
        bound[..., : self.cfg.sink] = float("inf")  # the first tokens take much of every head's attention
        want = bound.topk(s, dim=-1).indices  # [B, H, S]
        hit = self.where.gather(-1, want) >= 0
        chosen = torch.zeros(b, h, n, dtype=torch.bool, device=self.device).scatter_(-1, want, True)
        keep = (self.slot_page >= 0) & chosen.gather(-1, self.slot_page.clamp(min=0))
        # misses first / free slots first: the j-th miss of a (row, head) goes into its j-th free slot
        # (as many free slots as misses: S distinct pages are wanted and S slots exist)
        miss_pages = want.gather(-1, hit.to(torch.int8).argsort(dim=-1, stable=True))
        free_slots = keep.to(torch.int8).argsort(dim=-1, stable=True)
        nmiss = (~hit).sum(-1, keepdim=True)
        is_new = torch.arange(s, device=self.device) < nmiss  # [B, H, S]
        rows = torch.arange(b * h, device=self.device).view(b, h, 1).expand(b, h, s)
        sel = is_new.nonzero(as_tuple=True)
        flat_rows, pages, slots = rows[sel], miss_pages[sel], free_slots[sel]
        if pages.numel() == 0:
            return
        kpg, vpg = self.read_pages((flat_rows * n + pages).cpu())
        slot_flat = flat_rows * s + slots
        self.pool_k.view(-1, *self.pool_k.shape[3:])[slot_flat] = kpg.to(self.device, non_blocking=True)
        self.pool_v.view(-1, *self.pool_v.shape[3:])[slot_flat] = vpg.to(self.device, non_blocking=True)
        old = self.slot_page.view(-1)[slot_flat]
        where = self.where.view(-1)
        gone = old >= 0
        where[(flat_rows * n + old)[gone]] = -1
        where[flat_rows * n + pages] = slots
        self.slot_page.view(-1)[slot_flat] = pages
        self.stats["fetched"] += pages.numel()

    # -- attention --------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.compute_dtype = key_states.dtype
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        return key_states, value_states  # not read: the attention call takes this layer's step

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: [B, Hq, 1, D] query -> [B, 1, Hq, D] output. ``mask`` [B, 1, 1, keys]
        (bool, True = visible) ends with the window's part, which is kept (rows left-padded after the
        context mask their padding); the pages (the context) are all visible."""
        self.stats["steps"] += 1
        if self.cfg.fetch == "all" or self.slots == 0:
            k, v = self.all_pages()
        else:
            self.select(query)
            b, h, s, p, d = self.pool_k.shape
            k, v = self.pool_k.view(b, h, s * p, d), self.pool_v.view(b, h, s * p, -1)
        k = torch.cat([k, self.keys], dim=-2).to(query.dtype)
        v = torch.cat([v, self.values], dim=-2).to(query.dtype)
        if mask is not None:
            w = self.keys.shape[-2]
            tail = mask[..., -w:]
            mask = torch.cat([tail.new_ones(*tail.shape[:-1], k.shape[-2] - w), tail], dim=-1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def fork(self, batch_size: int) -> "TieredLayer":
        """A layer that reads the same pages (shared, read only) for ``batch_size`` rows, with its own
        window and pool (empty: its first step fetches what it selects)."""
        if self.keys.shape[0] != batch_size and self.kmin.shape[0] != 1:
            raise ValueError(f"cannot fork a tiered cache of batch size {self.kmin.shape[0]} into {batch_size} rows")
        new = copy.copy(self)
        new.keys = self.keys.expand(batch_size, -1, -1, -1).clone()
        new.values = self.values.expand(batch_size, -1, -1, -1).clone()
        new._empty_pool(batch_size)
        new.owner = False
        return new

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Every token, in order (calls with several new tokens attend exactly over all of them)."""
        k, v = self.all_pages()
        dt = getattr(self, "compute_dtype", self.dtype)  # attention reads the compute dtype
        return torch.cat([k, self.keys], dim=-2).to(dt), torch.cat([v, self.values], dim=-2).to(dt), None

    def close(self) -> None:
        if self.disk is not None and self.owner:
            self.disk.close()


class _Step:
    """What the attention call of one layer reads (``attention.push_packed``)."""

    masked = True  # attend() takes the step's mask (rows padded after the context)

    def __init__(self, layer: TieredLayer):
        self.layer = layer

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer.attend(query, scaling, mask)

    def materialize(self):
        return self.layer.materialize()


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    size = max(1, math.ceil(n / max(1, parts)))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class TieredCache(Cache):
    """A prefilled KV cache offloaded to device / host / disk tiers (see the module doc).

    ``TieredCache.offload(keys, values, TierConfig(device=0.1))`` from per-layer [B, H, T, D] KV
    (16-bit), or :meth:`from_cache` from a memfit ``CompressedCache``."""

    def __init__(self, layers: list[TieredLayer], cfg: TierConfig, tmp: "tempfile.TemporaryDirectory | None",
                 pool: ThreadPoolExecutor | None):
        super().__init__(layers=layers)
        self.cfg = cfg
        self._tmp, self._pool = tmp, pool

    @classmethod
    def offload(cls, keys: list[torch.Tensor], values: list[torch.Tensor], cfg: TierConfig | None = None,
                device: "torch.device | str | None" = None) -> "TieredCache":
        cfg = cfg or TierConfig()
        if not keys or len(keys) != len(values):
            raise ValueError("offload needs one key and one value tensor per layer")
        for i, (k, v) in enumerate(zip(keys, values)):
            if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
                raise ValueError(f"layer {i}: keys and values must be [B, H, T, D] with the same B, H, T, got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
        device = torch.device(device) if device is not None else keys[0].device
        b, h, t, d = keys[0].shape
        esize = keys[0].element_size()
        full = sum(2 * k.numel() * esize for k in keys)  # 16-bit K and V, every layer
        budget = cfg.device * full if cfg.device <= 1 else cfg.device
        # per layer and (row, head): the window (+ one page of room), the summaries, then slots
        n = max(0, (t - cfg.window) // cfg.page)
        slot_bytes = cfg.page * 2 * d * esize + 16
        fixed = (t - n * cfg.page + cfg.page) * 2 * d * esize + n * (2 * d * esize + 16)  # per layer, row, head
        dense = min(cfg.dense, len(keys))
        per_layer = (budget / (b * h) - dense * (fixed + n * slot_bytes)) / max(1, len(keys) - dense)
        slots = int((per_layer - fixed) // slot_bytes) if dense < len(keys) else n
        if cfg.fetch == "all":  # the baseline keeps no pool: each step copies a whole layer in
            slots, dense = 0, 0
        elif n and slots < 1:
            raise ValueError(f"a device budget of {budget / 2**20:.2f} MiB does not hold the window, the page "
                             f"summaries and one page ({fixed * len(keys) * b * h / 2**20:.2f} MiB and more): "
                             "raise device, or lower window or page")
        page_bytes = 2 * cfg.page * d * esize
        host_pages = n if cfg.host_bytes is None else int(cfg.host_bytes // (len(keys) * b * h * page_bytes))
        tmp = None
        disk_dir = None
        if host_pages < n:
            if cfg.disk_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="memfit-tiered-")
                disk_dir = Path(tmp.name)
            else:
                disk_dir = Path(cfg.disk_dir)
                disk_dir.mkdir(parents=True, exist_ok=True)
        pool = ThreadPoolExecutor(cfg.workers) if host_pages < n and cfg.workers > 1 else None
        layers = [TieredLayer(k, v, cfg, n if i < dense else slots, host_pages, device,
                              disk_dir / f"layer{i:03d}.kv" if disk_dir is not None else None, pool)
                  for i, (k, v) in enumerate(zip(keys, values))]
        return cls(layers, cfg, tmp, pool)

    @classmethod
    def from_cache(cls, cache, cfg: TierConfig | None = None, device=None) -> "TieredCache":
        """Offload a memfit ``CompressedCache`` (every stored token, dequantized to 16 bits)."""
        keys, values = zip(*(layer.materialize() for layer in cache.layers))
        if any(k.shape[-2] != cache.num_tokens for k in keys):
            raise ValueError("offload needs every token of the context in every layer (no eviction)")
        dt = [getattr(layer, "dtype", k.dtype) for layer, k in zip(cache.layers, keys)]  # what the cache stores
        return cls.offload([k.to(t) for k, t in zip(keys, dt)], [v.to(t) for v, t in zip(values, dt)], cfg, device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        out = layer.update(key_states, value_states)
        push_packed(layer_idx, _Step(layer))
        return out

    def fork(self, batch_size: int = 1) -> "TieredCache":
        """A cache over the same pages for ``batch_size`` rows (what ``LM.ask`` decodes in); this one
        is left unchanged and keeps the tiers (close it, not the fork)."""
        return TieredCache([layer.fork(batch_size) for layer in self.layers], self.cfg, None, None)

    def use_kernels(self, on: bool = True) -> "TieredCache":  # LM.generate's call: SDPA on every device
        return self

    # -- figures ------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.get_seq_length()

    @property
    def nbytes(self) -> int:
        """Bytes on all tiers."""
        return self.device_bytes + self.host_bytes + self.disk_bytes

    @property
    def full_nbytes(self) -> int:
        """Bytes of the same tokens in a 16-bit cache on one tier."""
        layer = self.layers[0]
        b, h, _, d = layer.keys.shape
        return len(self.layers) * 2 * b * h * layer.seen * d * 2

    @property
    def device_bytes(self) -> int:
        return sum(layer.device_bytes() for layer in self.layers)

    @property
    def host_bytes(self) -> int:
        return sum(layer.host_bytes() for layer in self.layers)

    @property
    def disk_bytes(self) -> int:
        return sum(layer.disk_bytes() for layer in self.layers)

    @property
    def fetched_pages(self) -> int:
        return sum(layer.stats["fetched"] for layer in self.layers)

    @property
    def steps(self) -> int:
        """Decode steps that attended over selected pages (this cache's and its forks')."""
        return self.layers[0].stats["steps"]

    def close(self) -> None:
        """Close the disk tier's files and remove a temporary directory."""
        for layer in self.layers:
            layer.close()
        if self._pool is not None:
            self._pool.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
