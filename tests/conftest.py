"""Shared pytest set-up.

Integration tests use the real Redis (``RPC_TEST_REDIS_URL``, default DB 9 on 127.0.0.1:6379)
and RabbitMQ (``RPC_TEST_AMQP_URL``). Each test gets its own key namespace and queue names and
flushes only its own Redis DB (never DB 0). The few tests that need a second database (replies
on another DB than the broker's) use the test DB + 1 (DB 10 by default; DB 14 when the test DB
is 15), only under keys of their own, never flushed. Tests that read server-wide state
(``INFO``, ``SCRIPT FLUSH``, ``CONFIG SET``) start a private ``redis-server``
(``tests/integration/support.py: PrivateRedis``).

A missing service skips its tests (``-rs`` prints why), unless pytest runs with
``--require-services`` (``RPC_TASKS_REQUIRE_SERVICES=1``; CI does): then every skip, wherever
it comes from (a service down, ``importorskip``, a missing program such as openssl, redis-server
or chromium), is reported as a failure. A skip whose reason contains ``[not-a-service]`` (a
test that does not apply on this platform) stays a skip.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

REDIS_URL = os.environ.get("RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
AMQP_URL = os.environ.get("RPC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-services",
        action="store_true",
        default=os.environ.get("RPC_TASKS_REQUIRE_SERVICES") == "1",
        help="fail (instead of skip) tests whose Redis/RabbitMQ is not reachable",
    )


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 1.0):
            return True
    except OSError:
        return False


def _need(request: pytest.FixtureRequest, what: str, url: str, port: int) -> None:
    if not _reachable(url, port):
        need(request, f"{what} is not reachable at {url}")


#: A skip reason containing this stays a skip under ``--require-services``.
NOT_A_SERVICE = "[not-a-service]"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport, config: pytest.Config) -> None:
    if not (report.skipped and config.getoption("--require-services")):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if NOT_A_SERVICE in reason:
        return
    report.outcome = "failed"
    report.longrepr = f"skipped, but services are required (--require-services): {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    _fail_skip(report, item.config)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report = yield
    _fail_skip(report, collector.config)
    return report


def need(request: pytest.FixtureRequest, reason: str) -> NoReturn:
    """Skip (or, with ``--require-services``, fail) because ``reason``: a service or program
    the test needs is missing."""
    if request.config.getoption("--require-services"):
        pytest.fail(f"{reason} (--require-services)", pytrace=False)
    pytest.skip(reason)


def second_db_url(url: str) -> str:
    """The test DB's neighbour (DB + 1, or DB - 1 for DB 15) on the same server."""
    parts = urlsplit(url)
    db = int(parts.path.lstrip("/") or 0)
    other = db + 1 if db < 15 else db - 1
    return urlunsplit(parts._replace(path=f"/{other}"))


@pytest.fixture
def second_redis_url(redis_url: str) -> str:
    """A second database on the test Redis (see the module docstring); not flushed: use keys
    of your own there."""
    return second_db_url(redis_url)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which broker ``support.make_broker`` builds for this test: "blocking" unless the test
    is parametrized (``@pytest.mark.parametrize("broker_kind", [...], indirect=True)``) with
    "plain" (Dramatiq's RedisBroker) or "rabbitmq" (RabbitmqBroker, replies over Redis)."""
    from tests.integration import support

    return support.use_broker_kind(request, monkeypatch, getattr(request, "param", "blocking"))


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the test Redis DB, flushed before and after the test."""
    _need(request, "Redis", REDIS_URL, 6379)
    if urlsplit(REDIS_URL).path in ("", "/", "/0"):
        pytest.fail("refusing to run tests against Redis DB 0; set RPC_TEST_REDIS_URL to another DB")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    """URL of the test RabbitMQ (tests use their own queue names and delete them)."""
    _need(request, "RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL
