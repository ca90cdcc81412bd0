"""Settings for the test suite: Redis DB 9 and a unique prefix for every Redis name."""

import os
import uuid

os.environ.setdefault("REDIS_URL", os.environ.get("RPC_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"))
os.environ.setdefault("RPC_EXAMPLE_PREFIX", f"djtest{uuid.uuid4().hex[:6]}:")
os.environ.setdefault("DJANGO_DB", ":memory:")

from .settings import *  # noqa: F403
