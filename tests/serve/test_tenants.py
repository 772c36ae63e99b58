"""Tenants (memfit serve --api-keys): two replicas sharing one real redis-server; every attempt to reach
another tenant's context (its id, a guessed id, a deleted id, from either replica) gets the 404 of an
id that was never stored, and quotas hold across replicas."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from test_server import CONTEXT, Served

from memfit.serve.tenants import load_api_keys

KEYS = {"sk-alpha-0001": {"tenant": "alpha"}, "sk-beta-00001": {"tenant": "beta", "quota": 60000},
        "sk-admin-0001": {"admin": True}}
OTHER = "The lighthouse keeper of Orn is Bo Lind. The boat sails at ten. " * 8


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _ask(url: str, key: str, cid: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=_h(key), timeout=60,
                      json={"messages": [{"role": "user", "content": "Who is the harbour master?"}], "max_tokens": 4,
                            "temperature": 0, "context_id": cid})


def _not_found(r: httpx.Response, cid: str) -> bool:
    """The answer for an id never stored: same status, code and message, nothing else."""
    return r.status_code == 404 and r.json()["error"] == {"message": f"no stored context {cid}", "type":
                                                         "invalid_request_error", "param": "context_id",
                                                         "code": "context_not_found"}


def test_tenants_never_reach_each_others_contexts(model_dir, redis_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    a = Served(model_dir, "--store", redis_server.url, "--api-keys", str(keys))
    b = Served(model_dir, "--store", redis_server.url, "--api-keys", str(keys))
    try:
        assert httpx.get(a.url + "/v1/models", headers=_h("sk-unknown-01")).status_code == 401
        made = httpx.post(a.url + "/v1/contexts", headers=_h("sk-alpha-0001"), json={"text": CONTEXT}, timeout=60)
        assert made.status_code == 200, made.text
        cid = made.json()["id"]
        assert _ask(b.url, "sk-alpha-0001", cid).status_code == 200  # its owner, on the other replica
        # the same text stored by beta: its own id, stored anew (nothing says alpha has it)
        theirs = httpx.post(b.url + "/v1/contexts", headers=_h("sk-beta-00001"), json={"text": CONTEXT}, timeout=60)
        assert theirs.status_code == 200 and theirs.json()["id"] != cid and theirs.json()["store"] == "miss"
        guessed = secrets.token_hex(16)
        attempts = 0
        for url in (a.url, b.url):
            for target in (cid, guessed):
                for r in (httpx.get(url + f"/v1/contexts/{target}", headers=_h("sk-beta-00001")),
                          _ask(url, "sk-beta-00001", target),
                          httpx.delete(url + f"/v1/contexts/{target}", headers=_h("sk-beta-00001"))):
                    attempts += 1
                    assert _not_found(r, target), (url, target, r.status_code, r.text)
        assert attempts == 12
        listed = httpx.get(b.url + "/v1/contexts", headers=_h("sk-beta-00001")).json()["data"]
        assert [c["id"] for c in listed] == [theirs.json()["id"]]
        assert httpx.get(a.url + f"/v1/contexts/{cid}", headers=_h("sk-alpha-0001")).status_code == 200  # intact
        every = httpx.get(a.url + "/v1/contexts", headers=_h("sk-admin-0001")).json()["data"]
        assert {(c["id"], c["tenant"]) for c in every} == {(cid, "alpha"), (theirs.json()["id"], "beta")}
        # deleted by its owner: gone for everyone, on both replicas
        assert httpx.delete(a.url + f"/v1/contexts/{cid}", headers=_h("sk-alpha-0001")).status_code == 200
        for url in (a.url, b.url):
            for key in ("sk-alpha-0001", "sk-beta-00001", "sk-admin-0001"):
                assert _not_found(httpx.get(url + f"/v1/contexts/{cid}", headers=_h(key)), cid)
        # beta's quota (60000 bytes) is shared by the replicas: its second context does not fit
        over = httpx.post(a.url + "/v1/contexts", headers=_h("sk-beta-00001"), json={"text": OTHER}, timeout=60)
        assert over.status_code == 403 and over.json()["error"]["code"] == "quota_exceeded", over.text
        assert "60000" in over.json()["error"]["message"]
        assert len(httpx.get(a.url + "/v1/contexts", headers=_h("sk-beta-00001")).json()["data"]) == 1
        # an admin deletes any tenant's context; then beta has room again
        assert httpx.delete(b.url + f"/v1/contexts/{theirs.json()['id']}", headers=_h("sk-admin-0001")).status_code == 200
        again = httpx.post(a.url + "/v1/contexts", headers=_h("sk-beta-00001"), json={"text": OTHER}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("content, needle", [
    ("not json", "not readable JSON"),
    ("[]", "JSON object of at least one key"),
    ('{"short": {"tenant": "a"}}', "at least 8 characters"),
    ('{"sk-12345678": {"tenant": "a b"}}', "tenant must be"),
    ('{"sk-12345678": {"tenant": "a", "quota": "lots"}}', "quota"),
    ('{"sk-12345678": {"tenant": "a", "quota": -1}}', "negative"),
    ('{"sk-12345678": {"tenant": "a", "role": "x"}}', "expected"),
])
def test_api_keys_file_errors_name_the_problem(tmp_path, content, needle):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle):
        load_api_keys(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_api_keys(tmp_path / "missing.json")


def test_api_keys_file_reads_tenants_quotas_and_admins(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS | {"sk-gamma-0001": {"tenant": "gamma", "quota": "1MiB"}}))
    keys = load_api_keys(path)
    assert keys["sk-alpha-0001"].tenant == "alpha" and keys["sk-alpha-0001"].quota_bytes is None
    assert keys["sk-gamma-0001"].quota_bytes == 2**20 and keys["sk-beta-00001"].quota_bytes == 60000
    assert keys["sk-admin-0001"].admin and keys["sk-admin-0001"].owns("anyone")
    assert not keys["sk-alpha-0001"].owns("beta") and keys["sk-alpha-0001"].owns("alpha")
