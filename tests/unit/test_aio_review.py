"""Review of the async callers, without Redis I/O: calls return by their deadline when the
commands ahead of them never complete (a frozen Redis), and leave nothing behind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from rpc_tasks import RPCTimeoutError, WebSocketRPCConfig, rpc_actor, setup_broker
from rpc_tasks.aio import connection
from rpc_tasks.aio.client import AsyncWebSocketRPCClient
from rpc_tasks.aio.connection import ConnectionSpec, loop_local
from rpc_tasks.aio.lane import FastLane
from rpc_tasks.aio.replies import ReplyReader
from rpc_tasks.redis.broker import BlockingRedisBroker
from rpc_tasks.streams.builtins import PingParams, PingResult

#: Never contacted: every connection of these tests is a fake.
URL = "redis://127.0.0.1:1/0"


class StuckConnection:
    """A connection whose writes never complete (a frozen Redis)."""

    def __init__(self, **kwargs: Any) -> None:
        self.encoder = None

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[bytes]:
        return []

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()

    async def disconnect(self, nowait: bool = False) -> None:
        return None


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
        loop_local(("ws-client", client), lambda: reader)
        lane = loop_local(("ws-lane", client), lambda: FastLane(ConnectionSpec(StuckConnection)))
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
