"""Shared pytest set-up.

Integration tests use the real Redis (``RPC_TEST_REDIS_URL``, default DB 9 on 127.0.0.1:6379)
and RabbitMQ (``RPC_TEST_AMQP_URL``). Each test gets its own key namespace and queue names and
flushes only its own Redis DB (never DB 0). Missing services skip those tests, unless pytest runs
with ``--require-services`` (CI does), which turns a missing service into a failure.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

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
    if _reachable(url, port):
        return
    message = f"{what} is not reachable at {url}"
    if request.config.getoption("--require-services"):
        pytest.fail(message + " (--require-services)", pytrace=False)
    pytest.skip(message)


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
