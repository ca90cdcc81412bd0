"""Redis beyond one server: Sentinel and Cluster URLs, their clients, and key routing.

Two URL forms, besides redis-py's own ``redis://``, ``rediss://`` and ``unix://``:

* ``redis+sentinel://[user:password@]host:26379[,host2:26379...]/<service>[/<db>][?options]``
  (``rediss+sentinel://`` for TLS to the master): a client of the master that the sentinels
  name; after a failover its connections go to the new master. ``password`` is the master's;
  ``sentinel_password=`` (option) is the sentinels' own, if they need one.
* ``redis+cluster://[user:password@]host:7000[,host:7001...][/][?options]``
  (``rediss+cluster://`` for TLS): a :class:`redis.cluster.RedisCluster` discovering the slot
  map from those startup nodes (database 0 only).

Options are redis-py's URL options (``socket_timeout``, ``socket_connect_timeout``,
``health_check_interval``, ``ssl_cert_reqs``, ...). One client is built per Sentinel URL and
process, so a broker and a reply channel given the same URL share it (the reply then travels
with the ack, see :func:`rpc_tasks.redis.connection.same_redis`).

Cluster routing: the hot paths send raw commands on one connection (one write, one read), so
on a cluster they need the connection of the node that owns the key's slot
(:func:`node_client`), and they must follow a slot that moved: :func:`on_cluster_node` runs a
function on the owner and, on ``MOVED`` (the slot moved) or ``ASK`` (it is moving), refreshes
the slot map and tries again until the deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, RedisClusterException, RedisError, TryAgainError
from redis.sentinel import Sentinel

from ..config import redact_url
from ..exceptions import RPCConfigurationError, RPCConnectionError

__all__ = [
    "CLUSTER_SCHEMES",
    "SENTINEL_SCHEMES",
    "Topology",
    "async_client",
    "is_cluster",
    "is_topology_url",
    "node_client",
    "on_cluster_node",
    "parse_topology_url",
    "sync_client",
]

#: URL schemes of a Sentinel-managed master.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: URL schemes of a Redis Cluster.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Pause before asking again while a slot is being migrated (``ASK``).
ASK_RETRY_SECONDS = 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class Topology:
    """A parsed Sentinel or Cluster URL."""

    kind: str  #: ``"sentinel"`` or ``"cluster"``
    nodes: tuple[tuple[str, int], ...]  #: sentinels, or the cluster's startup nodes
    service: str = ""  #: the Sentinel service (master) name
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)  #: connection options (redis-py names)
    sentinel_password: str | None = None
    #: ``wait_replicas=N`` (Sentinel): the broker ``WAIT``s for N replicas after each ``.send()``.
    wait_replicas: int = 0


def is_topology_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` or ``redis+cluster://`` URL (or their ``rediss+``)."""
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES + CLUSTER_SCHEMES


def is_cluster(client: Any) -> bool:
    """True when ``client`` is a Redis Cluster client (sync or async)."""
    return isinstance(client, _CLUSTER_CLASSES)


def parse_topology_url(url: str) -> Topology:
    """Parse a Sentinel or Cluster URL; a bad one raises :class:`RPCConnectionError`."""
    try:
        return _parse(url)
    except (ValueError, IndexError) as exc:
        raise RPCConnectionError(f"bad Redis URL {redact_url(url)!r}: {exc}") from None


def sync_client(url: str, *, max_connections: int = 50, pool_timeout: float = 10.0, **kwargs: Any) -> Any:
    """The redis-py client for a Sentinel URL (a :class:`redis.Redis` on the master, one per URL
    and process) or a Cluster URL (a :class:`redis.cluster.RedisCluster`)."""
    topo = parse_topology_url(url)
    options = {"socket_keepalive": True, "socket_connect_timeout": 5.0, **topo.options, **kwargs}
    if topo.kind == "cluster":
        try:
            return RedisCluster(
                startup_nodes=[_ClusterNode(host, port) for host, port in topo.nodes],
                max_connections=max_connections,
                **options,
            )
        except (RedisError, RedisClusterException) as exc:
            raise RPCConnectionError(f"could not reach Redis Cluster {redact_url(url)!r}: {exc}") from exc
    # Shared per master and options (broker-only options such as wait_replicas left out).
    shared_key = repr((topo.nodes, topo.service, topo.db, sorted(options.items()), topo.sentinel_password))
    with _shared_lock:
        client = _shared.get(shared_key)
        if client is None:
            sentinel: Any = _Sentinel(list(topo.nodes), sentinel_kwargs=_sentinel_kwargs(topo, options))
            client = _shared[shared_key] = sentinel.master_for(
                topo.service, db=topo.db, max_connections=max_connections, **options
            )
        return client


def async_client(url: str, *, max_connections: int = 50, **kwargs: Any) -> Any:
    """The ``redis.asyncio`` twin of :func:`sync_client` (not shared: one per event loop user)."""
    from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    topo = parse_topology_url(url)
    opts = {"socket_keepalive": True, "socket_connect_timeout": 5.0, **topo.options, **kwargs}
    if topo.kind == "cluster":
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in topo.nodes],
            max_connections=max_connections,
            **opts,
        )
    sentinel: Any = cast(Any, AsyncSentinel)(list(topo.nodes), sentinel_kwargs=_sentinel_kwargs(topo, opts))
    return sentinel.master_for(topo.service, db=topo.db, max_connections=max_connections, **opts)


def broker_options(options: dict[str, Any], wait_replicas: int = 0) -> tuple[dict[str, Any], int]:
    """A Redis broker's keyword arguments with a Sentinel ``url`` replaced by the shared master
    client (see :func:`sync_client`), and its ``wait_replicas`` (the argument, else the URL's).
    A Cluster URL raises :class:`RPCConfigurationError`: Dramatiq's Redis broker cannot run on
    one (its scripts touch keys of many slots)."""
    url = str(options["url"])
    topo = parse_topology_url(url)
    if topo.kind == "cluster":
        raise RPCConfigurationError(
            f"{redact_url(url)!r}: Dramatiq's Redis broker cannot run on Redis Cluster (its scripts touch "
            "keys of many slots); use RabbitMQ (amqp://) for messages and keep the cluster for replies "
            "and rate limits (redis_url), see docs/scale-out.md"
        )
    return {**options, "url": None, "client": sync_client(url)}, wait_replicas or topo.wait_replicas


def node_client(client: Any, key: str | bytes) -> redis.Redis:
    """The plain client to send raw commands about ``key`` on: ``client`` itself, or for a
    cluster the client of the node that owns ``key``'s slot (per the cached slot map)."""
    if not isinstance(client, RedisCluster):
        return client  # type: ignore[no-any-return]
    try:
        cluster: Any = client
        return cluster.get_redis_connection(cluster.get_node_from_key(key))  # type: ignore[no-any-return]
    except RedisClusterException as exc:
        raise RPCConnectionError(f"no Redis Cluster node for a key: {exc}") from exc


def on_cluster_node(client: Any, key: str | bytes, run: Callable[[redis.Redis], T], deadline: float) -> T:
    """``run(node)`` on the node owning ``key``; on ``MOVED``/``ASK``/``TRYAGAIN`` (``run`` must
    let :class:`redis.exceptions.AskError` and ``TryAgainError`` through) the slot map is
    refreshed and ``run`` tried again (after a short pause for ``ASK`` and ``TRYAGAIN``: the slot
    is being migrated; ``TRYAGAIN`` answers a script whose keys are split between the two
    nodes meanwhile) until ``deadline`` (monotonic).
    ``ASK`` is not followed to the importing node: commands on keys that do not exist yet (a
    reply list) are answered there only after ``ASKING``, and waiting out the migration of one
    slot keeps every path simple."""
    while True:
        try:
            return run(node_client(client, key))
        except (AskError, TryAgainError) as exc:
            client.nodes_manager.initialize()
            if time.monotonic() >= deadline:
                raise RPCConnectionError(f"Redis Cluster slot still moving at the deadline: {exc}") from exc
            if type(exc).__name__ != "MovedError":
                time.sleep(ASK_RETRY_SECONDS)


def slot_key(client: Any, command: tuple[Any, ...]) -> str | None:
    """A key of ``command`` (its first), for routing it on a cluster; ``None`` for keyless."""
    try:
        keys = client._get_command_keys(*command)
    except (RedisError, RedisClusterException):
        return None
    if not keys:
        return None
    first = keys[0]
    return first.decode() if isinstance(first, bytes) else str(first)


# -- private -----------------------------------------------------------------------------------

_CLUSTER_CLASSES = (RedisCluster, AsyncRedisCluster)
# redis-py's untyped constructors and helpers, typed as such once.
_ClusterNode: Any = ClusterNode
_Sentinel: Any = Sentinel
_parse_url: Any = redis.connection.parse_url
_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def _parse(url: str) -> Topology:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ValueError(
            f"not a Sentinel or Cluster URL (schemes: {', '.join(SENTINEL_SCHEMES + CLUSTER_SCHEMES)})"
        )
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    nodes = tuple(_host_port(item, 26379 if "sentinel" in scheme else 6379) for item in hostlist.split(","))
    if not nodes:
        raise ValueError("no host")
    path = [p for p in parts.path.split("/") if p]
    # redis-py parses the options (types, TLS, auth) from an equivalent plain URL.
    plain_scheme = "rediss" if scheme.startswith("rediss") else "redis"
    auth = f"{userinfo}@" if userinfo else ""
    query = parts.query
    sentinel_password: str | None = None
    wait_replicas = 0
    kept = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        if name == "sentinel_password":
            sentinel_password = unquote(value)
        elif name == "wait_replicas":
            wait_replicas = int(value)
        else:
            kept.append(item)
    if scheme in SENTINEL_SCHEMES:
        if not path:
            raise ValueError(
                "the Sentinel service name is missing (redis+sentinel://host:26379/<service>/<db>)"
            )
        service, db = unquote(path[0]), int(path[1]) if len(path) > 1 else 0
    else:
        if path and path != ["0"]:
            raise ValueError("Redis Cluster has database 0 only")
        service, db = "", 0
    plain = f"{plain_scheme}://{auth}{quote(nodes[0][0])}:{nodes[0][1]}/{db}" + (
        f"?{'&'.join(kept)}" if kept else ""
    )
    options = dict(_parse_url(plain))
    for name in ("host", "port", "db", "connection_class"):
        options.pop(name, None)
    if plain_scheme == "rediss":
        options["ssl"] = True
    kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    return Topology(kind, nodes, service, db, options, sentinel_password, wait_replicas)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise ValueError("empty host in the host list")
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    return host, int(port or default_port)


def _sentinel_kwargs(topo: Topology, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options for the sentinels themselves: the socket options, plus their own
    password (never the master's)."""
    kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    if topo.sentinel_password is not None:
        kwargs["password"] = topo.sentinel_password
    return kwargs
