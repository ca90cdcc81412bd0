"""Sentinel and Cluster URL forms (``rpc_tasks.redis.topology``), without servers."""

from __future__ import annotations

import pytest

from rpc_tasks import RPCConfigurationError, RPCConnectionError, WebSocketRPCConfig, setup_broker
from rpc_tasks.config import redact_url
from rpc_tasks.redis.ratestore import cooldown_key, limiter_keys
from rpc_tasks.redis.topology import is_topology_url, parse_topology_url


def test_sentinel_form_with_password_db_and_options() -> None:
    topo = parse_topology_url(
        "rediss+sentinel://app:pw@10.0.0.1:26380,10.0.0.2/mymaster/3?socket_timeout=2.5"
        "&sentinel_password=sp&wait_replicas=1"
    )
    assert (topo.kind, topo.service, topo.db) == ("sentinel", "mymaster", 3)
    assert topo.nodes == (("10.0.0.1", 26380), ("10.0.0.2", 26379))
    assert topo.options == {"username": "app", "password": "pw", "socket_timeout": 2.5, "ssl": True}
    assert topo.sentinel_password == "sp" and topo.wait_replicas == 1


def test_cluster_form() -> None:
    topo = parse_topology_url("redis+cluster://h1:7000,[::1]:7001/")
    assert topo.kind == "cluster" and topo.nodes == (("h1", 7000), ("::1", 7001)) and topo.db == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",  # no service
        "redis+cluster://h1:7000/2",  # a cluster has db 0 only
        "redis+cluster://h1:notaport/",
        "redis+sentinel://h1:26379,,h2/mymaster",
    ],
)
def test_bad_forms_are_typed_errors(url: str) -> None:
    with pytest.raises(RPCConnectionError, match="bad Redis URL"):
        parse_topology_url(url)


def test_config_accepts_both_forms_and_redacts_the_sentinel_password() -> None:
    for url in ("redis+sentinel://h:26379/m/0", "redis+cluster://h:7000/"):
        assert is_topology_url(WebSocketRPCConfig(redis_url=url).redis_url)
    assert "sp" not in redact_url("redis+sentinel://h:26379/m/0?sentinel_password=sp")


def test_a_cluster_broker_url_is_refused_with_what_to_do() -> None:
    with pytest.raises(RPCConfigurationError, match="amqp://"):
        setup_broker(broker_url="redis+cluster://h:7000/", set_global=False)


def test_rate_limit_keys_share_a_hash_tag() -> None:
    tat, reserve = limiter_keys("crm-api")
    assert tat.endswith("{crm-api}") and reserve.endswith("{crm-api}")
    assert cooldown_key("tenant:7").endswith("{tenant:7}")
