"""Test helpers for projects that use rpc-tasks.

* :class:`InlineRunner` - run ``@rpc_actor`` ``.call()`` / ``.send()`` (and their async twins
  ``acall`` / ``acall_many`` / ``asend``; ``async def`` actors too) in the calling thread,
  through the same validation and JSON round trip as the wire, and *simulate* the retry policy
  of :class:`middleware.RPCRetries` (``retry_after``, backoff, ``max_retries``, the caller's
  deadline) on a virtual clock: no sleeping, no Redis. ``runner.attempts`` records every attempt
  and the delay before it.
* :class:`FakeRPCClient` - a stand-in for :class:`~rpc_tasks.streams.client.WebSocketRPCClient` that you
  script: ``fake.returns("send_notification", NotificationResponse(...))``,
  ``fake.fails("send_notification", "rate_limit_exceeded", retry_after=2.5, times=2)``.
  ``fake.install()`` makes :func:`rpc_tasks.get_rpc_client` return it and
  :func:`rpc_tasks.get_async_rpc_client` its coroutine twin (``fake.aio``).
* :func:`in_process_worker` - a real ``dramatiq.Worker`` in this process (needs Redis for replies).
* :class:`RPCTestCaseMixin` - both of the first two for ``unittest`` / Django ``TestCase``.
* pytest fixtures: add ``pytest_plugins = ["rpc_tasks.testing"]`` to ``conftest.py`` for
  ``rpc_inline`` and ``fake_rpc``.

Not simulated inline: shared cooldowns and proactive rate limits (they need Redis; test them
with :func:`in_process_worker`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
from collections import defaultdict, deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import dramatiq
from pydantic import BaseModel

from . import protocol
from .actor import RPCActor
from .exceptions import RPCRemoteError, RPCTimeoutError
from .models.errors import RPCError, RPCErrorCode


@dataclass
class Attempt:
    """One simulated run of an actor."""

    actor: str
    params: dict[str, Any]
    at_ms: int
    """virtual time of the attempt, ms since the call/send"""
    error: RPCError | None = None


@dataclass
class InlineRunner:
    """Patch every ``RPCActor``'s ``.call()`` and ``.send()`` to run inline (see module doc).

    ``defer_sends=True`` queues ``.send()`` messages until :meth:`run_sends`.
    """

    defer_sends: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    dead_letters: list[tuple[str, RPCError]] = field(default_factory=list)
    pending: list[tuple[RPCActor[Any, Any], dramatiq.Message[Any]]] = field(default_factory=list)
    _patches: list[Any] = field(default_factory=list)

    def __enter__(self) -> InlineRunner:
        runner = self

        def call(
            actor: RPCActor[Any, Any], params: Any, /, *, timeout: float | None = None, **options: Any
        ) -> Any:
            options.pop("delay", None)
            message = actor.message_with_options(args=(params,), **options)
            return runner._run(actor, message, timeout if timeout is not None else 30.0, reply=True)

        def send(actor: RPCActor[Any, Any], params: Any, /, **options: Any) -> dramatiq.Message[Any]:
            options.pop("delay", None)
            message = actor.message_with_options(args=(params,), **options)
            if runner.defer_sends:
                runner.pending.append((actor, message))
            else:
                runner._run(actor, message, None, reply=False)
            return message

        async def acall(
            actor: RPCActor[Any, Any], params: Any, /, *, timeout: float | None = None, **options: Any
        ) -> Any:
            return call(actor, params, timeout=timeout, **options)

        async def acall_many(
            actor: RPCActor[Any, Any],
            params_list: Any,
            /,
            *,
            timeout: float | None = None,
            return_exceptions: bool = False,
            **options: Any,
        ) -> list[Any]:
            outcomes: list[Any] = []
            for params in params_list:
                try:
                    outcomes.append(call(actor, params, timeout=timeout, **options))
                except (RPCRemoteError, RPCTimeoutError) as exc:
                    if not return_exceptions:
                        raise
                    outcomes.append(exc)
            return outcomes

        async def asend(actor: RPCActor[Any, Any], params: Any, /, **options: Any) -> dramatiq.Message[Any]:
            return send(actor, params, **options)

        self._patches = [
            mock.patch.object(RPCActor, name, fn)
            for name, fn in (
                ("call", call),
                ("send", send),
                ("acall", acall),
                ("acall_many", acall_many),
                ("asend", asend),
            )
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self._patches):
            p.stop()
        self._patches = []

    def run_sends(self) -> int:
        """Run the deferred ``.send()`` messages (and any they send); returns how many ran."""
        count = 0
        while self.pending:
            actor, message = self.pending.pop(0)
            self._run(actor, message, None, reply=False)
            count += 1
        return count

    def _run(
        self, actor: RPCActor[Any, Any], message: dramatiq.Message[Any], timeout: float | None, *, reply: bool
    ) -> Any:
        from .middleware.retries import RPCRetries, rpc_error_of

        policy = RPCRetries()
        payload = json.loads(json.dumps(message.args[0]))  # exactly what a worker would see
        clock_ms = 0
        retries = 0
        max_retries = message.options.get("max_retries", actor.options.get("max_retries", policy.max_retries))
        while True:
            attempt = Attempt(actor.actor_name, payload, clock_ms)
            self.attempts.append(attempt)
            try:
                result = actor(payload)  # runs validation + the function, as a direct call does
                if inspect.iscoroutine(result):  # an async actor
                    result = _run_coroutine(result)
                wire = json.loads(json.dumps(protocol.model_to_wire(result)))
                return None if actor.result_model is None else actor.result_model.model_validate(wire)
            except Exception as exc:
                error = rpc_error_of(exc) or protocol.error_from_exception(exc)
                attempt.error = error
                throws = message.options.get("throws") or actor.options.get("throws")
                is_rpc = rpc_error_of(exc) is not None
                retryable = not (throws and isinstance(exc, throws)) and (
                    policy.is_retryable(message, actor, error) if is_rpc else True
                )
                delay = policy.compute_delay_ms(message, actor, retries, error.retry_after)
                give_up = not retryable or (max_retries is not None and retries >= max_retries)
                late = timeout is not None and (clock_ms + delay) / 1000.0 > timeout
                if give_up or late:
                    details = {**error.details, "attempts": retries + 1}
                    if late and not give_up:
                        details["next_retry_in"] = round(delay / 1000.0, 3)
                    final = error.model_copy(update={"details": details})
                    if not reply:
                        self.dead_letters.append((actor.actor_name, final))
                        return None
                    raise RPCRemoteError(final) from exc
                retries += 1
                clock_ms += delay


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async actor's coroutine to completion: on a new event loop in this thread, or in
    a helper thread when this thread already runs one (an ``acall`` in an async test)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class FakeRPCClient:
    """A scriptable stand-in for :class:`~rpc_tasks.streams.client.WebSocketRPCClient`.

    Unscripted calls raise ``RPCRemoteError(method_not_found)``, as a server would. Every call
    is recorded in ``calls`` as ``(method, params_dict)``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.broadcasts: list[tuple[str, dict[str, Any]]] = []
        self._script: dict[str, deque[Any]] = defaultdict(deque)
        self._default: dict[str, Any] = {}
        self.healthy = True

    def returns(self, method: str, result: Any, *, times: int | None = None) -> FakeRPCClient:
        """Answer ``method`` with ``result`` (a model, a dict, or ``fn(params) -> result``);
        ``times=None`` means every time (after any scripted answers)."""
        if times is None:
            self._default[method] = result
        else:
            self._script[method].extend([result] * times)
        return self

    def fails(
        self,
        method: str,
        code: RPCErrorCode | str = RPCErrorCode.SERVICE_UNAVAILABLE,
        message: str = "scripted failure",
        *,
        retry_after: float | None = None,
        retryable: bool | None = None,
        times: int = 1,
    ) -> FakeRPCClient:
        """Fail the next ``times`` calls of ``method`` with a structured error."""
        error = RPCError.from_wire(
            code.value if isinstance(code, RPCErrorCode) else code,
            message,
            retryable=retryable,
            retry_after=retry_after,
        )
        self._script[method].extend([error] * times)
        return self

    def times_out(self, method: str, *, times: int = 1) -> FakeRPCClient:
        """Make the next ``times`` calls of ``method`` raise ``RPCTimeoutError``."""
        self._script[method].extend([RPCTimeoutError(method, 0.0)] * times)
        return self

    def call(
        self, method: str, params: BaseModel, result_model: type[Any], timeout: float | None = None
    ) -> Any:
        """Like ``WebSocketRPCClient.call``."""
        data = json.loads(json.dumps(protocol.model_to_wire(params)))
        self.calls.append((method, data))
        answer = self._script[method].popleft() if self._script[method] else self._default.get(method, _NONE)
        if answer is _NONE:
            raise RPCRemoteError(
                RPCError(code=RPCErrorCode.METHOD_NOT_FOUND, message=f"no script for {method!r}")
            )
        if isinstance(answer, RPCTimeoutError):
            raise RPCTimeoutError(method, timeout if timeout is not None else 30.0)
        if isinstance(answer, RPCError):
            raise RPCRemoteError(answer)
        if callable(answer) and not isinstance(answer, BaseModel):
            answer = answer(params)
        return result_model.model_validate(json.loads(json.dumps(protocol.model_to_wire(answer))))

    def fire_and_forget(self, method: str, params: BaseModel) -> str:
        """Record and return a fake stream entry id."""
        self.calls.append((method, json.loads(json.dumps(protocol.model_to_wire(params)))))
        return f"0-{len(self.calls)}"

    def broadcast(self, channel: str, message: BaseModel) -> int:
        """Record; returns 1 subscriber."""
        self.broadcasts.append((channel, json.loads(json.dumps(protocol.model_to_wire(message)))))
        return 1

    def health_check(self, timeout: float = 5) -> bool:
        """``healthy`` (True unless you set it)."""
        return self.healthy

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        """Params of the recorded calls to ``method``."""
        return [p for m, p in self.calls if m == method]

    @contextlib.contextmanager
    def install(self) -> Iterator[FakeRPCClient]:
        """Make ``get_rpc_client()`` return this fake for the duration (however it was
        imported). A client object fetched *before* (e.g. a module-level ``rpc =
        get_rpc_client()``) is not replaced: patch that attribute yourself."""
        import rpc_tasks.aio.client as async_module
        import rpc_tasks.streams.client as client_module

        with client_module._client_lock, async_module._client_lock:
            previous = client_module._client, async_module._client
            client_module._client = self  # type: ignore[assignment]
            async_module._client = self.aio  # type: ignore[assignment]
        try:
            yield self
        finally:
            with client_module._client_lock, async_module._client_lock:
                client_module._client, async_module._client = previous

    @property
    def aio(self) -> AsyncFakeRPCClient:
        """The coroutine twin (``AsyncWebSocketRPCClient``'s methods) sharing this fake's
        script and records; :meth:`install` makes ``get_async_rpc_client()`` return it."""
        return AsyncFakeRPCClient(self)


class AsyncFakeRPCClient:
    """Coroutine twin of :class:`FakeRPCClient` (same script, same records), a stand-in for
    :class:`~rpc_tasks.aio.client.AsyncWebSocketRPCClient`."""

    def __init__(self, fake: FakeRPCClient) -> None:
        self.fake = fake

    async def call(
        self, method: str, params: BaseModel, result_model: type[Any], timeout: float | None = None
    ) -> Any:
        """Like ``AsyncWebSocketRPCClient.call``."""
        return self.fake.call(method, params, result_model, timeout)

    async def fire_and_forget(self, method: str, params: BaseModel) -> str:
        """Record and return a fake stream entry id."""
        return self.fake.fire_and_forget(method, params)

    async def broadcast(self, channel: str, message: BaseModel) -> int:
        """Record; returns 1 subscriber."""
        return self.fake.broadcast(channel, message)

    async def health_check(self, timeout: float = 5) -> bool:
        """The fake's ``healthy``."""
        return self.fake.health_check(timeout)


_NONE = object()


@contextlib.contextmanager
def in_process_worker(
    broker: dramatiq.Broker | None = None, *, threads: int = 2
) -> Iterator[dramatiq.Worker]:
    """Run a real Dramatiq worker in this process (for ``.call()`` end to end, with Redis)."""
    worker = dramatiq.Worker(broker or dramatiq.get_broker(), worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)


class RPCTestCaseMixin:
    """For ``unittest.TestCase`` / Django ``TestCase``: ``self.rpc_inline`` (an entered
    :class:`InlineRunner`) and ``self.fake_rpc`` (an installed :class:`FakeRPCClient`)."""

    rpc_defer_sends = False

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.rpc_inline = InlineRunner(defer_sends=self.rpc_defer_sends).__enter__()
        self.addCleanup(self.rpc_inline.__exit__, None, None, None)  # type: ignore[attr-defined]
        self.fake_rpc = FakeRPCClient()
        installed = self.fake_rpc.install()
        installed.__enter__()
        self.addCleanup(installed.__exit__, None, None, None)  # type: ignore[attr-defined]


try:  # pytest fixtures (pytest_plugins = ["rpc_tasks.testing"])
    import pytest

    @pytest.fixture
    def rpc_inline() -> Iterator[InlineRunner]:
        """``@rpc_actor`` calls run inline with a simulated retry policy."""
        with InlineRunner() as runner:
            yield runner

    @pytest.fixture
    def fake_rpc() -> Iterator[FakeRPCClient]:
        """A scripted ``WebSocketRPCClient`` returned by ``get_rpc_client()``."""
        fake = FakeRPCClient()
        with fake.install():
            yield fake

except ImportError:  # pragma: no cover
    pass


__all__ = [
    "AsyncFakeRPCClient",
    "Attempt",
    "FakeRPCClient",
    "InlineRunner",
    "RPCTestCaseMixin",
    "in_process_worker",
]
