"""The async callers' machinery without Redis: paced wake-ups (a burst of replies or enqueue
completions wakes its callers in chunks, yielding to the loop between chunks), the reply
reader's single deadline timer, and commands built only when the pipe sends them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rpc_tasks import RPCConnectionError, RPCTimeoutError, protocol
from rpc_tasks.aio import connection
from rpc_tasks.aio.connection import CommandPipe, ConnectionSpec, send_batch
from rpc_tasks.aio.pacing import Pacer
from rpc_tasks.aio.replies import ReplyReader

from .aio_fakes import EchoConnection, StuckConnection


def stuck_reader() -> ReplyReader:
    return ReplyReader(ConnectionSpec(StuckConnection), prefix="test:resp:", max_bytes=None)


class FixedPacer(Pacer):
    """Chunks of a fixed size (the measured cost would make them vary)."""

    def __init__(self, chunk: int) -> None:
        self.fixed = chunk
        super().__init__()

    def _size(self) -> int:
        return self.fixed


def pacer_of_chunk(chunk: int) -> Pacer:
    return FixedPacer(chunk)


async def woken_callers(futures: list[asyncio.Future[Any]], seen: list[int]) -> list[asyncio.Task[None]]:
    """One task per future; each records, when it wakes, how many futures were resolved."""

    async def caller(future: asyncio.Future[Any]) -> None:
        await future
        seen.append(sum(f.done() for f in futures))

    tasks = [asyncio.ensure_future(caller(f)) for f in futures]
    await asyncio.sleep(0)  # every caller waits on its future
    return tasks


def test_a_burst_of_replies_wakes_its_callers_in_chunks_with_the_loop_in_between() -> None:
    async def scenario() -> list[int]:
        reader = stuck_reader()
        reader.pacer = pacer_of_chunk(3)
        ids = [f"id-{i}" for i in range(10)]
        futures = [reader.expect(i) for i in ids]
        seen: list[int] = []
        tasks = await woken_callers(futures, seen)
        await reader._deliver_paced([protocol.encode_response(i, result={"n": 1}) for i in ids])
        await asyncio.gather(*tasks)
        await reader.aclose()
        return seen

    seen = asyncio.run(scenario())
    # The callers of a chunk ran before the next chunk was resolved (without pacing, all ten
    # replies would be resolved before any caller runs).
    assert seen[:3] == [3, 3, 3]
    assert seen[3:6] == [6, 6, 6]
    assert seen[6:] == [9, 9, 9, 10]


def test_enqueue_completions_wake_their_callers_in_chunks() -> None:
    async def scenario() -> tuple[list[int], list[Any]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(7)]
        seen: list[int] = []
        tasks = await woken_callers(futures, seen)
        batch = [(("ECHO", i), f) for i, f in enumerate(futures)]
        await send_batch(EchoConnection(), batch, pacer=pacer_of_chunk(2))
        await asyncio.gather(*tasks)
        return seen, [f.result() for f in futures]

    seen, results = asyncio.run(scenario())
    assert results == list(range(7))
    assert seen == [2, 2, 4, 4, 6, 6, 7]


def test_producers_sharing_a_pacer_wake_at_most_one_chunk_per_step_between_them() -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(8)]
        seen: list[int] = []
        tasks = await woken_callers(futures, seen)
        pacer = pacer_of_chunk(3)
        await asyncio.gather(
            send_batch(EchoConnection(), [(("ECHO", i), f) for i, f in enumerate(futures[:4])], pacer=pacer),
            send_batch(EchoConnection(), [(("ECHO", i), f) for i, f in enumerate(futures[4:])], pacer=pacer),
        )
        await asyncio.gather(*tasks)
        return seen

    seen = asyncio.run(scenario())
    # Each caller saw how many futures were resolved when it ran: a new value per step.
    steps = sorted(set(seen))
    assert len(seen) == 8
    assert all(b - a <= 3 for a, b in zip([0, *steps], steps, strict=False))


def test_the_chunk_follows_the_measured_cost_of_the_woken_callers() -> None:
    async def rounds(pacer: Pacer, cpu_each: float) -> None:
        loop = asyncio.get_running_loop()

        async def caller(future: asyncio.Future[None]) -> None:
            await future
            end = time.thread_time() + cpu_each
            while time.thread_time() < end:
                pass

        for _ in range(8):
            futures: list[asyncio.Future[None]] = [loop.create_future() for _ in range(2)]
            tasks = [asyncio.ensure_future(caller(f)) for f in futures]
            await asyncio.sleep(0)
            for future in futures:
                pacer.wake()
                future.set_result(None)
            await pacer.pause()
            await asyncio.gather(*tasks)

    expensive, cheap = Pacer(budget=0.001), Pacer(budget=0.001)
    first_chunk = cheap.chunk
    asyncio.run(rounds(expensive, 0.002))  # 2 ms of CPU per woken caller
    asyncio.run(rounds(cheap, 0.0))
    assert expensive.cost > 0.001 and expensive.chunk == 1
    assert cheap.chunk > first_chunk


def test_one_timer_fails_the_calls_whose_deadline_passed() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        reader = stuck_reader()
        now = loop.time()
        soon = reader.expect("soon", (now + 0.05, "echo", 0.05))
        later = reader.expect("later", (now + 0.3, "echo", 0.3))
        answered = reader.expect("answered", (now + 0.02, "echo", 0.02))
        reader.forget("answered")  # answered in time: its deadline is skipped
        timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert len(timers) == 1  # one for the reader, not one per call
        await asyncio.sleep(0.1)
        assert isinstance(soon.exception(), RPCTimeoutError)
        assert soon.exception().timeout_seconds == 0.05  # type: ignore[union-attr]
        assert not later.done() and not answered.done()
        reader.forget("soon")
        with pytest.raises(RPCTimeoutError):
            await later
        reader.forget("later")
        assert reader._timer is None and reader._deadlines == []
        await reader.aclose()

    asyncio.run(scenario())


def test_an_earlier_deadline_rearms_the_timer_and_stale_entries_are_purged() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        reader = stuck_reader()
        keep = reader.expect("keep", (loop.time() + 60, "echo", 60))
        for i in range(500):  # calls answered long before their deadline
            reader.expect(f"done-{i}", (loop.time() + 60, "echo", 60))
            reader.forget(f"done-{i}")
        assert len(reader._deadlines) <= 2 * reader.waiting + 65
        urgent = reader.expect("urgent", (loop.time() + 0.02, "echo", 0.02))
        with pytest.raises(RPCTimeoutError):
            await urgent
        assert not keep.done()
        await reader.aclose()
        assert isinstance(keep.exception(), RPCConnectionError)

    asyncio.run(scenario())


def test_a_deferred_command_is_built_when_sent_and_its_failure_reaches_its_caller() -> None:
    async def scenario() -> None:
        built: list[str] = []

        def build(name: str) -> tuple[Any, ...]:
            if name == "bad":
                raise TypeError("cannot encode")
            built.append(name)
            return ("ECHO", name)

        pipe = CommandPipe(ConnectionSpec(EchoConnection))
        good = pipe.submit_deferred(build, "good")
        bad = pipe.submit_deferred(build, "bad")
        plain = pipe.submit(("ECHO", "plain"))
        assert built == []  # nothing built while queued
        assert await good == "good" and await plain == "plain"
        with pytest.raises(TypeError, match="cannot encode"):
            await bad
        await pipe.aclose()

    asyncio.run(scenario())


class HeldConnection(EchoConnection):
    """Like :class:`EchoConnection`, but every write waits for :attr:`go`."""

    go: asyncio.Event

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        await HeldConnection.go.wait()


def test_calls_beyond_the_room_wait_first_come_first_served_and_pass_on_their_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "ROOM", 4)
    monkeypatch.setattr(connection, "MAX_BATCH", 2)

    async def scenario() -> tuple[list[int], int, list[Any]]:
        HeldConnection.go = asyncio.Event()
        pipe = CommandPipe(ConnectionSpec(HeldConnection))
        built: list[int] = []
        most_ahead = 0

        async def call(i: int) -> Any:
            nonlocal most_ahead
            admitted = pipe.crowded
            if admitted:
                await pipe.wait_for_room()
            if i == 7:  # gives up after it was admitted: its place goes to the next one
                pipe.pass_turn()
                return "gave up"
            built.append(i)  # a message is built only now
            most_ahead = max(most_ahead, len(built) - sum(f.done() for f in futures))
            future = pipe.submit_deferred(None, ("ECHO", i), admitted=admitted)
            futures.append(future)
            return await future

        futures: list[asyncio.Future[Any]] = []
        tasks = [asyncio.ensure_future(call(i)) for i in range(12)]
        await asyncio.sleep(0.01)
        # Two commands in the (held) write, four queued: the others wait, nothing built.
        assert built == [0, 1, 2, 3, 4, 5]
        tasks[6].cancel()  # cancelled while waiting: never admitted
        HeldConnection.go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert pipe._admitted == 0 and not pipe._room and not pipe.crowded
        return built, most_ahead, results

    built, most_ahead, results = asyncio.run(scenario())
    assert built == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]  # in arrival order
    assert most_ahead <= 4 + 2  # the room, and one write's worth being sent
    assert isinstance(results[6], asyncio.CancelledError)
    assert results[7] == "gave up"
    assert [r for i, r in enumerate(results) if i not in (6, 7)] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]


def test_a_call_waiting_for_room_with_nothing_queued_is_admitted_at_once() -> None:
    async def scenario() -> None:
        pipe = CommandPipe(ConnectionSpec(EchoConnection))
        await asyncio.wait_for(pipe.wait_for_room(), 1)  # nothing would ever make room
        assert pipe._admitted == 1
        assert await pipe.submit_deferred(None, ("ECHO", "x"), admitted=True) == "x"
        assert pipe._admitted == 0

    asyncio.run(scenario())
