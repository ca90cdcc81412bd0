"""``rpc-tasks`` command line.

* ``rpc-tasks serve --app myapp.rpc:server`` runs an :class:`~rpc_tasks.streams.server.RPCServer`
  (``module:attribute``; the attribute may also be a function returning the server) until
  SIGTERM/SIGINT, then stops gracefully (in-flight requests finish and are acked).
* ``rpc-tasks health [--timeout 5]`` exits 0 when a server answers ``ping``, 1 otherwise.
* ``rpc-tasks ws --host 127.0.0.1 --port 8765`` runs the WebSocket server
  (:mod:`rpc_tasks.websocket.server`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Any

from .config import get_config


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (calling it if it is a factory function)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--app must look like 'package.module:attribute', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    from .streams.server import RPCServer

    if not isinstance(obj, RPCServer) and callable(obj):
        obj = obj()
    if not isinstance(obj, RPCServer):
        raise SystemExit(f"{spec} is not an RPCServer")
    return obj


def _serve(args: argparse.Namespace) -> int:
    server = load_object(args.app)
    if args.concurrency:
        server.concurrency = args.concurrency
    if args.consumer_name:
        server.consumer_name = args.consumer_name

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger("rpc_tasks.cli").info("signal %d: stopping", signum)
        server._stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def _health(args: argparse.Namespace) -> int:
    from .streams.client import WebSocketRPCClient

    config = get_config()
    client = WebSocketRPCClient(config)
    ok = client.health_check(timeout=args.timeout)
    print(
        f"redis={config.redacted()['redis_url']} stream={config.request_stream} "
        f"group={config.consumer_group}: {'a server answered ping' if ok else 'no server answered ping'}"
    )
    return 0 if ok else 1


def _ws(args: argparse.Namespace) -> int:
    from .websocket.server import WebSocketServer

    server = WebSocketServer(
        get_config(),
        host=args.host or None,
        port=args.port,
        instance_id=args.instance_id or None,
        serve_rpc=not args.no_rpc,
        presence_ttl=args.presence_ttl,
    )
    server.run_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rpc-tasks`` command."""
    parser = argparse.ArgumentParser(
        prog="rpc-tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run an RPCServer (stream consumer)")
    serve.add_argument("--app", required=True, help="module:attribute of an RPCServer")
    serve.add_argument("--concurrency", type=int, default=0, help="handler threads")
    serve.add_argument("--consumer-name", default="", help="consumer name in the group")
    serve.set_defaults(func=_serve)
    health = sub.add_parser("health", help="exit 0 if a server answers ping")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=_health)
    ws = sub.add_parser("ws", help="run the WebSocket server (needs rpc-tasks[websocket])")
    ws.add_argument("--host", default="", help="default: from websocket_url")
    ws.add_argument("--port", type=int, default=None, help="default: from websocket_url")
    ws.add_argument("--instance-id", default="", help="unique name of this instance")
    ws.add_argument("--no-rpc", action="store_true", help="do not consume the request stream here")
    ws.add_argument("--presence-ttl", type=int, default=30, help="seconds of presence without heartbeat")
    ws.set_defaults(func=_ws)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
