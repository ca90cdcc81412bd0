"""A tiny metrics hook: rpc-tasks middleware reports events here; plug in Prometheus,
StatsD or logs with :func:`add_listener`.

Events (``labels`` always include ``actor``):

* ``retry`` (``code``, ``delay_ms``, ``attempt``): a failed attempt was scheduled again;
* ``postpone`` (``reason``: ``cooldown`` | ``rate_limit``, ``delay_ms``): a message was put back
  without running and without using a retry;
* ``cooldown_opened`` (``key``, ``duration_ms``): a rate-limit error opened a shared cooldown;
* ``gave_up`` (``reason``: ``deadline`` | ``postpone_cap`` | ``retries_exhausted`` |
  ``non_retryable``): the message failed for good;
* ``expired_skipped``: a ``.call()`` message arrived after its caller's deadline;
* ``reply_push_failed``: a worker could not push a reply to its caller;
* ``call`` / ``call_many`` / ``send`` (``actor``, ``queue``; their async twins ``acall`` /
  ``acall_many`` / ``asend`` too) and ``stream_call`` / ``stream_send`` (``actor`` = the Streams
  method; a call, a fire-and-forget request), ``serve`` (``method``, ``stream``): one observed
  operation ended, with ``outcome`` (``ok``, ``timeout``, ``connection``, ``validation_error``,
  ``cancelled``, ``error`` or the remote error code) and ``duration`` in seconds (see
  :func:`observe`);
* ``server_backlog`` (``stream``, ``group``, ``pending``, ``unread``): a Streams server's backlog;
* ``server_dead_lettered`` (``stream``): a Streams entry went to the dead-letter stream;
* ``ws_connection`` (``delta``: +1 / -1), ``ws_delivery`` (``offered``, ``took``),
  ``ws_fanout_acks`` (``expected``, ``received``), ``ws_rate_limited``: the WebSocket server.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

from pydantic import ValidationError

from .exceptions import RPCConnectionError, RPCException, RPCRemoteError, RPCTimeoutError

logger = logging.getLogger("rpc_tasks.metrics")

Listener = Callable[[str, Mapping[str, Any]], None]

_listeners: list[Listener] = []
#: The listeners that also want the end events of observed operations (``call``, ``serve``...).
_op_listeners: list[Listener] = []
_lock = threading.Lock()
#: In-process totals, keyed by ``(event, actor)``.
counters: Counter[tuple[str, str]] = Counter()


def add_listener(listener: Listener, *, operations: bool = True) -> None:
    """Call ``listener(event, labels)`` for every event (must be fast and thread-safe);
    ``operations=False`` leaves out the end events of observed operations (see :func:`observe`),
    so that they cost nothing when no listener wants them."""
    with _lock:
        _listeners.append(listener)
        if operations:
            _op_listeners.append(listener)
        _refresh()


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``."""
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)
        if listener in _op_listeners:
            _op_listeners.remove(listener)
        _refresh()


def emit(event: str, **labels: Any) -> None:
    """Record ``event`` and pass it to every listener (listener errors are logged, not raised)."""
    _dispatch(event, labels, _listeners)


def _dispatch(event: str, labels: Mapping[str, Any], to: list[Listener]) -> None:
    actor = str(labels.get("actor", ""))
    with _lock:
        counters[(event, actor)] += 1
        listeners = list(to)
    for listener in listeners:
        try:
            listener(event, labels)
        except Exception:
            logger.exception("metrics listener %r failed", listener)


# -- observed operations (callers, servers) ----------------------------------------------------
#
# ``observe(kind, **labels)`` wraps one operation (a ``.call()``, a Streams request served, ...):
# the scope factories registered by :mod:`rpc_tasks.observability` (a span, an in-flight gauge)
# are entered around it, and the event ``kind`` is emitted at the end with ``outcome`` and
# ``duration`` (seconds). With nothing registered it costs one flag check.

#: What an observed operation ended with: ``ok``, ``timeout``, ``connection``, an error code.
OUTCOME_OK = "ok"


class Scope(Protocol):
    """Something a scope factory started for one operation (a span, a gauge increment)."""

    def finish(self, outcome: str, error: BaseException | None, duration: float) -> None:
        """The operation ended with ``outcome`` (and ``error``, if it raised) after
        ``duration`` seconds."""


ScopeFactory = Callable[[str, Mapping[str, Any]], "Scope | None"]
TraceInjector = Callable[[], "dict[str, str] | None"]

_scope_factories: list[ScopeFactory] = []
_injectors: list[TraceInjector] = []
_current: contextvars.ContextVar[Observation | None] = contextvars.ContextVar("rpc_tasks_obs", default=None)
#: True while an operation listener or a scope factory is registered (read without the lock).
active = False


def _refresh() -> None:
    global active
    active = bool(_op_listeners or _scope_factories)


def add_scope_factory(factory: ScopeFactory) -> None:
    """Call ``factory(kind, labels)`` when an observed operation starts; the returned
    :class:`Scope` (or ``None``) is finished when it ends. Used by :mod:`rpc_tasks.observability`."""
    with _lock:
        if factory not in _scope_factories:
            _scope_factories.append(factory)
        _refresh()


def remove_scope_factory(factory: ScopeFactory) -> None:
    """Stop calling ``factory``."""
    with _lock:
        if factory in _scope_factories:
            _scope_factories.remove(factory)
        _refresh()


def set_trace_injector(injector: TraceInjector | None) -> None:
    """Install (or with ``None`` remove) the function that returns the current trace context
    as a carrier dict (W3C ``traceparent``/``tracestate``), for protocols that carry it."""
    with _lock:
        _injectors[:] = [] if injector is None else [injector]


def trace_context() -> dict[str, str] | None:
    """The current trace context to send along with a request (``None`` without tracing)."""
    if not _injectors:
        return None
    try:
        return _injectors[0]()
    except Exception:
        logger.exception("trace context injector failed")
        return None


def outcome_of(error: BaseException) -> str:
    """The outcome label of an operation that raised ``error``: the remote error code,
    ``timeout``, ``connection``, ``validation_error``, ``cancelled`` (an awaited call whose
    task was cancelled) or ``error``."""
    if isinstance(error, RPCRemoteError):
        return error.error.wire_code
    if isinstance(error, RPCTimeoutError):
        return "timeout"
    if isinstance(error, RPCConnectionError):
        return "connection"
    if isinstance(error, ValidationError):
        return "validation_error"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "error"


class Observation:
    """One observed operation; use as a context manager (see :func:`observe`)."""

    __slots__ = ("_token", "kind", "labels", "outcome", "scopes", "started")

    def __init__(self, kind: str, labels: dict[str, Any]) -> None:
        self.kind = kind
        self.labels = labels
        self.outcome: str | None = None
        self.scopes: list[Scope] = []
        self.started = 0.0
        self._token: contextvars.Token[Observation | None] | None = None

    def __enter__(self) -> Observation:
        for factory in list(_scope_factories):
            try:
                scope = factory(self.kind, self.labels)
            except Exception:
                logger.exception("metrics scope factory %r failed", factory)
                continue
            if scope is not None:
                self.scopes.append(scope)
        self._token = _current.set(self)
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, error: BaseException | None, tb: Any) -> None:
        duration = time.perf_counter() - self.started
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # an abandoned coroutine closed outside its task: end the scopes anyway
                pass
        outcome = self.outcome or (outcome_of(error) if error is not None else OUTCOME_OK)
        for scope in reversed(self.scopes):
            try:
                scope.finish(outcome, error, duration)
            except Exception:
                logger.exception("metrics scope %r failed", scope)
        if _op_listeners:
            _dispatch(self.kind, {"outcome": outcome, "duration": duration, **self.labels}, _op_listeners)


class _NoObservation:
    """What :func:`observe` returns when nothing listens (no work at all)."""

    __slots__ = ()
    outcome = None

    def __enter__(self) -> _NoObservation:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_NOTHING = _NoObservation()


def observe(kind: str, **labels: Any) -> Observation | _NoObservation:
    """A context manager around one operation of ``kind`` (``call``, ``call_many``, ``send``,
    ``stream_call``, ``serve``): scopes are entered, and at the end the event ``kind`` is emitted
    with ``outcome`` and ``duration``. Free when nothing is registered."""
    if not active:
        return _NOTHING
    return Observation(kind, labels)


def set_outcome(outcome: str) -> None:
    """Set the outcome of the innermost running observation (e.g. an error code sent back
    as a reply rather than raised)."""
    current = _current.get()
    if current is not None:
        current.outcome = outcome


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _take_list_outcome(obs: Observation, result: Any) -> None:
    """A list result holding RPC exceptions (``return_exceptions=True``) takes the first one's
    outcome."""
    if isinstance(result, list):
        failed = next((r for r in result if isinstance(r, RPCException)), None)
        if failed is not None:
            obs.outcome = outcome_of(failed)


def observed(kind: str, labels: Callable[..., dict[str, Any]]) -> Callable[[F], F]:
    """Method decorator: run the method inside ``observe(kind, **labels(self, *args, **kwargs))``.
    A list result holding RPC exceptions (``call_many(return_exceptions=True)``) takes the first
    one's outcome."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not active:
                return fn(*args, **kwargs)
            with Observation(kind, labels(*args, **kwargs)) as obs:
                result = fn(*args, **kwargs)
                _take_list_outcome(obs, result)
                return result

        return cast(F, wrapper)

    return decorator


async def observing(kind: str, labels: dict[str, Any], awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` inside ``observe(kind, **labels)``: the async twin of
    :func:`observed`, for coroutines (``acall``, the async Streams client).

    The observation (its span made current, its gauge) is entered when this coroutine starts
    and left when it ends, both in the awaiting task's context, so ``awaitable`` (and the
    ``before_enqueue`` hooks it runs) sees the span as current. Wrap only when :data:`active`:
    this is one more coroutine frame per waiting call."""
    with Observation(kind, labels) as obs:
        result = await awaitable
        _take_list_outcome(obs, result)
        return result


def observed_async(kind: str, labels: Callable[..., dict[str, Any]]) -> Callable[[F], F]:
    """Decorator of an ``async def`` method: it stays an ``async def`` (so
    ``inspect.iscoroutinefunction`` and mocks see a coroutine function on every Python), and
    awaits the method inside :func:`observing` while something is registered."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not active:
                return await fn(*args, **kwargs)
            return await observing(kind, labels(*args, **kwargs), fn(*args, **kwargs))

        return cast(F, wrapper)

    return decorator
