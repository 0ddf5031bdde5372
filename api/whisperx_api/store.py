"""Redis layout shared by the status writers and the gateways (docs/architecture.md).

Bulk data (transcripts, logs) and the Replicate-facing record live here, never in etcd.
Every record change is published on one channel so gateways can wake `Prefer: wait`
requests without polling.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from whisperx_api.records import PredictionRecord

# Connecting to Redis (and closing a connection) may take this long before it fails.
CONNECT_SECONDS = 5.0
EVENTS_CHANNEL = "wx:events"
ReportOrder = Literal["new", "replay", "superseded"]
_REPORT_ORDERS: dict[int, ReportOrder] = {1: "new", 0: "replay", -1: "superseded"}
WEBHOOKS_DUE = "wx:wh:due"


def _key(namespace: str, prediction_id: str, part: str) -> str:
    return f"wx:p:{namespace}:{prediction_id}:{part}"


def index_key(namespace: str) -> str:
    return f"wx:idx:{namespace}"


def output_key(namespace: str, prediction_id: str) -> str:
    return _key(namespace, prediction_id, "out")


def _delivery_key(delivery_id: str) -> str:
    return f"wx:wh:d:{delivery_id}"


# Orders a runner report (atomic on the server). Each runner attempt (a pod of the Job)
# numbers its reports from 1; the hash keeps the current attempt and the last sequence
# number applied per attempt. 1: apply; 0: a replay within its attempt; -1: the report of
# an attempt that a newer one has replaced (attempts are ordered by their first report).
_ORDER_REPORT = """
local current = redis.call('HGET', KEYS[1], 'current')
local field = 'seq:' .. ARGV[1]
if current and current ~= ARGV[1] and redis.call('HEXISTS', KEYS[1], field) == 1 then
  return -1
end
local seq = tonumber(ARGV[2])
if seq <= tonumber(redis.call('HGET', KEYS[1], field) or '0') then
  return 0
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], field, seq)
return 1
"""

# Enqueues a delivery unless one with the same `once` marker was enqueued before, so a
# terminal webhook re-sent after a crash-and-resume is queued exactly once.
_ENQUEUE_ONCE = """
if ARGV[1] ~= '' then
  if redis.call('SET', ARGV[1], '1', 'NX') == false then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'url', ARGV[2], 'body', ARGV[3], 'event', ARGV[4],
           'ns', ARGV[5], 'id', ARGV[6], 'attempts', 0)
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
return 1
"""

# Takes due deliveries and leases them (pushes their due time forward) in one step, so
# two delivery loops never send the same attempt.
_LEASE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
end
return ids
"""


# What a prediction's logs may take in Redis (and in every answer that carries them):
# runners write progress lines, a few KiB per run; past this only a marker is added.
MAX_LOGS_BYTES = 1 << 20
LOGS_TRUNCATED = "\n[logs truncated: more than {} bytes]\n"

# Appends to the logs up to the cap, cutting at a UTF-8 character boundary (the
# connection decodes replies as text), and adds the marker once when it cuts.
_APPEND_LOGS = """
local len, cap, text = redis.call('STRLEN', KEYS[1]), tonumber(ARGV[1]), ARGV[2]
if len >= cap then
  return len
end
if len + #text > cap then
  local n = cap - len
  local next = string.byte(text, n + 1)
  while n > 0 and next >= 128 and next < 192 do
    n = n - 1
    next = string.byte(text, n + 1)
  end
  text = string.sub(text, 1, n) .. ARGV[3]
end
return redis.call('APPEND', KEYS[1], text)
"""


@dataclass
class PredictionView:
    record: PredictionRecord
    output: Any
    logs: str


@dataclass
class RawPredictionView:
    """A view that keeps the record and output as the JSON text Redis holds: answers
    can embed the output as is (parsing and re-encoding a long transcript would dominate
    a read), and the record is parsed only when used."""

    record_json: str
    output_json: str | None
    logs: str

    @functools.cached_property
    def record(self) -> PredictionRecord:
        return PredictionRecord.from_json(json.loads(self.record_json))

    @classmethod
    def of(cls, record: PredictionRecord, output_json: str | None, logs: str) -> RawPredictionView:
        """A view of a record not read from Redis (its `record_json` is empty)."""
        view = cls("", output_json, logs)
        view.__dict__["record"] = record
        return view


@dataclass
class WebhookDelivery:
    id: str
    url: str
    body: str
    event: str
    namespace: str
    prediction_id: str
    attempts: int = 0


class Store:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._order_report = client.register_script(_ORDER_REPORT)
        self._lease_due = client.register_script(_LEASE_DUE)
        self._enqueue_once = client.register_script(_ENQUEUE_ONCE)
        self._append_logs = client.register_script(_APPEND_LOGS)

    @classmethod
    def from_url(cls, url: str, max_connections: int | None = None) -> Store:
        """With `max_connections`, a pool that waits (up to 5 s) for a free connection
        when all are busy, instead of failing the command at once."""
        # The connect timeout also bounds closing a connection, which can otherwise wait
        # forever for the socket to drain (redis-py #3941; seen as a rare hang at shutdown).
        if max_connections is None:
            return cls(
                aioredis.Redis.from_url(
                    url, decode_responses=True, socket_connect_timeout=CONNECT_SECONDS
                )
            )
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            decode_responses=True,
            socket_connect_timeout=CONNECT_SECONDS,
        )
        return cls(aioredis.Redis.from_pool(pool))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    # --- records ---

    async def put_record(self, record: PredictionRecord) -> None:
        """Stores the record, indexes it for listing, and tells waiting gateways."""
        created = record.state.created_at
        score = created.timestamp() if created else time.time()
        event = {"ns": record.namespace, "id": record.id, "status": record.state.phase.value}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_key(record.namespace, record.id, "rec"), json.dumps(record.to_json()))
            pipe.zadd(index_key(record.namespace), {record.id: score})
            pipe.publish(EVENTS_CHANNEL, json.dumps(event))
            await pipe.execute()

    async def get_record(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        raw = await self.redis.get(_key(namespace, prediction_id, "rec"))
        return PredictionRecord.from_json(json.loads(raw)) if raw else None

    async def get_view(self, namespace: str, prediction_id: str) -> PredictionView | None:
        """Record, output and logs in one round trip, parsed."""
        raw = await self.get_raw_view(namespace, prediction_id)
        if raw is None:
            return None
        output = json.loads(raw.output_json) if raw.output_json else None
        return PredictionView(record=raw.record, output=output, logs=raw.logs)

    async def get_raw_view(self, namespace: str, prediction_id: str) -> RawPredictionView | None:
        """Like `get_view` (one round trip), with the output left as JSON text."""
        rec, out, logs = await self.redis.mget(self._view_keys(namespace, prediction_id))
        if rec is None:
            return None
        return RawPredictionView(str(rec), str(out) if out else None, str(logs or ""))

    async def get_raw_views(self, namespace: str, ids: list[str]) -> list[RawPredictionView | None]:
        """Like `get_raw_view` for each of `ids` (None: no record), in one round trip."""
        if not ids:
            return []
        keys = [key for pid in ids for key in self._view_keys(namespace, pid)]
        values = await self.redis.mget(keys)
        return [
            None
            if rec is None
            else RawPredictionView(str(rec), str(out) if out else None, str(logs or ""))
            for rec, out, logs in zip(values[0::3], values[1::3], values[2::3], strict=True)
        ]

    async def stored_sizes(self, namespace: str, ids: list[str]) -> list[int]:
        """The bytes Redis holds for each prediction's record, output and logs (STRLEN,
        one round trip): what reading them would take, known before reading them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for prediction_id in ids:
                for key in self._view_keys(namespace, prediction_id):
                    pipe.strlen(key)
            lengths = [int(n) for n in await pipe.execute()]
        return [sum(lengths[i : i + 3]) for i in range(0, len(lengths), 3)]

    @staticmethod
    def _view_keys(namespace: str, prediction_id: str) -> tuple[str, str, str]:
        return (
            _key(namespace, prediction_id, "rec"),
            output_key(namespace, prediction_id),
            _key(namespace, prediction_id, "logs"),
        )

    # --- runner data ---

    async def put_output(self, namespace: str, prediction_id: str, output: Any) -> None:
        await self.redis.set(output_key(namespace, prediction_id), json.dumps(output))

    async def append_logs(self, namespace: str, prediction_id: str, text: str) -> None:
        """Appends to the logs, which stop at MAX_LOGS_BYTES (then a marker says so)."""
        if text:
            await self._append_logs(
                keys=[_key(namespace, prediction_id, "logs")],
                args=[MAX_LOGS_BYTES, text, LOGS_TRUNCATED.format(MAX_LOGS_BYTES)],
            )

    async def order_report(
        self, namespace: str, prediction_id: str, attempt: str, seq: int
    ) -> ReportOrder:
        """Whether report `seq` of runner attempt `attempt` is new, and records it if so."""
        order = await self._order_report(
            keys=[_key(namespace, prediction_id, "reports")], args=[attempt, seq]
        )
        return _REPORT_ORDERS[int(order)]

    async def remove_data(self, namespace: str, prediction_id: str) -> None:
        """Drops the output and logs, keeping the record (marked `data_removed`)."""
        record = await self.get_record(namespace, prediction_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                output_key(namespace, prediction_id), _key(namespace, prediction_id, "logs")
            )
            await pipe.execute()
        if record is not None and not record.data_removed:
            record.data_removed = True
            await self.put_record(record)

    async def delete_prediction(self, namespace: str, prediction_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for part in ("rec", "out", "logs", "reports", "wh-completed"):
                pipe.delete(_key(namespace, prediction_id, part))
            pipe.zrem(index_key(namespace), prediction_id)
            await pipe.execute()

    # --- client webhook outbox ---

    async def enqueue_webhook(
        self,
        *,
        url: str,
        body: str,
        event: str,
        namespace: str,
        prediction_id: str,
        once: bool = False,
        due: float | None = None,
    ) -> str | None:
        """Queues a delivery; with `once`, at most one per prediction and event, ever.

        Returns the delivery id, or None when a `once` delivery was queued before.
        """
        delivery_id = f"msg_{uuid.uuid4().hex}"
        marker = _key(namespace, prediction_id, f"wh-{event}") if once else ""
        queued = await self._enqueue_once(
            keys=[_delivery_key(delivery_id), WEBHOOKS_DUE],
            args=[
                marker, url, body, event, namespace, prediction_id,
                time.time() if due is None else due, delivery_id,
            ],
        )  # fmt: skip
        return delivery_id if queued else None

    async def lease_due_webhooks(
        self, *, limit: int = 50, lease_seconds: float = 60.0
    ) -> list[WebhookDelivery]:
        now = time.time()
        ids = await self._lease_due(keys=[WEBHOOKS_DUE], args=[now, limit, now + lease_seconds])
        deliveries = []
        for delivery_id in ids:
            raw = await self.redis.hgetall(_delivery_key(delivery_id))
            data = {str(k): str(v) for k, v in raw.items()}
            if not data:
                await self.redis.zrem(WEBHOOKS_DUE, delivery_id)
                continue
            deliveries.append(
                WebhookDelivery(
                    id=delivery_id,
                    url=data["url"],
                    body=data["body"],
                    event=data["event"],
                    namespace=data["ns"],
                    prediction_id=data["id"],
                    attempts=int(data.get("attempts", 0)),
                )
            )
        return deliveries

    async def finish_webhook(self, delivery_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(WEBHOOKS_DUE, delivery_id)
            pipe.delete(_delivery_key(delivery_id))
            await pipe.execute()

    async def retry_webhook(self, delivery_id: str, attempts: int, due: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_delivery_key(delivery_id), "attempts", attempts)
            pipe.zadd(WEBHOOKS_DUE, {delivery_id: due})
            await pipe.execute()

    async def pending_webhooks(self) -> int:
        return int(await self.redis.zcard(WEBHOOKS_DUE))
