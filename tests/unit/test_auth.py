"""API keys file -> KeyRing -> Tenant, and the tenant/admin dependencies on a bare app."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.auth import (
    OPEN_ACCESS,
    AdminDep,
    ApiKeysFileError,
    KeyRing,
    Tenant,
    TenantDep,
    is_loopback,
    load_api_keys,
)
from server.api.errors import install_error_handlers

OPS_KEY = "sk-ops-secret"
KEYS = {
    "keys": [
        {"key": "sha256:" + hashlib.sha256(OPS_KEY.encode()).hexdigest(), "tenant": "ops", "admin": True},
        {"key": "sk-acme-123", "tenant": "acme", "adapters": ["acme-support"], "allow_base": False},
        {"key": "sk-lab-456", "tenant": "lab", "adapters": "*"},
    ]
}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return load_api_keys(write(tmp_path, KEYS))


def test_load_resolves_plain_and_sha256_keys(keyring: KeyRing) -> None:
    assert len(keyring) == 3
    ops = keyring.tenant_for(OPS_KEY)
    assert ops == Tenant("ops", adapters=frozenset(), allow_base=True, admin=True)
    acme = keyring.tenant_for("sk-acme-123")
    assert acme is not None and acme.adapters == {"acme-support"} and not acme.allow_base and not acme.admin
    lab = keyring.tenant_for("sk-lab-456")
    assert lab is not None and lab.adapters is None and lab.may_use_adapter("anything")
    # the stored digest itself is not a key
    assert keyring.tenant_for("sha256:" + hashlib.sha256(OPS_KEY.encode()).hexdigest()) is None
    assert keyring.tenant_for("") is None
    assert keyring.tenant_for("sk-acme-12") is None


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ({"keys": []}, "lists no keys"),
        ([], "invalid at the top level"),
        ({"keys": [{"tenant": "a"}]}, "keys.0.key"),
        ({"keys": [{"key": "k", "tenant": "a", "adapters": "all"}]}, "keys.0.adapters"),
        ({"keys": [{"key": "k", "tenant": "a", "admin": "yes"}]}, "keys.0.admin"),
        ({"keys": [{"key": "k", "tenant": "a", "metrics": 1}]}, "keys.0.metrics"),
        ({"keys": [{"key": "k", "tenant": "a", "colour": "red"}]}, "keys.0.colour"),
        ({"keys": [{"key": "sha256:abc", "tenant": "a"}]}, "64 hex digits"),
        ({"keys": [{"key": "k", "tenant": "a"}, {"key": "k", "tenant": "b"}]}, "appears twice"),
    ],
)
def test_bad_keys_files_are_refused_with_a_clear_message(
    tmp_path: Path, content: object, fragment: str
) -> None:
    with pytest.raises(ApiKeysFileError, match="keys") as info:
        load_api_keys(write(tmp_path, content))
    assert fragment in str(info.value)


def test_missing_keys_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysFileError, match="cannot read"):
        load_api_keys(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("testclient", False),
        (None, False),
        ("", False),
    ],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert is_loopback(host) is expected


def make_app(keyring: KeyRing | None) -> FastAPI:
    app = FastAPI()
    app.state.keyring = keyring
    app.state.metrics = None
    install_error_handlers(app)

    @app.get("/whoami")
    def whoami(tenant: TenantDep) -> dict[str, str]:
        return {"tenant": tenant.name}

    @app.get("/admin")
    def admin(tenant: AdminDep) -> dict[str, str]:
        return {"tenant": tenant.name}

    return app


@pytest.mark.parametrize(
    ("route", "key", "status", "tenant"),
    [
        ("/whoami", None, 401, None),
        ("/whoami", "sk-wrong", 401, None),
        ("/whoami", "sk-acme-123", 200, "acme"),
        ("/whoami", OPS_KEY, 200, "ops"),
        ("/admin", None, 401, None),
        ("/admin", "sk-wrong", 401, None),
        ("/admin", "sk-lab-456", 403, None),
        ("/admin", OPS_KEY, 200, "ops"),
    ],
)
def test_keyed_access(keyring: KeyRing, route: str, key: str | None, status: int, tenant: str | None) -> None:
    client = TestClient(make_app(keyring))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = client.get(route, headers=headers)
    assert response.status_code == status
    if tenant is not None:
        assert response.json() == {"tenant": tenant}
    else:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"


def test_malformed_authorization_header_is_401(keyring: KeyRing) -> None:
    client = TestClient(make_app(keyring))
    for header in ("sk-acme-123", "Basic sk-acme-123", "Bearer ", "Bearer"):
        assert client.get("/whoami", headers={"Authorization": header}).status_code == 401


def test_open_access_admin_only_on_loopback() -> None:
    app = make_app(None)
    assert TestClient(app).get("/whoami").json() == {"tenant": OPEN_ACCESS.name}
    # TestClient's peer is "testclient", not a loopback address
    assert TestClient(app).get("/admin").status_code == 403
    local = TestClient(app, client=("127.0.0.1", 50000))
    assert local.get("/admin").status_code == 200
    assert TestClient(app, client=("::1", 50000)).get("/admin").status_code == 200
