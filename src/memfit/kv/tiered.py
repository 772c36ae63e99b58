"""Decoding over a KV cache that does not fit on the fast tier: pages across device, host and disk.

A prefilled context's KV is cut into pages of ``page`` tokens per (row, KV head), stored and moved
at ``bits`` (8 by default: memfit's KIVI layout, see :class:`_Codec`). Every page lives in host
memory (pinned, on a CUDA machine) or, past ``host_bytes``, in a file on local disk; the device
keeps a small summary of each page (the per-channel min and max of its keys), a pool of ``slots``
pages per (row, KV head) sized by the device budget, and a window of the most recent tokens. At
each decode step and layer:

1. **select**: each page's summary bounds the best score any of its keys can get from the step's
   query (Quest: sum over channels of max(q * kmin, q * kmax), taken over the query heads of the
   GQA group, so a group shares its pages); the ``slots`` pages with the highest bound are chosen,
   with the sink page and the pages the last question attended most (``pin``);
2. **fetch**: chosen pages already in the pool stay (consecutive steps choose many of the same
   pages); the others replace the pool's unchosen ones of lowest bound, highest bound first and
   at most ``fetch_cap`` of the pool a step (a step's transfer stays bounded when the choice moves
   a lot, as with random weights). On a GPU the device reads pinned host memory itself
   (``kernels.page_copy``: fixed shapes, no host sync); disk pages are read in a thread pool;
3. **attend**: exactly over the pool and the window (the packed-KV kernel on a GPU, else SDPA).

With ``slots`` equal to the number of pages every page is chosen and attention is full attention.
``fetch="all"`` is the baseline offloading systems improve on: each step copies every page of the
layer to the device and attends over all of them.

The cache plugs into ``model(..., past_key_values=cache)`` / ``model.generate`` of a model loaded
with memfit's attention function (``memfit.load_model``): decode steps hand the layer to the
attention call (``attention.push_packed``), which passes the step's query in. Calls with more than
one new token (a question after the context) read every page (exact attention). Tokens that
arrive after offloading (questions, generated tokens) stay in the device window. ``to_static``
makes a step device work only, for ``memfit.kv.static.GraphDecoder`` to replay as a CUDA graph.
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

from memfit.kernels import packing, page_copy, window_append
from memfit.kernels.hostmem import device_view, pinned_copy
from memfit.kernels.decode_attention import PackedRun, decode_attention_runs, kernel_supports
from memfit.kv import quant
from memfit.kv.attention import push_packed


class TierReadError(RuntimeError):
    """A page could not be read from its tier (a missing or short file): never attended as zeros."""


@dataclass(frozen=True)
class TierConfig:
    """Where an offloaded cache's bytes live.

    ``device``: the fast tier's budget, as a fraction of the 16-bit KV (<= 1) or in bytes (> 1):
    it holds the page summaries, the window and the pool of pages attended each step.
    ``host_bytes``: host memory for pages (None: every page on the host); the rest go to files
    under ``disk_dir`` (None: a temporary directory). ``bits``: pages stored (on every tier) and
    moved at 2/4/8 bits (keys per channel over the page, values per token over ``vgroup`` channels:
    KIVI's layout), or None for 16 bits: 8 bits put about 1.9x more pages in the same budget than
    16 and move 1.9x fewer bytes a fetch (4 bits: 3.7x, less accurate). ``fetch``: "select"
    (memfit) or "all" (copy every page each step: the baseline). ``fetch_cap``: at most this
    fraction of the pool is replaced a step, the misses of highest bound first (1: no limit), which
    bounds a step's transfer when consecutive steps choose different pages. ``workers``: threads
    reading disk pages."""

    device: float = 0.1
    page: int = 32
    window: int = 64
    sink: int = 1  # first pages always chosen (attention sinks)
    dense: int = 2  # first layers keep every page on the device (their attention is too spread to select: Quest)
    host_bytes: int | None = None
    disk_dir: str | None = None
    bits: int | None = 8
    vgroup: int = 64
    fetch: str = "select"
    workers: int = 4
    pin: int = 8  # pages a question attends most (per row and KV head) kept while answering
    probe: int = 16  # the question's last rows that say which
    fetch_cap: float = 0.05

    def __post_init__(self):
        if self.page < 1 or self.window < 0:
            raise ValueError(f"page must be >= 1 and window >= 0, got page={self.page}, window={self.window}")
        if not self.device > 0:
            raise ValueError(f"device budget must be > 0 (a fraction of the KV, or bytes), got {self.device}")
        if self.fetch not in ("select", "all"):
            raise ValueError(f"fetch must be 'select' or 'all', got {self.fetch!r}")
        if self.bits is not None:
            packing.check_bits(self.bits)
        if self.vgroup < 1:
            raise ValueError(f"vgroup must be >= 1, got {self.vgroup}")
        if self.pin < 0 or self.probe < 1:
            raise ValueError(f"pin must be >= 0 and probe >= 1, got pin={self.pin}, probe={self.probe}")
        if self.host_bytes is not None and self.host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {self.host_bytes}")
        if not 0 < self.fetch_cap <= 1:
            raise ValueError(f"fetch_cap must be a fraction of the pool in (0, 1], got {self.fetch_cap}")


class _Codec:
    """A page of ``page`` tokens of one (row, KV head) as one record of bytes: what every tier stores
    and every transfer moves. A record is its fields' bytes end to end; the device pool keeps each
    field as its own tensor (what attention, or the packed-KV kernel, reads).

    16-bit (``bits=None``): fields ``k``, ``v``, as stored. ``bits`` 2/4/8 (memfit's KIVI layout):
    key codes ``kc`` per channel over the page's tokens, whose range is the page's summary (zero =
    kmin, scale = (kmax - kmin) / (2**bits - 1), rounded to float16: the summary the device holds
    anyway, so the record carries no key scales), and value codes ``vc`` per token over groups of
    ``vgroup`` channels, with each group's float16 scale ``vs`` and zero ``vz``."""

    def __init__(self, bits: int | None, page: int, dk: int, dv: int, dtype: torch.dtype, vgroup: int):
        self.bits, self.page, self.dk, self.dv, self.dtype = bits, page, dk, dv, dtype
        if bits is None:
            self.fields = {"k": ((page, dk), dtype), "v": ((page, dv), dtype)}
        else:
            packing.check_bits(bits)
            if dk * bits % 8 or dv * bits % 8:
                raise ValueError(f"head dims {dk}/{dv} cannot be packed at {bits} bits")
            g = dv // math.gcd(dv, vgroup)  # value groups a token (vgroup rounded to a divisor of the head dim)
            self.fields = {"kc": ((page, dk * bits // 8), torch.uint8), "vc": ((page, dv * bits // 8), torch.uint8),
                           "vs": ((page, g), torch.float16), "vz": ((page, g), torch.float16)}
        self.sizes = [math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in self.fields.values()]
        self.record_bytes = sum(self.sizes)
        # a pool slot: the record, the page it holds (int64) and, packed, its keys' float16 zero and scale
        self.slot_bytes = self.record_bytes + 8 + (4 * dk if bits else 0)

    def split(self, rec: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., R] uint8 records -> each field [..., *shape] (copies where a field is not aligned)."""
        lead = rec.shape[:-1]
        return {name: part.contiguous().view(dt).reshape(*lead, *shape)
                for (name, (shape, dt)), part in zip(self.fields.items(), rec.split(self.sizes, dim=-1))}

    def key_range(self, kmin: torch.Tensor, kmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero and scale of pages' key codes from their summaries [..., D], float16 (as the packed-KV
        kernel reads them; encoding rounds them the same way, so codes and range agree)."""
        lo = kmin.float().clamp(-65504, 65504).to(torch.float16)
        hi = kmax.float().clamp(-65504, 65504)
        return lo, ((hi - lo.float()) * (1.0 / ((1 << self.bits) - 1))).clamp_min(1e-6).to(torch.float16)

    def encode(self, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """[..., P, D] keys and values (the summaries [..., D]) -> [..., record_bytes] uint8."""
        lead = k.shape[:-2]
        if self.bits is None:
            parts = [k, v]
        else:
            qmax = (1 << self.bits) - 1
            zero, scale = (t.float().unsqueeze(-2) for t in self.key_range(kmin, kmax))
            kc = torch.round((k.float() - zero) / scale).clamp_(0, qmax).to(torch.uint8)
            g = self.fields["vs"][0][1]
            vc, vs, vz = quant._minmax_quantize(v.float().reshape(*lead, self.page, g, self.dv // g), self.bits, -1)
            parts = [packing.pack(kc, self.bits), packing.pack(vc.reshape(*lead, self.page, self.dv), self.bits), vs, vz]
        return torch.cat([t.contiguous().view(torch.uint8).reshape(*lead, -1) for t in parts], dim=-1)

    def decode(self, f: dict[str, torch.Tensor], kz: torch.Tensor | None = None,
               ks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fields (:meth:`split`, or the pool's) -> [..., P, D] keys and values; ``kz`` / ``ks``
        [..., D]: the pages' key range (:meth:`key_range`)."""
        if self.bits is None:
            return f["k"], f["v"]
        k = packing.unpack(f["kc"], self.bits).float() * ks.float().unsqueeze(-2) + kz.float().unsqueeze(-2)
        codes = packing.unpack(f["vc"], self.bits).float()
        g = f["vs"].shape[-1]
        v = codes.unflatten(-1, (g, self.dv // g)) * f["vs"].float().unsqueeze(-1) + f["vz"].float().unsqueeze(-1)
        return k.to(self.dtype), v.flatten(-2).to(self.dtype)


class _DiskPages:
    """One layer's pages on disk: a file of [B, H, N] page records, read record by record with
    ``pread`` (a missing or truncated file raises, it never maps to garbage)."""

    def __init__(self, path: Path, records: torch.Tensor):
        self.path = path
        self.count, self.page_bytes = records[..., 0].numel(), records.shape[-1]
        with open(path, "wb") as f:
            f.write(records.contiguous().numpy().tobytes())
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise TierReadError(f"disk tier file {self.path} cannot be opened: {e.strerror}") from None
        return self.fd

    def read(self, flat: list[int], out: torch.Tensor) -> None:
        """Records with flat indices ``flat`` (into [B * H * N]) into ``out`` [len, record bytes]."""
        fd = self._open()
        buf = out.numpy()
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
        return self.count * self.page_bytes


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
        self.codec = _Codec(cfg.bits, p, d, values.shape[-1], keys.dtype, cfg.vgroup)
        self.seen = t
        self.is_initialized = True
        paged_k = keys[:, :, : n * p].reshape(b, h, n, p, d)
        paged_v = values[:, :, : n * p].reshape(b, h, n, p, values.shape[-1])
        # each page's key summary, on the device: what selection reads every step (and the keys' range)
        kmin, kmax = paged_k.amin(3), paged_k.amax(3)
        records = self.codec.encode(paged_k, paged_v, kmin, kmax)  # [B, H, N, R], where the keys are
        self.kmin, self.kmax = kmin.to(device), kmax.to(device)
        # homes: pages [0, host_pages) on the host, the others on disk (index - host_pages)
        self.host_pages = min(host_pages, n)
        self.host_rec = self._host_copy(records[:, :, : self.host_pages])
        self.host_view = device_view(self.host_rec, device) if self.host_pages == n else None
        self.disk = None
        if self.host_pages < n:
            if disk is None:
                raise ValueError("pages past host_bytes need a disk directory")
            self.disk = _DiskPages(disk, records[:, :, self.host_pages :].cpu())
        del records
        self.readers = pool
        self.keys = keys[:, :, n * p :].to(device).clone()  # the window: context tail, then new tokens
        self.values = values[:, :, n * p :].to(device).clone()
        self._empty_pool(b)
        # decode steps, and pages copied to the device (counted on the device: no sync); shared with forks
        self.stats = {"steps": 0, "fetched": torch.zeros((), dtype=torch.long, device=device)}
        self.static = False
        self.probe: tuple[torch.Tensor, float] | None = None  # the last multi-token call's query rows
        self.pins: torch.Tensor | None = None  # [B, H, pin] pages it attended most
        self.owner = True  # forks share the tiers and leave them open

    def _empty_pool(self, rows: int) -> None:
        """A pool of ``self.slots`` pages per (row, KV head), none filled yet: each field of the page
        records as its own [B, H, S, ...] tensor, and for packed pages their keys' range."""
        h, s, d = self.kmin.shape[1], self.slots, self.kmin.shape[-1]
        self.pooled = {name: torch.zeros(rows, h, s, *shape, dtype=dt, device=self.device)
                       for name, (shape, dt) in self.codec.fields.items()}
        if self.codec.bits:
            self.pooled.update(kz=torch.zeros(rows, h, s, d, dtype=torch.float16, device=self.device),
                               ks=torch.zeros(rows, h, s, d, dtype=torch.float16, device=self.device))
        # slot -> page and page -> slot (-1: none), each with one spare column that the entries a
        # step does not change write to (fixed shapes: no host sync to count them)
        self._slot_table = torch.full((rows, h, self.slots + 1), -1, dtype=torch.long, device=self.device)
        self._where_table = torch.full((rows, h, self.n_pages + 1), -1, dtype=torch.long, device=self.device)
        self.slot_page = self._slot_table[..., : self.slots]
        self.where = self._where_table[..., : self.n_pages]

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
        ts = (self.kmin, self.kmax, self.keys, self.values, self._slot_table, self._where_table, *self.pooled.values())
        return sum(t.numel() * t.element_size() for t in ts)

    def host_bytes(self) -> int:
        return self.host_rec.numel()

    def disk_bytes(self) -> int:
        return self.disk.nbytes if self.disk is not None else 0

    # -- pages ------------------------------------------------------------------------------------
    def read_pages(self, stored: torch.Tensor) -> torch.Tensor:
        """Page records by flat index into the storage's [B * H * N] (long), from their homes (host
        memory, disk), on the device: [M, R]. Where the GPU reads every page itself (``host_view``),
        selection copies them with ``page_copy`` and the baseline copies whole layers instead."""
        n, r = self.n_pages, self.codec.record_bytes
        stored = stored.cpu()
        src, page = stored // n, stored % n
        on_host = page < self.host_pages
        out = torch.empty(stored.numel(), r, dtype=torch.uint8, pin_memory=self.pinned)
        if bool(on_host.any()):
            idx = on_host.nonzero().squeeze(1)
            out[idx] = self.host_rec.view(-1, r).index_select(0, src[idx] * self.host_pages + page[idx])
        if not bool(on_host.all()):
            idx = (~on_host).nonzero().squeeze(1)
            disk_flat = (src[idx] * (n - self.host_pages) + page[idx] - self.host_pages).tolist()
            got = torch.empty(len(disk_flat), r, dtype=torch.uint8)
            if self.readers is None:
                self.disk.read(disk_flat, got)
            else:
                list(self.readers.map(lambda c: self.disk.read(disk_flat[c[0]:c[1]], got[c[0]:c[1]]),
                                      _chunks(len(disk_flat), self.cfg.workers)))
            out[idx] = got
        return out.to(self.device, non_blocking=True)

    @property
    def pinned(self) -> bool:
        """Host pages and staging buffers are pinned where the device is a GPU (asynchronous copies)."""
        return self.device.type == "cuda"

    def _host_copy(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied once into contiguous host memory (flat page indexing reads it as [B*H*N, R]),
        pinned where the device is a GPU."""
        if not self.pinned:
            return torch.empty(x.shape, dtype=x.dtype).copy_(x)
        copy, self._pinned = pinned_copy(x, "offloaded KV pages (lower host_bytes to put pages on disk)")
        return copy

    def _stored_row(self, rows: torch.Tensor) -> torch.Tensor:
        """Decode (row, head) pairs, flat, -> the storage's (a fork of one row into several reads it)."""
        h, sb = self.kmin.shape[1], self.kmin.shape[0]
        return rows if sb == self.slot_page.shape[0] else rows % h

    def all_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every page, on the device: [B, H, N * P, D] keys and values."""
        b, h = self.slot_page.shape[:2]
        sb, n, p = self.kmin.shape[0], self.n_pages, self.cfg.page
        if n == 0:
            return self.keys[:, :, :0], self.values[:, :, :0]
        if self.host_pages == n:  # the baseline's copy: one contiguous transfer
            rec = self.host_rec.to(self.device, non_blocking=True)
        else:
            rec = self.read_pages(torch.arange(sb * h * n)).view(sb, h, n, -1)
        k, v = self.codec.decode(self.codec.split(rec), *(self.codec.key_range(self.kmin, self.kmax)
                                                          if self.codec.bits else ()))
        return (k.reshape(sb, h, n * p, -1).expand(b, -1, -1, -1), v.reshape(sb, h, n * p, -1).expand(b, -1, -1, -1))

    def bound(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H, N]: an upper bound of the score q·k (unscaled) of any key of each page, the max over
        the query rows and the query heads of each KV head's group. ``query`` [B, Hq, nq, D]."""
        b, hq, nq, d = query.shape
        h = self.kmin.shape[1]
        q = query.reshape(b, h, (hq // h) * nq, d).to(self.kmin.dtype)  # a group's heads are adjacent
        s = q.clamp(min=0) @ self.kmax.transpose(-1, -2) + q.clamp(max=0) @ self.kmin.transpose(-1, -2)  # rows broadcast
        return s.amax(2)

    def select(self, query: torch.Tensor) -> None:
        """Bring the pages ``query`` bounds highest into the pool (those already there stay). Fixed
        shapes throughout: on a GPU whose pages are all in host memory, no host sync."""
        b, h, s = self.slot_page.shape
        n = self.n_pages
        bound = self.bound(query)
        bound[..., : self.cfg.sink] = float("inf")  # the first tokens take much of every head's attention
        if self.pins is not None and self.pins.shape[0] == b:
            bound.scatter_(-1, self.pins, float("inf"))
        want = bound.topk(s, dim=-1).indices  # [B, H, S], highest bound first
        hit = self.where.gather(-1, want) >= 0
        chosen = torch.zeros(b, h, n, dtype=torch.bool, device=self.device).scatter_(-1, want, True)
        filled = self.slot_page >= 0
        keep = filled & chosen.gather(-1, self.slot_page.clamp(min=0))
        # misses first (highest bound first) / free slots first (empty, then the unchosen pages of lowest
        # bound): the j-th miss of a (row, head) goes into its j-th free slot (as many free slots as
        # misses: S distinct pages are wanted and S slots exist)
        miss_pages = want.gather(-1, hit.to(torch.int8).argsort(dim=-1, stable=True))
        held = bound.gather(-1, self.slot_page.clamp(min=0))
        order = torch.where(keep, float("inf"), torch.where(filled, held, float("-inf")))
        free_slots = order.argsort(dim=-1, stable=True)
        fetch = (~hit).sum(-1, keepdim=True)
        if self.cfg.fetch_cap < 1:  # pages fetched a step: the cap, or what fills an empty pool
            fetch = fetch.clamp(max=(~filled).sum(-1, keepdim=True).clamp(min=math.ceil(self.cfg.fetch_cap * s)))
        new = torch.arange(s, device=self.device) < fetch  # [B, H, S]
        rows = torch.arange(b * h, device=self.device).view(b, h, 1)
        self._fetch((self._stored_row(rows) * n + miss_pages).view(-1), (rows * s + free_slots).view(-1), new.view(-1))
        old = self.slot_page.gather(-1, free_slots)
        self._where_table.scatter_(-1, torch.where(new & (old >= 0), old, n), -1)
        self._where_table.scatter_(-1, torch.where(new, miss_pages, n), free_slots)
        self._slot_table.scatter_(-1, torch.where(new, free_slots, s), miss_pages)
        if self.codec.bits:  # the pool's key ranges, from the summaries of the pages now in it
            d = self.kmin.shape[-1]
            idx = self.slot_page.unsqueeze(-1).expand(-1, -1, -1, d)
            kz, ks = self.codec.key_range(self.kmin.expand(b, -1, -1, -1).gather(2, idx),
                                          self.kmax.expand(b, -1, -1, -1).gather(2, idx))
            self.pooled["kz"].copy_(kz)
            self.pooled["ks"].copy_(ks)
        self.stats["fetched"].add_(new.sum())

    def _fetch(self, stored: torch.Tensor, slot: torch.Tensor, take: torch.Tensor) -> None:
        """Records ``stored`` (storage indices) into pool slots ``slot`` (flat), where ``take``."""
        if self.host_view is not None:  # the GPU copies from pinned memory itself
            page_copy.copy_records(self.host_view.view(-1, self.codec.record_bytes), stored, slot, take,
                                   [self._pool_bytes(name) for name in self.codec.fields])
            return
        e = take.nonzero().squeeze(1)
        for name, part in self.codec.split(self.read_pages(stored[e])).items():
            self.pooled[name].view(-1, *part.shape[1:])[slot[e]] = part

    def _pool_bytes(self, name: str) -> torch.Tensor:
        """A pool field as [B * H * S, bytes a page] uint8."""
        t = self.pooled[name]
        return t.view(torch.uint8).view(math.prod(t.shape[:3]), -1)

    # -- attention --------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static:  # in place, lengths on the device: the step may be recorded as a CUDA graph
            if key_states.shape[-2] != 1:
                raise ValueError("a static tiered cache decodes one token a step (convert back with to_dynamic())")
            window_append.append(self.keys, self.values, key_states, value_states, self.wlen)  # wlen += 1
            return key_states, value_states
        self.compute_dtype = key_states.dtype
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.seen += key_states.shape[-2]
        return key_states, value_states  # not read: the attention call takes this layer's step

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: [B, Hq, 1, D] query -> [B, 1, Hq, D] output. ``mask`` [B, 1, 1, keys]
        (bool, True = visible) ends with the window's part, which is kept (rows left-padded after the
        context mask their padding); the pages (the context) are all visible."""
        if self.static:
            self.select(query)
            return self._attend_packed(query, scaling)
        self.stats["steps"] += 1
        if self.cfg.fetch == "all" or self.slots == 0:
            k, v = self.all_pages()
        else:
            self.select(query)
            if mask is None and self._kernel_reads_pool(query):
                return self._attend_packed(query, scaling)
            b, h, s = self.slot_page.shape
            f = self.pooled
            k, v = self.codec.decode(f, f.get("kz"), f.get("ks"))
            k, v = k.view(b, h, s * self.cfg.page, -1), v.view(b, h, s * self.cfg.page, -1)
        k = torch.cat([k, self.keys], dim=-2).to(query.dtype)
        v = torch.cat([v, self.values], dim=-2).to(query.dtype)
        if mask is not None:
            w = self.keys.shape[-2]
            tail = mask[..., -w:]
            mask = torch.cat([tail.new_ones(*tail.shape[:-1], k.shape[-2] - w), tail], dim=-1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def _kernel_reads_pool(self, query: torch.Tensor) -> bool:
        """Whether memfit's packed-KV decode kernel attends over the pool as it is (2/4/8-bit pages on a
        GPU, one query token, the page as its key group): nothing is dequantized to memory."""
        if not (query.is_cuda and self.codec.bits and query.shape[2] == 1):
            return False
        f = self.pooled
        b, h, s = self.slot_page.shape
        return kernel_supports(query[:, :, 0], f["kc"].view(b, h, s * self.cfg.page, -1), f["ks"], f["vs"][:, :, 0],
                               self.codec.bits)

    def _attend_packed(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The packed-KV kernel (its torch reference off a GPU) over the pool, then the window."""
        f = self.pooled
        b, h, s = self.slot_page.shape
        t = s * self.cfg.page
        wlen = self.wlen if self.static else self.keys.shape[2]  # a static window's length is on the device
        run = PackedRun(f["kc"].view(b, h, t, -1), f["ks"], f["kz"], f["vc"].view(b, h, t, -1),
                        f["vs"].view(b, h, t, -1), f["vz"].view(b, h, t, -1), self.keys, self.values,
                        t, wlen, self.codec.bits, self.cfg.page)
        out = decode_attention_runs(query[:, :, 0], [run], scaling, out_dtype=query.dtype)  # [B, Hq, D]
        return out.unsqueeze(1)

    # -- static decode (memfit.kv.static.GraphDecoder) ----------------------------------------------
    def to_static(self, max_new_tokens: int) -> None:
        """The window into a buffer with room for ``max_new_tokens`` more, its length on the device:
        a step is then device work only (selection, the page copies, the kernel), which a CUDA
        graph can record."""
        why = ("16-bit pages (the kernel reads packed ones)" if not self.codec.bits
               else "fetch='all'" if self.cfg.fetch == "all" or not self.slots
               else "pages on disk (the device reads only host memory)" if self.device.type == "cuda"
               and self.host_view is None else None)
        if why:
            raise ValueError(f"static decode of a tiered cache: this one has {why}")
        b, h, w, _ = self.keys.shape
        grow = (0, 0, 0, max_new_tokens)
        self.keys, self.values = F.pad(self.keys, grow), F.pad(self.values, grow)
        self.w = w
        self.wlen = torch.full((b, h), w, dtype=torch.int32, device=self.device)  # also the next token's slot
        self.static = True

    def to_dynamic(self) -> None:
        self.keys, self.values = self.keys[:, :, : self.w].clone(), self.values[:, :, : self.w].clone()
        self.static = False

    def before_step(self) -> None:
        if self.w >= self.keys.shape[2]:
            raise RuntimeError(f"static decode: the window's room ({self.keys.shape[2]} tokens) is used up "
                               "(to_static's max_new_tokens)")

    def after_step(self) -> None:
        self.w += 1
        self.seen += 1

    def fork(self, batch_size: int) -> "TieredLayer":
        """A layer that reads the same pages (shared, read only) for ``batch_size`` rows, with its own
        window and pool (empty: its first step fetches what it selects)."""
        if self.static:
            raise ValueError("fork a tiered cache before to_static(), not after")
        if self.keys.shape[0] != batch_size and self.kmin.shape[0] != 1:
            raise ValueError(f"cannot fork a tiered cache of batch size {self.kmin.shape[0]} into {batch_size} rows")
        new = copy.copy(self)
        new.keys = self.keys.expand(batch_size, -1, -1, -1).clone()
        new.values = self.values.expand(batch_size, -1, -1, -1).clone()
        new._empty_pool(batch_size)
        new.owner = False
        new.probe = new.pins = None
        return new

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Every token, in order (calls with several new tokens attend exactly over all of them)."""
        if self.static:
            raise ValueError("a static tiered cache attends one new token with no attention mask and no observer "
                             "(convert back with to_dynamic() for anything else)")
        k, v = self.all_pages()
        dt = getattr(self, "compute_dtype", self.dtype)  # attention reads the compute dtype
        k, v = torch.cat([k, self.keys], dim=-2).to(dt), torch.cat([v, self.values], dim=-2).to(dt)
        if self.probe is not None:
            self._pin_pages(k, *self.probe)
            self.probe = None
        return k, v, None

    def _pin_pages(self, keys: torch.Tensor, query: torch.Tensor, scaling: float) -> None:
        """``pins`` [B, H, pin]: the pages the last query rows of a multi-token call (a question,
        which attends over every page exactly) give the most attention, per row and KV head (the
        mass of the group's heads and rows); selection keeps them while the answer is decoded."""
        b, hq, nq, d = query.shape
        n, p = self.n_pages, self.cfg.page
        k = min(self.cfg.pin, self.slots)
        if n == 0 or k == 0:
            return
        h, nk = keys.shape[1], keys.shape[2]
        q = query.reshape(b, h, (hq // h) * nq, d).float()
        logits = (q @ keys.float().transpose(-1, -2)) * scaling  # [B, H, group rows, keys]
        # causal among the call's own rows: row i sees every page and the keys up to its own position
        pos = torch.arange(nk, device=keys.device)
        last = nk - nq + torch.arange(nq, device=keys.device)
        visible = (pos <= last.unsqueeze(-1)).repeat(hq // h, 1)  # [group rows, keys]
        prob = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        mass = prob[..., : n * p].reshape(b, h, -1, n, p).sum((2, 4))  # [B, H, N]
        self.pins = mass.topk(k, dim=-1).indices.detach()

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

    def observe_queries(self, query: torch.Tensor, scaling: float) -> None:
        self.layer.probe = (query[:, :, -self.layer.cfg.probe :], scaling)

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
        # per layer and (row, head): the window (+ one page of room), the summaries and page->slot map, then slots
        n = max(0, (t - cfg.window) // cfg.page)
        codec = _Codec(cfg.bits, cfg.page, d, values[0].shape[-1], keys[0].dtype, cfg.vgroup)
        record, slot_bytes = codec.record_bytes, codec.slot_bytes
        fixed = (t - n * cfg.page + cfg.page) * 2 * d * esize + n * (2 * d * esize + 8)
        dense = min(cfg.dense, len(keys))
        per_layer = (budget / (b * h) - dense * (fixed + n * slot_bytes)) / max(1, len(keys) - dense)
        # every layer dense: all pages or nothing (per_layer is then what the dense layers leave over)
        slots = int((per_layer - fixed) // slot_bytes) if dense < len(keys) else n if per_layer >= 0 else 0
        if cfg.fetch == "all":  # the baseline keeps no pool: each step copies a whole layer in
            slots, dense = 0, 0
        elif n and slots < 1:
            raise ValueError(f"a device budget of {budget / 2**20:.2f} MiB does not hold the window, the page "
                             f"summaries and one page ({fixed * len(keys) * b * h / 2**20:.2f} MiB and more), and "
                             f"every page of the first {dense} layers ({dense * n * slot_bytes * b * h / 2**20:.2f}"
                             " MiB): raise device, or lower window, page or dense")
        host_pages = n if cfg.host_bytes is None else int(cfg.host_bytes // (len(keys) * b * h * record))
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

    # -- static decode (memfit.kv.static.GraphDecoder) ------------------------------------------------
    def to_static(self, max_new_tokens: int) -> "TieredCache":
        """Fixed buffers for ``max_new_tokens`` decode steps, so that ``GraphDecoder`` can replay a
        step as a CUDA graph: pages at 2/4/8 bits, all in host memory on a GPU."""
        for layer in self.layers:
            layer.to_static(max_new_tokens)
        return self

    def to_dynamic(self) -> "TieredCache":
        for layer in self.layers:
            layer.to_dynamic()
        return self

    @property
    def static_layers(self) -> list[TieredLayer] | None:
        return list(self.layers) if self.layers and self.layers[0].static else None

    def before_static_step(self) -> None:
        """Host checks between static steps (room left in each layer's window)."""
        for layer in self.layers:
            layer.before_step()

    def after_static_step(self) -> None:
        """Host bookkeeping of a step that ran on the device (maybe as a replayed graph)."""
        for layer in self.layers:
            layer.after_step()
        self.layers[0].stats["steps"] += 1

    def positions(self) -> torch.Tensor:
        """[B] position of each row's next token."""
        layer = self.layers[0]
        return torch.full((layer.keys.shape[0],), layer.seen, dtype=torch.long, device=layer.device)

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
        return int(sum(layer.stats["fetched"] for layer in self.layers))

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
