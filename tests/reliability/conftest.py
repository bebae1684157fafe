"""Fixtures of the reliability tests: the service tests' models on disk and Hub mock (reused from
tests/service/conftest.py), a private PostgreSQL and Redis that the fault tests may restart, the API process, a warm
fork server for workers, and the figures table printed at the end of the run (and written as JSON to
``$MOPEQ_RELIABILITY_FIGURES`` when set)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rel_util import SERVICE_TESTS, Cluster, PgServer, RedisServer

_spec = importlib.util.spec_from_file_location("mopeq_service_conftest", SERVICE_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_svc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_svc)
model_root = _svc.model_root  # the tiny MoE and the hostile model folders
hub = _svc.hub  # the HTTP Hub mock
pg_url = _svc.pg_url  # a fresh database on the shared PostgreSQL (for tests that never restart it)

FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def figures() -> list[dict[str, Any]]:
    return FIGURES


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    srv = PgServer()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_root: Path, pg_server: PgServer,
            redis_server: RedisServer, hub: Any) -> Iterator[Cluster]:
    from app.db.migrate import upgrade

    upgrade(pg_server.url)
    hub.add_repo_from_dir("org/tiny-moe", model_root / "tiny-moe")
    cl = Cluster(tmp_path_factory.mktemp("rel"), model_root, pg_server, redis_server, hub)
    cl.start_api()
    cl.start_zygote()
    yield cl
    cl.close()


@pytest.fixture
def fresh(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with no worker running before and after the test (each fault test starts its own)."""
    cluster.stop_workers()
    cluster.hub.fail_next = []
    yield cluster
    cluster.stop_workers()
    cluster.hub.fail_next = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    tr = terminalreporter
    tr.write_sep("=", "reliability figures")
    tr.write_line(f"{'fault':44} {'jobs':>4} {'lost':>4} {'stuck':>5} {'dup':>3} {'s':>6}  final / reason")
    for f in FIGURES:
        tr.write_line(f"{f['fault'][:44]:44} {f['jobs']:>4} {f['lost']:>4} {f['stuck_running']:>5} "
                      f"{f['duplicate_artifacts']:>3} {f['seconds']:>6.1f}  {f['outcome']}")
    out = os.environ.get("MOPEQ_RELIABILITY_FIGURES")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=1, default=str))
