"""The hot paths' connection handling under faults injected with a loopback proxy and
``CLIENT KILL``: no command is replayed after the server may have run it, a half-open
connection cannot hang a blocking read, and a kept connection the server closed is replaced
without an error."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from pydantic import BaseModel

from rpc_tasks import rpc_actor
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.redis.connection import pipelined, thread_connection

from .faultproxy import fault_proxy
from .support import redis_broker, unique

pytestmark = pytest.mark.redis


class Numbered(BaseModel):
    n: int


def _db(url: str) -> int:
    return int(urlsplit(url).path.lstrip("/") or 0)


def test_a_command_the_server_ran_is_not_replayed_after_a_reset(redis_url: str) -> None:
    """The proxy forwards INCR, Redis runs it, the proxy resets the client instead of
    forwarding the reply: pipelined must raise, not run INCR a second time."""
    direct = redis.Redis.from_url(redis_url)
    key = "incr-" + uuid.uuid4().hex
    with fault_proxy(6379, "reset_after_reply", trigger=b"INCR") as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, db=_db(redis_url))
        with pytest.raises(redis.ConnectionError):
            pipelined(client, [("INCR", key)])
        with pytest.raises(redis.ConnectionError):
            pipelined(client, [("INCR", key)], pinned=True)
        client.close()
    assert direct.get(key) == b"2", "one INCR per pipelined() call, none replayed"
    direct.delete(key)
    direct.close()


def test_a_half_open_connection_cannot_hang_a_blocking_read(redis_url: str) -> None:
    """socket_timeout=None (redis-py < 8's default) and replies that never come: the read of a
    BLPOP with a 0.2 s timeout gives up after that plus the slack."""
    with fault_proxy(6379, "pass") as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, db=_db(redis_url), socket_timeout=None)
        outcome: list[Any] = []

        def read() -> None:
            assert pipelined(client, [("PING",)], pinned=True) == [b"PONG"]  # connected
            proxy.mode = "blackhole"  # from now on the connection is half-open
            started = time.monotonic()
            try:
                pipelined(client, [("BLPOP", "nothing-" + uuid.uuid4().hex, 0.2)], wait=0.2, pinned=True)
            except Exception as exc:
                outcome.append((type(exc), time.monotonic() - started))

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the read hung on a half-open connection"
        assert outcome and issubclass(outcome[0][0], redis.TimeoutError)
        assert outcome[0][1] < 3.0


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert pipelined(client, [("PING",)], pinned=True) == [b"PONG"]
    conn = thread_connection(client)
    conn_id = pipelined(client, [("CLIENT", "ID")], pinned=True)[0]
    admin = redis.Redis.from_url(redis_url)
    admin.client_kill_filter(_id=conn_id)
    time.sleep(0.05)
    assert pipelined(client, [("PING",)], pinned=True) == [b"PONG"]
    assert thread_connection(client) is conn
    admin.close()
    client.close()


def test_messages_of_a_fetch_whose_reply_was_lost_are_requeued(redis_url: str) -> None:
    """A fetch ran on the server (its messages moved to this worker's ack set) but the reply
    was lost: not replayed, and once Redis answers the consumer requeues those strays."""
    broker, _ = redis_broker(redis_url)

    @rpc_actor(broker=broker, queue_name=unique("q"))
    def act(params: Numbered) -> None:
        pass

    for i in range(2):
        act.send(Numbered(n=i))
    with fault_proxy(6379, "reset_after_reply", trigger=b"fetch") as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/{_db(redis_url)}"
        lossy = BlockingRedisBroker(url=url, namespace=broker.namespace)
        with pytest.raises(redis.ConnectionError):
            lossy.fetch_with_ids(act.queue_name, 10)
        direct = redis.Redis.from_url(redis_url)
        assert direct.llen(f"{broker.namespace}:{act.queue_name}") == 0, "the fetch ran on the server"
        assert lossy.requeue_strays(act.queue_name, held=set()) == 2
        assert direct.llen(f"{broker.namespace}:{act.queue_name}") == 2
        direct.close()
