"""Shared fixtures: the ``ledger`` fixture runs a test once per ledger backend.

Backends are listed in :data:`BACKENDS` and built by :func:`make_ledger`. A server-backed
backend joins by adding its name to ``BACKENDS`` and a branch to ``make_ledger`` that calls
:func:`require_server` first: the test skips when the server is not running, except under
``CI=true``, where a missing server fails the test. Each backend's tests carry a marker of
its name, so ``pytest -m sqlite`` or ``pytest -m "not redis"`` slices the matrix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from tb_plugins.ledger import Ledger, ledger_from_url

BACKENDS = ["memory", "sqlite", "redis", "postgres"]
"""Every ledger backend the conformance suite runs on."""

BACKEND_MARKERS = {
    "memory": "the in-process memory:// ledger",
    "sqlite": "the embedded SQLite ledger",
    # "redis" and "postgres" markers are declared in pyproject.toml.
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in BACKEND_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def require_server(name: str, host: str, port: int) -> None:
    """Skip the test when ``host:port`` is not listening, or fail it under ``CI=true``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return
    except OSError as exc:
        message = f"{name} is not running on {host}:{port} ({exc})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; under CI=true every backend must be available")
    pytest.skip(message)


_SERVER_NAMESPACES: list[tuple[str, str]] = []
"""(backend, Redis key prefix or PostgreSQL schema) of every server ledger made this session."""


def make_ledger(name: str, tmp_path: Path) -> Ledger:
    """A new, empty ledger of backend ``name`` (files go under ``tmp_path``).

    Every call gives a ledger that shares nothing with earlier ones, so tests stay independent.
    """
    if name == "memory":
        return ledger_from_url("memory://")
    if name == "sqlite":
        tmp_path.mkdir(parents=True, exist_ok=True)
        return ledger_from_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    if name == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        prefix = f"tbtest-{uuid4().hex}"
        _SERVER_NAMESPACES.append((name, prefix))
        return ledger_from_url("redis://127.0.0.1:6379/15", prefix=prefix)
    if name == "postgres":
        require_server("PostgreSQL", "127.0.0.1", 5432)
        schema = f"tbtest_{uuid4().hex}"
        _SERVER_NAMESPACES.append((name, schema))
        return ledger_from_url("postgresql://postgres@127.0.0.1:5432/test", schema=schema)
    raise ValueError(f"unknown ledger backend {name!r}; known: {BACKENDS}")


@pytest.fixture(scope="session", autouse=True)
def _drop_server_ledgers() -> Iterator[None]:
    """After the session, delete the Redis keys and PostgreSQL schemas its ledgers made."""
    yield
    for name, namespace in _SERVER_NAMESPACES:
        if name == "redis":
            import redis

            client = redis.Redis(host="127.0.0.1", port=6379, db=15)
            keys = list(client.scan_iter(match=f"{{tb:{namespace}}}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        else:
            import psycopg
            from psycopg import sql

            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
                c.execute("SET client_min_messages = warning")
                c.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
                )


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in BACKENDS])
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the ledger backend under test."""
    name: str = request.param
    return name


@pytest.fixture
def ledger(backend: str, tmp_path: Path) -> Iterator[Ledger]:
    """A fresh ledger of each backend in turn; sync and async tests use it alike."""
    led = make_ledger(backend, tmp_path)
    try:
        yield led
    finally:
        led.close()
