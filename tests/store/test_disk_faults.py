"""A disk tier that fills up, turns read-only or holds leftovers of a killed writer, alone and as a
private cache in front of a shared Redis tier: nothing half-written stays, a write no tier took is
not acknowledged (StoreUnavailable), and a copy another process deleted is never served.

The disks are real: small tmpfs mounts (root only; skipped elsewhere)."""

import os
import subprocess
import time

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from memfit.api import LM
from memfit.store.faults import fill, small_fs
from memfit.store import StoreUnavailable, open_store
from memfit.store.disk import DiskTier

TEXT = "The vault code is 4821. The lighthouse is red. " * 20
POLICY = "kivi(bits=4,group=16,residual=16)"


@pytest.fixture
def lm():
    return LM(tiny_llama(torch.float64), byte_tokenizer(), name="tiny")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk"
    if not small_fs(path, "4m"):
        pytest.skip("mounting a tmpfs needs root")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def test_a_full_disk_refuses_the_write_leaves_nothing_half_written_and_keeps_serving(lm, disk):
    store = open_store(f"file://{disk}")
    kept = lm.prefill(TEXT, POLICY, store=store)
    fill(disk)
    with pytest.raises(StoreUnavailable, match="could not be stored.*file: .*No space left on device"):
        lm.prefill(TEXT + " more", POLICY, store=store)
    assert list(disk.glob(".tmp-*")) == [] and len(store.keys()) == 1  # no partial file, no new entry
    assert store.stats()["write_errors"] == 1
    again = lm.prefill(TEXT, POLICY, store=store)  # what was stored is still served
    assert again.meta["store"] == "hit" and lm.ask(again, "Code?", max_new_tokens=6) == lm.ask(kept, "Code?", max_new_tokens=6)
    (disk / ".ballast").unlink()
    assert lm.prefill(TEXT + " more", POLICY, store=store).meta["store"] != "hit"  # space again: stored
    assert len(store.keys()) == 2


def test_a_read_only_disk_serves_reads_and_refuses_deletes(lm, disk):
    store = open_store(f"file://{disk}")
    ctx = lm.prefill(TEXT, POLICY, store=store)
    _remount(disk, "ro")
    try:
        assert store.get_entry(ctx.key) is not None  # read (its LRU time cannot be touched: no error)
        with pytest.raises(StoreUnavailable, match="could not be deleted"):
            store.delete(ctx.key)
        with pytest.raises(StoreUnavailable):
            lm.prefill(TEXT + " more", POLICY, store=store)
    finally:
        _remount(disk, "rw")
    assert store.contains(ctx.key) and store.delete(ctx.key) and not store.contains(ctx.key)


def test_a_private_cache_in_front_of_redis_tolerates_its_disk_and_never_serves_a_deleted_copy(lm, disk, tmp_path,
                                                                                               redis_server):
    a = open_store([f"file://{disk}", redis_server.url])  # replica A: its own disk, then the shared Redis
    b = open_store([f"file://{tmp_path / 'b'}", redis_server.url])  # replica B
    assert a.authority == 1 and b.authority == 1
    ctx = lm.prefill(TEXT, POLICY, store=a)
    assert a.tiers[0].contains(ctx.key) and a.tiers[1].contains(ctx.key)  # a copy in both
    assert b.get_entry(ctx.key) is not None and b.tiers[0].contains(ctx.key)  # read from Redis, then cached
    assert b.delete(ctx.key)  # B deletes it: A's disk copy must not be served
    assert a.get_entry(ctx.key) is None and not a.tiers[0].contains(ctx.key) and a.stats()["stale"] == 1
    assert not a.contains(ctx.key)

    fill(disk)  # A's disk full: the context is stored (Redis holds it), the copy skipped
    again = lm.prefill(TEXT, POLICY, store=a)
    assert again.meta["store"] == "miss" and redis_server_has(a, again.key) and not a.tiers[0].contains(again.key)
    assert list(disk.glob(".tmp-*")) == [] and a.stats()["write_errors"] >= 1
    (disk / ".ballast").unlink()
    assert a.get_entry(again.key) is not None and a.tiers[0].contains(again.key)  # cached on the next read
    _remount(disk, "ro")
    try:  # read-only: B's delete lands; A's stale copy cannot be removed but is not served
        assert b.delete(again.key)
        assert a.get_entry(again.key) is None and a.tiers[0].contains(again.key)
        assert a.delete(again.key) is False  # nothing left that could be served: not an error
    finally:
        _remount(disk, "rw")


def redis_server_has(store, key):
    return store.tiers[store.authority].contains(key)


def test_restart_recovery_removes_a_killed_writers_leftovers_and_corrupt_entries(lm, tmp_path):
    store = open_store(f"file://{tmp_path}")
    good = lm.prefill(TEXT, POLICY, store=store)
    bad = lm.prefill(TEXT + " other", POLICY, store=store)
    path = tmp_path / f"{bad.key}.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    old, new = tmp_path / ".tmp-old.part", tmp_path / ".tmp-new.part"  # a killed writer's, a live writer's
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    tier = DiskTier(tmp_path)
    assert tier.recover(repair=False) == {"entries": 2, "corrupt": 1, "partial": 1}  # counts, changes nothing
    assert old.exists() and path.exists()
    assert tier.recover() == {"entries": 1, "corrupt": 1, "partial": 1}
    assert not old.exists() and new.exists() and not path.exists() and tier.keys() == [good.key]


def test_the_server_answers_503_for_a_context_no_tier_can_take_and_keeps_chatting(tiny_model_dir, disk):
    """A full disk, the only tier: creating a context is not acknowledged (a documented 503, the
    client may retry), plain chats (whose long prompts are stored only to speed up the next one)
    are still answered, and a context made once there is space is served."""
    import memfit
    from memfit.serve.app import ServeConfig, create_app

    lm = memfit.load_model(str(tiny_model_dir))
    app = create_app(lm, open_store(f"file://{disk}"), ServeConfig(policy="kivi(bits=4)", max_tokens=8))
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        fill(disk)
        r = client.post("/v1/contexts", json={"text": TEXT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert r.headers["retry-after"] == "5"
        assert "could not be stored" in r.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TEXT}],
                                                         "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        assert list(disk.glob(".tmp-*")) == []
        (disk / ".ballast").unlink()
        made = client.post("/v1/contexts", json={"text": TEXT})
        assert made.status_code == 200
        ask = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Code?"}],
                                                        "context_id": made.json()["id"], "max_tokens": 4})
        assert ask.status_code == 200, ask.text


def test_the_cli_says_when_a_context_could_not_be_stored_and_ask_answers_anyway(tiny_model_dir, disk, tmp_path):
    from typer.testing import CliRunner

    from memfit.cli import app

    runner = CliRunner()
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(TEXT)
    fill(disk)
    args = ["-c", str(ctx), "-p", "kivi(bits=4)", "-s", f"file://{disk}", "-m", str(tiny_model_dir)]
    r = runner.invoke(app, ["store", "put", *args])
    assert r.exit_code == 2 and "could not be stored" in r.output and "No space left" in r.output, r.output
    r = runner.invoke(app, ["ask", "-q", "Code?", "--max-new-tokens", "4", *args])
    assert r.exit_code == 0 and "answering without storing" in r.output, r.output
    assert list(disk.glob("*.safetensors")) == [] and list(disk.glob(".tmp-*")) == []
