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


def test_cooldowns_of_another_database_do_not_reach_the_view(redis_url: str, second_redis_url: str) -> None:
    """Pub/Sub spans every database of a server: a cooldown opened by an application on one
    database (say staging) must not hold back the workers of another (production) whose
    cooldown key has the same name. A second store on the same database is the control: the
    announcement does reach it."""
    here, there = redis.Redis.from_url(redis_url), redis.Redis.from_url(second_redis_url)
    opener, same_db, other_db = RateStore(here), RateStore(redis.Redis.from_url(redis_url)), RateStore(there)
    key = cooldown_key(unique("shared-name"))
    try:
        for store in (same_db, other_db):
            assert store.cooldown_left_fast(key) == 0  # asked once; from now on the view answers
            wait_until(store._view_ready.is_set, 10)
            assert store.cooldown_left_fast(key) == 0
        opener.open_cooldown(key, 5000)
        wait_until(lambda: same_db.cooldown_left_fast(key) > 0, 5)  # announced on its database
        assert other_db.cooldown_left_fast(key) == 0
        assert opener.events_channel != other_db.events_channel
        assert there.pttl(key) < 0  # nothing there either
    finally:
        for client in (here, there, same_db.client):
            client.close()
