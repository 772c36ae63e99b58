import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

import memfit
from memfit.api import LM
from memfit.kv.policy import parse_policy
from memfit.store import CorruptEntry, Entry, EntryMismatch, open_store, parse_bytes
from memfit.store.disk import DiskTier

TEXT = "The vault code is 4821. The lighthouse is red. " * 20
POLICIES = ["none", "kivi(bits=4,group=16,residual=16)", "snapkv(keep=0.5,window=8)+kivi(bits=2,group=16,residual=16)",
            "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16,outliers=0.02)",
            "kivi(bits=4,group=16,residual=16,pre_rope=true)",
            "knorm(keep=0.5,heads=global)+gear(bits=2,group=16,residual=16,rank=2)", "qjl(sketch=32,group=16,residual=16)",
            "knorm(keep=0.5,heads=adaptive)+hadamard(bits=2,group=16,residual=16)",
            "knorm(keep=0.5,heads=global)+hadamard(bits=2,group=16,residual=16,meta_bits=8)",
            "knorm(keep=0.5,heads=global)+million(bits=2,sub=4,group=16,residual=16,outliers=1)",
            "zipcache(bits=2,group=16,residual=16)", "lowrank(rank=16,layers=2)", "knorm(keep=0.5,heads=adaptive)+zipcache(bits=2,group=16,residual=16)",
            "xquant(bits=4,group=16,residual=16)", "knorm(keep=0.5,heads=adaptive)+klt(bits=2,group=16,residual=16)",
            "knorm(keep=0.5)+oscar(bits=2,group=16,residual=16)",
            "knorm(keep=0.3,keys=0.6,heads=adaptive)",  # a key-only tier, 16-bit
            "knorm(keep=0.3,keys=0.6,heads=global)+klt(bits=2,group=16,residual=16)"]  # and coded by klt


@pytest.fixture
def lm():
    return LM(tiny_llama(torch.float64), byte_tokenizer(), name="tiny")


def _tier_urls(kind, tmp_path, redis_server=None):
    return {"mem": ["mem://"], "file": [f"file://{tmp_path / 'ctx'}"], "redis": [redis_server.url if redis_server else ""]}[kind]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["mem", "file", "redis"])
def test_round_trip_restores_the_same_answers(lm, tmp_path, policy, kind, request, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))  # oscar's calibration of the tiny model goes here
    monkeypatch.setattr(memfit.api, "OSCAR_TOKENS", 256)  # on the essay's first 256 tokens: enough for a tiny model
    server = request.getfixturevalue("redis_server") if kind == "redis" else None
    store = open_store(_tier_urls(kind, tmp_path, server))
    fresh = lm.prefill(TEXT, policy, store=store)
    restored = lm.prefill(TEXT, policy, store=store)
    assert fresh.meta["store"] == "miss" and restored.meta["store"] == "hit"
    assert restored.nbytes == fresh.nbytes and restored.num_tokens == fresh.num_tokens
    qs = ["Code?", "Which colour is the lighthouse?"]
    assert lm.ask(restored, qs, max_new_tokens=8) == lm.ask(fresh, qs, max_new_tokens=8)
    assert store.stats()["hits"] == 1 and store.contains(fresh.key)


@pytest.mark.parametrize("policy", POLICIES[:2])
def test_prefix_reuse_reads_only_the_rest(lm, tmp_path, policy):
    store = open_store(f"file://{tmp_path}")
    lm.prefill(TEXT, policy, store=store)
    longer = TEXT + " A second part follows the first one. " * 8
    ctx = lm.prefill(longer, policy, store=store)
    assert ctx.meta["store"] == "prefix" and ctx.meta["reused"] % 256 == 0 and ctx.meta["reused"] >= 512
    fresh = lm.prefill(longer, policy)
    assert ctx.nbytes == fresh.nbytes
    assert lm.ask(ctx, "Code?", max_new_tokens=8) == lm.ask(fresh, "Code?", max_new_tokens=8)
    # an evicted cache depends on its whole context: no prefix reuse, a full (correct) prefill
    lm.prefill(TEXT, POLICIES[2], store=store)
    assert lm.prefill(longer, POLICIES[2], store=store).meta["store"] == "miss"


def test_lru_demotes_to_the_next_tier_and_promotes_on_read(lm, tmp_path):
    a = lm.prefill(TEXT, "kivi(bits=4,group=16,residual=16)")
    cap = int(a.nbytes * 1.5)
    store = open_store([f"mem://?max_bytes={cap}", f"file://{tmp_path}"])
    keys = [lm.prefill(TEXT + f" Note {i}.", "kivi(bits=4,group=16,residual=16)", store=store).key for i in range(3)]
    mem, disk = store.tiers
    assert mem.keys() == [keys[2]] and set(disk.keys()) == set(keys[:2])  # nothing lost
    assert store.get(keys[0], lm) is not None
    assert keys[0] in mem.keys() and store.stats()["tiers"][1]["hits"] == 1


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_flips_and_truncation_are_detected_dropped_and_recomputed(lm, tmp_path):
    store = open_store(f"file://{tmp_path}")
    ctx = lm.prefill(TEXT, POLICIES[1], store=store)
    path = tmp_path / f"{ctx.key}.safetensors"
    size = path.stat().st_size
    for damage in (lambda: _flip(path, size - 100), lambda: _flip(path, 200),
                   lambda: path.write_bytes(path.read_bytes()[: size // 2])):
        damage()
        with pytest.warns(RuntimeWarning, match="corrupt"):
            again = lm.prefill(TEXT, POLICIES[1], store=store)
        assert again.meta["store"] == "miss"  # recomputed, never used
        assert Entry.from_bytes(path.read_bytes()).key == ctx.key  # and stored anew
    assert store.stats()["corrupt"] == 3
    with pytest.raises(CorruptEntry):
        Entry.from_bytes(b"not an entry at all")


def test_redis_bit_flip_detected(lm, redis_server):
    import redis

    store = open_store(redis_server.url)
    ctx = lm.prefill(TEXT, POLICIES[0], store=store)
    r = redis.Redis.from_url(redis_server.url)
    blob = bytearray(r.get(f"memfit:ctx:{ctx.key}"))
    blob[-10] ^= 1
    r.set(f"memfit:ctx:{ctx.key}", bytes(blob))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert lm.prefill(TEXT, POLICIES[0], store=store).meta["store"] == "miss"


def test_entry_for_another_model_or_policy_is_refused(lm, tmp_path):
    ctx = lm.prefill(TEXT, POLICIES[1])
    path = ctx.save(tmp_path / "c.safetensors")
    assert memfit.load_context(path, lm).nbytes == ctx.nbytes
    other = LM(tiny_llama(torch.float64, seed=5), byte_tokenizer())
    with pytest.raises(EntryMismatch, match="fingerprint"):
        memfit.load_context(path, other)
    entry, _ = ctx.to_entry()
    with pytest.raises(EntryMismatch, match="policy"):
        lm.context_from_entry(entry, policy=parse_policy("none"))
    entry.manifest["format"] = 99
    with pytest.raises(EntryMismatch, match="format"):
        lm.context_from_entry(entry)
    with pytest.raises(FileNotFoundError):
        memfit.load_context(tmp_path / "missing", lm)


def test_keys_cannot_escape_the_folder(tmp_path):
    tier = DiskTier(tmp_path)
    for bad in ["../../etc/passwd", "a" * 31, "A" * 32, "x/y"]:
        with pytest.raises(ValueError, match="invalid context key"):
            tier.get(bad)


def test_redis_down_mid_run_the_store_goes_on(lm, tmp_path, redis_server):
    store = open_store([f"file://{tmp_path}", redis_server.url])
    first = lm.prefill(TEXT, POLICIES[1], store=store)
    redis_server.stop()
    with pytest.warns(RuntimeWarning, match="unavailable") as w:
        again = lm.prefill(TEXT, POLICIES[1], store=store)  # served from disk
        lm.prefill(TEXT + " new", POLICIES[1], store=store)  # stored on disk
        store.tiers[1].put(first.to_entry()[0])
        store.tiers[1].get(first.key)
    assert again.meta["store"] == "hit"
    assert len([x for x in w if "unavailable" in str(x.message)]) == 1  # warned once
    assert store.stats()["tiers"][1]["entries"] == 0


def test_a_redis_server_that_lost_its_data_is_told_from_one_that_kept_it(lm, redis_server):
    """Each tier remembers the data's epoch: after a restart that kept the data a miss is a miss;
    after one that lost it (here FLUSHALL) every tier that looks notices, and the store reports when."""
    import redis

    a, b = open_store([redis_server.url]), open_store([redis_server.url])  # two replicas
    ctx = lm.prefill(TEXT, POLICIES[1], store=a)
    assert b.get_entry(ctx.key) is not None and b.get_entry("f" * 32) is None  # a plain miss
    assert a.lost_since() is None and b.lost_since() is None
    redis.Redis(port=redis_server.port).flushall()
    assert a.get_entry(ctx.key) is None and b.get_entry(ctx.key) is None
    assert a.lost_since() is not None and b.lost_since() is not None
    late = open_store([redis_server.url])  # a replica restarted after the loss learns of it too
    assert late.get_entry(ctx.key) is None and late.lost_since() == a.lost_since()


def test_redis_down_at_start_warns_and_misses(lm, tmp_path):
    store = open_store([f"file://{tmp_path}", "redis://127.0.0.1:1/0"])
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert lm.prefill(TEXT, POLICIES[0], store=store).meta["store"] == "miss"


WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import byte_tokenizer, tiny_llama
    from memfit.api import LM
    from memfit.store import open_store
    lm = LM(tiny_llama(torch.float64), byte_tokenizer())
    store = open_store({url!r})
    ctx = lm.prefill("The vault code is 4821. " * 200, "none")
    entry, _ = ctx.to_entry()
    print("ready", flush=True)
    i = 0
    while True:
        entry.manifest["n"] = i
        store.put_entry(entry)
        print("stored", i, flush=True)
        i += 1
""")


def _spawn_writer(url):
    tests = os.path.dirname(os.path.dirname(__file__))
    return subprocess.Popen([sys.executable, "-c", WRITER.format(tests=tests, url=url)], stdout=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_kill_9_mid_write_leaves_a_consistent_store(tmp_path, kind, request):
    url = f"file://{tmp_path}" if kind == "file" else request.getfixturevalue("redis_server").url
    acknowledged = -1
    for delay in (0.05, 0.13, 0.29):
        with _spawn_writer(url) as proc:  # closes its stdout pipe
            assert proc.stdout.readline().startswith("ready")
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            lines = [ln for ln in proc.stdout.read().splitlines() if ln.startswith("stored")]
        if lines:
            acknowledged = max(acknowledged, 0)
    store = open_store(url)
    keys = store.keys()
    assert len(keys) == 1
    entry = store.get_entry(keys[0])  # parses and passes its checksum: never a partial entry
    assert entry is not None and store.stats()["corrupt"] == 0
    assert acknowledged == 0  # an acknowledged write is there


def _write_same_key(url, tag, n):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from conftest import byte_tokenizer, tiny_llama

    lm = LM(tiny_llama(torch.float64), byte_tokenizer())
    store = open_store(url)
    entry, _ = lm.prefill(TEXT, "none").to_entry()
    for i in range(n):
        entry.manifest["writer"] = f"{tag}-{i}"
        store.put_entry(entry)


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_two_processes_writing_the_same_key(tmp_path, kind, request):
    url = f"file://{tmp_path}" if kind == "file" else request.getfixturevalue("redis_server").url
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_same_key, args=(url, tag, 15)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = open_store(url)
    (key,) = store.keys()
    entry = store.get_entry(key)
    assert entry.manifest["writer"] in {"a-14", "b-14"} and store.stats()["corrupt"] == 0


def test_store_urls_and_sizes(tmp_path):
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("s3://bucket")
    with pytest.raises(ValueError, match="unknown store option"):
        open_store("mem://?maxbytes=1")
    s = open_store(["mem://?max_bytes=1KiB", f"file://{tmp_path}?max_bytes=1MiB"])
    assert [t.max_bytes for t in s.tiers] == [1024, 2**20]
