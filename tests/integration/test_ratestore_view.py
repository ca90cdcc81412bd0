"""The local view of shared cooldowns (``RateStore.cooldown_left_fast``) on real Redis."""

from __future__ import annotations

import pytest
import redis

from rpc_tasks.redis.ratestore import RateStore, cooldown_key

from .support import unique, wait_until

pytestmark = pytest.mark.redis


def test_ended_cooldowns_of_one_off_keys_leave_the_local_view(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RateStore(client, events_channel=unique("rpc_tasks:rate:test") + ":events")
    try:
        assert store.cooldown_left_fast(cooldown_key("warm-up")) == 0
        wait_until(store._view_ready.is_set, 10)
        keys = [cooldown_key(unique("tenant")) for _ in range(2000)]
        for key in keys:
            store.open_cooldown(key, 200)
        wait_until(lambda: len(store._view) >= 2000, 10)  # the view learnt of every one
        wait_until(lambda: len(store._view) == 0, 10)  # and drops them once they ended
        assert all(store.cooldown_left_fast(key) == 0 for key in keys[:10])
    finally:
        client.close()
