"""Redis, shared by the features above it.

* :mod:`.connection` - pools, kept connections, lean pipelines and blocking reads;
* :mod:`.replies` - reply lists (:class:`ReplyChannel`);
* :mod:`.ratestore` - cooldowns and the proactive limiter (:class:`RateStore`);
* :mod:`.broker` - :class:`BlockingRedisBroker`, Dramatiq's ``RedisBroker`` whose idle consumers
  block instead of polling (the only module that touches Dramatiq's internals).

Nothing is imported here, so ``import rpc_tasks.redis.replies`` does not pull in Dramatiq.
"""
