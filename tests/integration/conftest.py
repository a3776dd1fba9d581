"""Fixtures shared by the modules that test one real server: each defines its own module-scoped ``server``
(a ``tests.integration.api_server.ServerProcess`` started with its flags); these build on it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.api_server import ServerProcess


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def base_id(http: httpx.Client) -> str:
    """The id of the base model (the one entry of ``/v1/models`` without a parent)."""
    return str(next(m["id"] for m in http.get("/v1/models").json()["data"] if m.get("parent") is None))
