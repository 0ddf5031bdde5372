"""The webhook sender's write-back of a delivery's outcome to the Redis outbox."""

from __future__ import annotations


async def test_a_delivery_is_written_back_past_one_connection_lost_with_a_redis_restart() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from whisperx_api.webhooks import _written_back

    tries: list[int] = []

    async def write() -> None:
        tries.append(1)
        if len(tries) == 1:
            raise RedisConnectionError("Connection closed by server.")

    await _written_back(write)
    assert len(tries) == 2  # without the retry, the delivery stays leased for a minute
