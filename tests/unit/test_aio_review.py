"""Review of the async callers, without Redis I/O: calls return by their deadline when the
commands ahead of them never complete (a frozen Redis), and leave nothing behind."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import MiddlewareError
from pydantic import BaseModel
from redis.exceptions import NoScriptError

from rpc_tasks import RPCConnectionError, RPCTimeoutError, WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.aio import connection
from rpc_tasks.aio.client import AsyncWebSocketRPCClient
from rpc_tasks.aio.connection import ConnectionSpec, loop_local
from rpc_tasks.aio.lane import FastLane
from rpc_tasks.aio.replies import ReplyReader
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.streams.builtins import PingParams, PingResult

from .aio_fakes import StuckConnection

#: Never contacted: every connection of these tests is a fake.
URL = "redis://127.0.0.1:1/0"


class Item(BaseModel):
    n: int


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop(reader: ReplyReader) -> None:
    """Drop what the frozen Redis holds (the loop's teardown would leave coroutines behind)."""
    reader.pipe._queue.clear()
    for task in (reader.pipe._task, reader._task):
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _stuck_reader() -> ReplyReader:
    return ReplyReader(ConnectionSpec(StuckConnection), prefix="test:resp:", max_bytes=None)


def test_a_call_waiting_for_room_in_a_stuck_pipe_returns_by_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "ROOM", 2)
    monkeypatch.setattr(connection, "MAX_BATCH", 1)
    broker = BlockingRedisBroker(url=URL, namespace="review")
    setup_broker(broker, config=WebSocketRPCConfig(redis_url=URL), set_global=False)

    @rpc_actor(broker=broker, queue_name="review")
    def work(params: Item) -> Item:
        return params

    async def scenario() -> tuple[BaseException | None, int, int]:
        channel = work._replies().channel
        reader = _stuck_reader()
        loop_local(("reader", channel), lambda: reader)
        loop_local(("pipe", broker, channel), lambda: reader.pipe)
        for _ in range(4):  # commands of earlier calls, held by the frozen Redis
            reader.pipe.submit(("PING",)).add_done_callback(_retrieved)
        await asyncio.sleep(0)
        assert reader.pipe.crowded
        try:
            await asyncio.wait_for(work.acall(Item(n=1), timeout=0.2), 2)
        except BaseException as exc:
            outcome: BaseException | None = exc
        else:
            outcome = None
        await _stop(reader)
        return outcome, reader.pipe._admitted, sum(not f.done() for f in reader.pipe._room)

    outcome, admitted, waiting = asyncio.run(scenario())
    assert isinstance(outcome, RPCTimeoutError), repr(outcome)
    assert admitted == 0 and waiting == 0  # no place held, nobody left waiting


def test_a_client_call_through_a_stuck_pipe_returns_by_its_deadline() -> None:
    client = AsyncWebSocketRPCClient(WebSocketRPCConfig(redis_url=URL))

    async def scenario() -> tuple[BaseException | None, int]:
        reader = _stuck_reader()
        loop_local(client._reader_key, lambda: reader)
        lane = loop_local(client._lane_key, lambda: FastLane(ConnectionSpec(StuckConnection)))
        lane.busy = True  # another call waits on the lane: this one goes through the pipe
        try:
            await asyncio.wait_for(client.call("review", PingParams(), PingResult, timeout=0.2), 2)
        except BaseException as exc:
            outcome: BaseException | None = exc
        else:
            outcome = None
        await _stop(reader)
        return outcome, reader.waiting

    outcome, waiting = asyncio.run(scenario())
    assert isinstance(outcome, RPCTimeoutError), repr(outcome)
    assert waiting == 0


class NoScriptLaneConnection(StuckConnection):
    """The fast lane's connection to a Redis that lost its script cache: ``EVALSHA`` fails
    with ``NOSCRIPT``, ``BLPOP`` gets nothing (its read times out). Records each write."""

    writes: list[list[str]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.replies: list[str] = []

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[bytes]:
        NoScriptLaneConnection.writes.append([str(c[0]) for c in commands])
        self.replies += [str(c[0]) for c in commands]
        return []

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def read_response(self, timeout: float | None = None) -> Any:
        name = self.replies.pop(0)
        if name == "EVALSHA":
            raise NoScriptError("NOSCRIPT No matching script.")
        await asyncio.sleep(timeout if timeout is not None else 3600)
        return None

    async def disconnect(self, nowait: bool = False) -> None:
        self.replies.clear()


def test_the_fast_lane_carries_one_call_while_the_first_reloads_the_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BlockingRedisBroker, "_max_unpack_size_val", 1000)  # no Redis asked
    NoScriptLaneConnection.writes = []
    broker = BlockingRedisBroker(url=URL, namespace="review")
    setup_broker(broker, config=WebSocketRPCConfig(redis_url=URL), set_global=False)
    reloading, reloaded = threading.Event(), threading.Event()

    def do_enqueue(queue_name: str, message_id: str, data: bytes) -> None:
        reloading.set()
        reloaded.wait(5)  # the sync enqueue that loads the script (slow, in a thread)

    broker.do_enqueue = do_enqueue  # type: ignore[method-assign]

    @rpc_actor(broker=broker, queue_name="review")
    def work(params: Item) -> Item:
        return params

    async def scenario() -> tuple[list[list[str]], int, list[Any]]:
        channel = work._replies().channel
        reader = _stuck_reader()
        loop_local(("reader", channel), lambda: reader)
        loop_local(("pipe", broker, channel), lambda: reader.pipe)
        loop_local(("lane", channel), lambda: FastLane(ConnectionSpec(NoScriptLaneConnection)))
        first = asyncio.ensure_future(work.acall(Item(n=1), timeout=0.5))
        while not reloading.is_set() and not first.done():
            await asyncio.sleep(0.005)
        assert not first.done(), first
        second = asyncio.ensure_future(work.acall(Item(n=2), timeout=0.5))
        await asyncio.sleep(0.05)
        writes, waiting = list(NoScriptLaneConnection.writes), reader.waiting
        reloaded.set()
        outcomes = list(await asyncio.gather(first, second, return_exceptions=True))
        await _stop(reader)
        return writes, waiting, outcomes

    writes, waiting, outcomes = asyncio.run(scenario())
    # While the first call reloads the script, the lane is still its own: the second call
    # goes through the reply reader, not onto the same connection.
    assert writes == [["EVALSHA", "BLPOP", "DEL"]], writes
    assert waiting == 1
    assert all(isinstance(o, RPCTimeoutError) for o in outcomes), outcomes


def test_a_lone_call_to_a_redis_that_is_down_raises_rpc_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dramatiq asks Redis for its Lua stack size on the process's first enqueue.
    monkeypatch.setattr(BlockingRedisBroker, "_max_unpack_size_val", None)
    broker = BlockingRedisBroker(url=URL, namespace="review")
    setup_broker(broker, config=WebSocketRPCConfig(redis_url=URL), set_global=False)

    @rpc_actor(broker=broker, queue_name="review")
    def work(params: Item) -> Item:
        return params

    async def scenario() -> None:
        with pytest.raises(RPCConnectionError):
            await asyncio.wait_for(work.acall(Item(n=1), timeout=1), 5)

    asyncio.run(scenario())


class OverQuota(MiddlewareError):
    """Raised by a hook (Dramatiq lets only ``MiddlewareError`` out of a hook)."""


class RefuseThird(dramatiq.Middleware):
    """A ``before_enqueue`` hook that refuses the third message it sees (a quota, say)."""

    def __init__(self) -> None:
        self.seen = 0

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.seen += 1
        if self.seen == 3:
            raise OverQuota("over quota")


def test_acall_many_whose_hook_refuses_a_message_enqueues_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BlockingRedisBroker, "_max_unpack_size_val", 1000)  # no Redis asked
    broker = BlockingRedisBroker(url=URL, namespace="review")
    setup_broker(broker, config=WebSocketRPCConfig(redis_url=URL), set_global=False)
    broker.add_middleware(RefuseThird())

    @rpc_actor(broker=broker, queue_name="review")
    def work(params: Item) -> Item:
        return params

    async def scenario() -> tuple[BaseException | None, int]:
        channel = work._replies().channel
        reader = _stuck_reader()
        loop_local(("reader", channel), lambda: reader)
        loop_local(("pipe", broker, channel), lambda: reader.pipe)
        try:
            await work.acall_many([Item(n=i) for i in range(4)], timeout=1)
        except BaseException as exc:
            outcome: BaseException | None = exc
        else:
            outcome = None
        queued = len(reader.pipe._queue)  # what the pipe would send
        await _stop(reader)
        return outcome, queued

    outcome, queued = asyncio.run(scenario())
    assert isinstance(outcome, OverQuota), repr(outcome)
    # As call_many (enqueue_many runs every hook first): the caller's error, nothing sent.
    assert queued == 0
