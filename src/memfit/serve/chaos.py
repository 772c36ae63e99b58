"""A soak and chaos run of memfit serve: replicas sharing a real redis-server, each with its own disk
tier, driven by concurrent clients while faults are injected; every operation goes to a history
that :mod:`memfit.serve.history` checks (``memfit bench chaos``).

Clients create contexts (a few fixed texts: a context id is a hash of the text and policy, so the
same text made again is the same context), ask questions on them and check each answer against what
the in-process library answers, delete some, send plain chats, and send hostile requests (unknown
model, no max_tokens, broken JSON, a 2 MB body). Faults, in turn: kill -9 of a replica (restarted),
Redis shut down and restarted with its data, Redis restarted with its data gone, a client that
drops a streamed answer, and on one replica's disk tier (its own small tmpfs mount): the
filesystem full, remounted read-only, reads slowed (an injected delay). Each fault lasts a while
(``hold``) and is then undone; the history records its window, so that the latency of plain chats
is reported before, during and after faults.

Each replica's store is ``file://tierK`` (private, a cache) in front of the shared Redis: a
context is acknowledged once Redis holds it; a copy on a replica's disk is served only while Redis
still holds the key (see :class:`memfit.store.ContextStore`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from memfit.serve.history import check, read, record, summary
from memfit.store.disk import READ_DELAY_ENV, DiskTier
from memfit.store.faults import can_mount, fill, small_fs

TEXTS = [f"Ledger {i}. " + " ".join(f"Crate {j} of ledger {i} holds {(i * 7 + j * 3) % 11} lamps." for j in range(12))
         for i in range(6)]
QUESTIONS = ["How many lamps does crate 3 hold?", "Which ledger is this?", "What does crate 7 hold?"]
GEN = {"max_tokens": 8, "temperature": 0}
FAULTS = ("kill_replica", "redis_restart", "redis_wipe", "dropped_stream", "disk_full", "disk_read_only",
          "disk_slow")
MOUNTED = ("disk_full", "disk_read_only")  # need a filesystem of their own (root may mount a tmpfs)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {seconds:.0f} s")


class Redis:
    """A real redis-server on a free loopback port, persisting to its own folder (an RDB on shutdown)."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, keep_data: bool = False) -> None:
        import redis

        try:
            redis.Redis(port=self.port, socket_connect_timeout=1).shutdown(save=keep_data, nosave=not keep_data)
        except redis.ConnectionError:
            pass  # shutdown closes the connection it was sent on
        if self.proc is not None:
            self.proc.wait(20)
        if not keep_data:
            (self.folder / "dump.rdb").unlink(missing_ok=True)


@dataclass
class Replica:
    model: str
    args: list[str]
    log: Path
    env: dict = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "memfit", "serve", "--model", self.model, "--port",
                                          str(self.port), "--served-model-name", "m", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        _wait(self.url + "/health", self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)

    def sample(self) -> dict:
        """Resident memory (bytes) and open file descriptors of the server process (Linux /proc)."""
        pid = self.proc.pid
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def expected_answers(model: str, policy: str) -> dict[tuple[int, int], str]:
    """What the in-process library answers for every (text, question): what the service must answer."""
    from memfit.api import load_model

    lm = load_model(model)
    out = {}
    for i, text in enumerate(TEXTS):
        ctx = lm.prefill(text, policy=policy)
        for j, q in enumerate(QUESTIONS):
            out[i, j] = lm.ask(ctx, q, max_new_tokens=GEN["max_tokens"])
    return out


def _code(r: httpx.Response) -> str | None:
    """The error code of a non-200 answer (OpenAI's error JSON), if any."""
    if not r.headers.get("content-type", "").startswith("application/json"):
        return None
    return (r.json().get("error") or {}).get("code")


def _ask(http: httpx.Client, url: str, context_id: str, question: str) -> httpx.Response:
    """One question on a stored context."""
    return http.post(url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": question}], "context_id": context_id, **GEN})


def _outcome(r: httpx.Response, answer: bool = False) -> dict:
    """The history fields of a response: its status, and its error code or (``answer``) the reply."""
    if r.status_code != 200:
        return {"status": r.status_code, "code": _code(r)}
    return {"status": 200, **({"answer": r.json()["choices"][0]["message"]["content"]} if answer else {})}


def _sample(reps: list["Replica"], history, lock: threading.Lock) -> None:
    """Memory and open files of every running replica, into the history."""
    with lock:
        for i, rep in enumerate(reps):
            if rep.proc.poll() is None:
                record(history, "sample", time.time(), status=None, replica=i, **rep.sample())


def _client(n: int, urls: list[str], ids: dict[int, str], expected: dict, history, lock: threading.Lock,
            stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed + n)
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            url = rnd.choice(urls)
            kind = rnd.choices(["create", "ask", "delete", "chat", "hostile"], [3, 8, 1, 2, 1])[0]
            i = rnd.randrange(len(TEXTS))
            t0 = time.time()
            fields: dict = {"replica": urls.index(url), "client": n}
            try:
                if kind == "create":
                    r = http.post(url + "/v1/contexts", json={"text": TEXTS[i]})
                    if r.status_code == 200:
                        ids[i] = r.json()["id"]
                    fields.update(context_id=ids.get(i), text=i)
                elif kind in ("ask", "delete"):
                    if i not in ids:
                        continue
                    fields["context_id"] = ids[i]
                    if kind == "delete":
                        r = http.delete(f"{url}/v1/contexts/{ids[i]}")
                    else:
                        j = rnd.randrange(len(QUESTIONS))
                        fields["expected"] = expected[i, j]
                        r = _ask(http, url, ids[i], QUESTIONS[j])
                elif kind == "chat":
                    r = http.post(url + "/v1/chat/completions", json={
                        "model": "m", "messages": [{"role": "user", "content": f"Say hello {n}"}], **GEN})
                else:  # hostile: each must get a clear 4xx, never a 5xx or a hang
                    bad = rnd.choice([{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": None,
                                       "min_tokens": 4, "max_completion_tokens": 10**9},
                                      b'{"messages": [', {"messages": [{"role": "user", "content": "x" * 2_100_000}]}])
                    r = (http.post(url + "/v1/chat/completions", content=bad, headers={"content-type": "application/json"})
                         if isinstance(bad, bytes) else http.post(url + "/v1/chat/completions", json=bad))
                fields.update(_outcome(r, answer=kind == "ask"))
            except httpx.HTTPError as e:  # a killed replica: no answer
                fields.update(status=None, error=type(e).__name__)
            with lock:
                record(history, kind, t0, **fields)


def run_chaos(model: str, out_dir: Path, seconds: float = 60.0, replicas: int = 2, clients: int = 4,
              fault_every: float = 10.0, faults: tuple[str, ...] = FAULTS, policy: str = "kivi(bits=4)",
              seed: int = 0, min_faults: int = 0, hold: float | None = None) -> dict:
    """Run replicas, Redis and clients for ``seconds`` while injecting one of ``faults`` every
    ``fault_every`` seconds (and on until ``min_faults`` were injected), each held for ``hold``
    seconds (default: half the interval) and then undone; then a quiet spell, ask every context
    once more, check the history, and return the summary (``violations`` empty: the run passed).
    Writes ``history.jsonl``, ``chaos.json`` and the replicas' logs to ``out_dir``."""
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    hold = fault_every / 2 if hold is None else hold
    out_dir.mkdir(parents=True, exist_ok=True)
    tiers = [out_dir / f"tier{k}" for k in range(replicas)]
    needs_mount = sorted(set(faults) & set(MOUNTED))
    if needs_mount and not can_mount(out_dir / "mount-check"):
        raise RuntimeError(f"faults {needs_mount} need a tmpfs mount per disk tier: run as root (or leave them out)")
    mounted = [t for t in tiers if needs_mount and small_fs(t)]
    hist_path = out_dir / "history.jsonl"
    hist_path.unlink(missing_ok=True)
    expected = expected_answers(model, policy)
    redis = Redis(out_dir / "redis")
    redis.start()
    delay_files = [out_dir / f"slow{k}" for k in range(replicas)]
    # each replica's disk tier is a private cache in front of the shared Redis: a context is
    # acknowledged once Redis holds it, and a disk copy is served only while Redis still holds it
    reps = [Replica(model, ["--policy", policy, "--store", f"file://{tiers[k]}", "--store", redis.url,
                            "--max-queue", "64", "--request-timeout", "60"], out_dir / f"replica{k}.log",
                    env={READ_DELAY_ENV: str(delay_files[k])})
            for k in range(replicas)]
    lock, stop = threading.Lock(), threading.Event()
    ids: dict[int, str] = {}
    rnd = random.Random(seed)
    started = time.time()
    with open(hist_path, "a", encoding="utf-8") as history:
        try:
            for rep in reps:
                rep.start()
            urls = [rep.url for rep in reps]
            started = time.time()  # the run's clock starts once every replica serves
            threads = [threading.Thread(target=_client, args=(n, urls, ids, expected, history, lock, stop, seed),
                                        daemon=True) for n in range(clients)]
            for t in threads:
                t.start()
            k = 0
            while k < min_faults or time.time() - started < seconds:  # (a slow machine runs longer)
                time.sleep(max(0.0, fault_every - hold))
                if k >= min_faults and time.time() - started >= seconds:
                    break
                kind = faults[k % len(faults)]
                k += 1
                target = rnd.randrange(len(reps))
                _sample(reps, history, lock)
                t0 = time.time()
                _inject(kind, reps[target], redis, tiers[target], delay_files[target], hold)
                with lock:
                    record(history, "fault", t0, status=None, fault=kind, replica=target)
            time.sleep(min(fault_every, 30))  # a quiet spell: latency after the faults
            stop.set()
            for t in threads:
                t.join(180)
            _audit(urls, ids, expected, history, lock)
            _sample(reps, history, lock)
        finally:
            stop.set()
            for rep in reps:
                rep.kill()
            redis.stop(keep_data=False)
            with lock:  # what the disks hold once every writer is gone: no entry may be corrupt
                for i, tier in enumerate(tiers):
                    record(history, "scan", time.time(), status=None, replica=i, **_scan(tier))
            for t in mounted:
                subprocess.run(["umount", "-l", str(t)], check=False)
    ops = read(hist_path)
    violations = check(ops)
    result = summary(ops, violations)
    result.update(seconds=seconds, replicas=replicas, clients=clients, faults=sum(op["op"] == "fault" for op in ops),
                  fault_kinds=list(faults), fault_every=fault_every, hold=hold, wall_s=time.time() - started)
    (out_dir / "chaos.json").write_text(json.dumps(result, indent=1))
    return result


def _inject(kind: str, rep: Replica, redis: Redis, tier: Path, delay_file: Path, hold: float) -> None:
    """Inject one fault, hold it for ``hold`` seconds, undo it (a kill and a Redis restart are undone
    by starting again)."""
    if kind == "kill_replica":
        rep.kill()
        time.sleep(min(hold, 2))
        rep.start()
    elif kind in ("redis_restart", "redis_wipe"):
        redis.stop(keep_data=kind == "redis_restart")
        time.sleep(min(hold, 2))
        redis.start()
    elif kind == "dropped_stream":  # a client that reads one streamed piece and goes away
        try:
            with httpx.stream("POST", rep.url + "/v1/chat/completions", timeout=60, json={
                    "model": "m", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 64,
                    "stream": True}) as r:
                next(r.iter_lines(), None)
        except httpx.HTTPError:
            pass
    elif kind == "disk_full":
        fill(tier)
        time.sleep(hold)
        (tier / ".ballast").unlink(missing_ok=True)
    elif kind == "disk_read_only":
        subprocess.run(["mount", "-o", "remount,ro", str(tier)], check=True)
        time.sleep(hold)
        subprocess.run(["mount", "-o", "remount,rw", str(tier)], check=True)
    else:  # disk_slow
        delay_file.write_text("0.5")
        time.sleep(hold)
        delay_file.unlink(missing_ok=True)


def _audit(urls: list[str], ids: dict[int, str], expected: dict, history, lock: threading.Lock) -> None:
    """Every context ever made, asked once more on every replica (retried, as a client would, while
    a tier is still coming back: 503)."""
    with httpx.Client(timeout=120) as http:
        for i, cid in sorted(ids.items()):
            for r_i, url in enumerate(urls):
                for _ in range(20):
                    t0 = time.time()
                    try:
                        fields = _outcome(_ask(http, url, cid, QUESTIONS[0]), answer=True)
                    except httpx.HTTPError as e:
                        fields = {"status": None, "error": type(e).__name__}
                    with lock:
                        record(history, "ask", t0, context_id=cid, expected=expected[i, 0], replica=r_i, audit=True,
                               **fields)
                    if fields["status"] != 503:
                        break
                    time.sleep(1)


def _scan(tier: Path) -> dict:
    """Entries and leftovers in a disk tier, changing nothing: ``corrupt`` entries fail their
    checksum; ``partial`` are temporary files (only a writer killed mid-write may leave one)."""
    return DiskTier(tier).recover(partial_age=0, repair=False) if tier.is_dir() else {}
