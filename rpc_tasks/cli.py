"""``rpc-tasks`` command line.

* ``rpc-tasks serve --app myapp.rpc:server`` runs an :class:`~rpc_tasks.streams.server.RPCServer`
  (``module:attribute``; the attribute may also be a function returning the server) until
  SIGTERM/SIGINT, then stops gracefully (in-flight requests finish and are acked).
* ``rpc-tasks health [--timeout 5]`` exits 0 when a server answers ``ping``, 1 otherwise.
* ``rpc-tasks ws --host 127.0.0.1 --port 8765`` runs the WebSocket server
  (:mod:`rpc_tasks.websocket.server`).
* ``serve`` and ``ws`` take ``--metrics-port`` (Prometheus ``/metrics``, rpc-tasks[prometheus])
  and ``--tracing`` (OpenTelemetry spans, rpc-tasks[otel]).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any

from pydantic import ValidationError

from .config import get_config
from .exceptions import RPCConfigurationError, RPCConnectionError

DESCRIPTION = """\
Run the rpc-tasks servers, or check that one answers.

  rpc-tasks serve --app myapp.rpc:server   serve an RPCServer (Redis Streams) until SIGTERM
  rpc-tasks health [--timeout 5]           exit 0 when a server answers ping, 1 otherwise
  rpc-tasks ws [--host H --port P]         run the WebSocket server (rpc-tasks[websocket])

Settings come from WEBSOCKET_RPC_<FIELD> environment variables (REDIS_URL as a fallback for
the Redis URL) or, inside Django, from settings.WEBSOCKET_RPC. Dramatiq workers are started
with Dramatiq's own command: dramatiq myapp.tasks.
"""


class UsageError(Exception):
    """A mistake in the command line or the settings: reported in one line, exit status 2."""


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (calling it if it is a factory function). The current
    folder is importable, as with the ``dramatiq`` command."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app must look like 'package.module:attribute', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(
                f"cannot import {module_name!r} (from {spec!r}): run rpc-tasks in the folder that "
                "holds it, or add that folder to PYTHONPATH"
            ) from exc
        raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_name!r} has no attribute {attr!r} (from --app {spec!r})") from None
    from .streams.server import RPCServer

    if not isinstance(obj, RPCServer) and callable(obj):
        obj = obj()
    if not isinstance(obj, RPCServer):
        raise UsageError(f"--app {spec!r} is a {type(obj).__name__}, not an RPCServer")
    return obj


def _start_observability(args: argparse.Namespace) -> None:
    """``--metrics-port``: Prometheus metrics on ``/metrics`` (rpc-tasks[prometheus]);
    ``--tracing``: spans to the global OpenTelemetry provider (rpc-tasks[otel])."""
    if args.tracing:
        from .observability.tracing import enable_tracing, tracing_available

        if not tracing_available():
            raise UsageError("--tracing needs OpenTelemetry: pip install 'rpc-tasks[otel]'")
        enable_tracing()
    if args.metrics_port is None:
        return
    from .observability.prometheus import metrics_available, start_metrics_server

    if not metrics_available():
        raise UsageError("--metrics-port needs prometheus_client: pip install 'rpc-tasks[prometheus]'")
    port = start_metrics_server(args.metrics_port, args.metrics_host)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", args.metrics_host, port)


def _add_observability_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (/metrics; needs rpc-tasks[prometheus])",
    )
    parser.add_argument(
        "--metrics-host", default="0.0.0.0", help="interface of the metrics endpoint (default: 0.0.0.0)"
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="record OpenTelemetry spans (needs rpc-tasks[otel] and an SDK, e.g. opentelemetry-instrument)",
    )


def _serve(args: argparse.Namespace) -> int:
    server = load_object(args.app)
    _start_observability(args)
    if args.concurrency:
        server.concurrency = args.concurrency
    if args.consumer_name:
        server.consumer_name = args.consumer_name

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        server.stop(timeout=0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def _health(args: argparse.Namespace) -> int:
    from .streams.client import WebSocketRPCClient

    config = get_config()
    where = (
        f"redis={config.redacted()['redis_url']} stream={config.request_stream} group={config.consumer_group}"
    )
    client = WebSocketRPCClient(config)
    try:
        if not client.replies.ping():
            print(
                f"{where}: Redis is not reachable (check the Redis URL, REDIS_URL or WEBSOCKET_RPC_REDIS_URL)"
            )
            return 1
        ok = client.health_check(timeout=args.timeout)
    finally:
        client.close()
    if ok:
        print(f"{where}: a server answered ping")
        return 0
    print(
        f"{where}: Redis answers, but no server answered ping within {args.timeout:g}s "
        "(is rpc-tasks serve running?)"
    )
    return 1


def _ws(args: argparse.Namespace) -> int:
    from .websocket.server import WebSocketServer

    _start_observability(args)
    server = WebSocketServer(
        get_config(),
        host=args.host or None,
        port=args.port,
        instance_id=args.instance_id or None,
        serve_rpc=not args.no_rpc,
        presence_ttl=args.presence_ttl,
        auth_timeout=args.auth_timeout,
        jwt_audience=args.jwt_audience or None,
        jwt_issuer=args.jwt_issuer or None,
    )
    server.run_forever()
    return 0


def _version() -> str:
    from . import __version__

    return f"rpc-tasks {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The ``rpc-tasks`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="rpc-tasks", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default: INFO)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,health,ws}")
    serve = sub.add_parser("serve", help="serve an RPCServer (Redis Streams consumer) until SIGTERM/SIGINT")
    serve.add_argument(
        "--app", required=True, help="module:attribute of an RPCServer, or of a function returning one"
    )
    serve.add_argument(
        "--concurrency", type=int, default=0, help="handler threads (default: the server's own)"
    )
    serve.add_argument(
        "--consumer-name", default="", help="consumer name in the group (default: host-pid-random)"
    )
    _add_observability_options(serve)
    serve.set_defaults(func=_serve)
    health = sub.add_parser("health", help="exit 0 if a server answers ping, 1 otherwise")
    health.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)"
    )
    health.set_defaults(func=_health)
    ws = sub.add_parser("ws", help="run the WebSocket server (needs rpc-tasks[websocket])")
    ws.add_argument("--host", default="", help="interface to listen on (default: from websocket_url)")
    ws.add_argument("--port", type=int, default=None, help="port to listen on (default: from websocket_url)")
    ws.add_argument("--instance-id", default="", help="unique name of this instance (default: random)")
    ws.add_argument(
        "--no-rpc", action="store_true", help="do not consume the request stream in this instance"
    )
    ws.add_argument(
        "--presence-ttl", type=int, default=30, help="seconds a socket stays online without a heartbeat"
    )
    ws.add_argument(
        "--auth-timeout",
        type=float,
        default=10.0,
        help="seconds a socket without a token has to send django-ipc's 'Bearer <JWT>' frame",
    )
    ws.add_argument("--jwt-audience", default="", help="tokens must carry this 'aud' claim")
    ws.add_argument("--jwt-issuer", default="", help="tokens must carry this 'iss' claim")
    _add_observability_options(ws)
    ws.set_defaults(func=_ws)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rpc-tasks`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result: int = args.func(args)
    except (UsageError, RPCConfigurationError, ValidationError) as exc:
        if args.debug:
            raise
        print(f"rpc-tasks {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RPCConnectionError as exc:
        if args.debug:
            raise
        print(f"rpc-tasks {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
