"""Client webhooks, signed as Replicate signs them (the Standard Webhooks scheme).

Deliveries go through a Redis outbox (`Store.enqueue_webhook`), so a terminal webhook
queued before an operator restart is still delivered after it. Terminal deliveries are
retried with exponential backoff; `start`, `output` and `logs` are best effort, as on
Replicate.

Each tenant (namespace) has its own signing secret, derived from the master secret, so a
tenant cannot forge webhooks to another. Targets are client-chosen URLs: they get the
address guard (`netguard`), and redirects are not followed (a 3xx answer is a failed
attempt), so no answer can steer a signed body to an internal address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import aiohttp
from redis.exceptions import RedisError

from whisperx_api.netguard import AddressRefused, HostAllowList, check_url
from whisperx_api.outage import Outage
from whisperx_api.resolver import GuardedResolver
from whisperx_api.store import Store, WebhookDelivery

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# Hosts or CIDRs webhook targets may reach although they are not public.
ALLOW_HOSTS_ENV = "WHISPERX_WEBHOOK_ALLOW_HOSTS"
THROTTLED_EVENTS = frozenset({"logs", "output"})
THROTTLE_SECONDS = 0.5


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def tenant_secret(master: str, namespace: str) -> str:
    """The signing secret of one namespace's webhooks (what its
    `GET /v1/webhooks/default/secret` returns), derived from the master secret."""
    digest = hmac.new(_secret_bytes(master), f"webhooks/{namespace}".encode(), hashlib.sha256)
    return SECRET_PREFIX + base64.b64encode(digest.digest()).decode()


def allow_list(env: Mapping[str, str] | None = None) -> HostAllowList:
    """WHISPERX_WEBHOOK_ALLOW_HOSTS: where webhooks may go although not public."""
    return HostAllowList.parse((os.environ if env is None else env).get(ALLOW_HOSTS_ENV, ""))


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    signed = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, message_id: str, body: str, timestamp: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(secret, message_id, ts, body),
    }


class Throttle:
    """At most one `logs`/`output` webhook per prediction every 500 ms."""

    def __init__(self, interval: float = THROTTLE_SECONDS) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def allow(
        self, namespace: str, prediction_id: str, event: str, now: float | None = None
    ) -> bool:
        if event not in THROTTLED_EVENTS:
            return True
        current = time.monotonic() if now is None else now
        key = (namespace, prediction_id)
        if current - self._last.get(key, float("-inf")) < self.interval:
            return False
        self._last[key] = current
        return True

    def forget(self, namespace: str, prediction_id: str) -> None:
        self._last.pop((namespace, prediction_id), None)


def wanted(event: str, events_filter: Iterable[str]) -> bool:
    """Replicate always sends `completed`; other events only when the filter lists them."""
    return event == "completed" or event in set(events_filter)


def backoff_seconds(attempts: int) -> float:
    return float(min(2**attempts, 300))


class WebhookSender:
    """Delivers due outbox entries; run one per status writer process."""

    def __init__(
        self,
        store: Store,
        secret: str,
        *,
        allow: HostAllowList | None = None,
        max_attempts: int = 12,
        timeout: float = 10.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.store = store
        self.secret = secret
        self.allow = allow_list() if allow is None else allow
        self.max_attempts = max_attempts
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after an enqueue so a delivery does not wait for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow))
        # trust_env=False: a proxy from the environment would bypass the address guard.
        async with aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, trust_env=False
        ) as session:
            outage = Outage(log, "webhook outbox (Redis)", base_delay=self.poll_interval)
            while True:
                try:
                    due = await self.store.lease_due_webhooks()
                except (RedisError, OSError) as exc:
                    await asyncio.sleep(outage.failed(exc))
                    continue
                except Exception as exc:
                    # Not an outage but a bug: its traceback, then the loop goes on.
                    log.exception("leasing due webhooks failed")
                    await asyncio.sleep(outage.failed(exc))
                    continue
                outage.recovered()
                if due:
                    results = await asyncio.gather(
                        *(self._deliver(session, d) for d in due), return_exceptions=True
                    )
                    for delivery, result in zip(due, results, strict=True):
                        if isinstance(result, Exception):
                            # Its lease expires and it is retried; the loop goes on.
                            log.error("webhook %s: %r", delivery.id, result)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()

    async def _deliver(self, session: aiohttp.ClientSession, delivery: WebhookDelivery) -> None:
        secret = tenant_secret(self.secret, delivery.namespace)
        headers = signed_headers(secret, delivery.id, delivery.body)
        refused = False
        try:
            # The resolver guards names; IP literals and `localhost` never reach it.
            check_url(delivery.url, self.allow)
            async with session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False
            ) as resp:
                ok = 200 <= resp.status < 300
                detail = f"HTTP {resp.status}"
        except AddressRefused as exc:
            ok, refused, detail = False, True, f"{exc} (see {ALLOW_HOSTS_ENV})"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # ValueError: a URL aiohttp cannot send to (e.g. credentials it cannot
            # encode); it must fail this delivery only, never the delivery loop.
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        if ok:
            await _written_back(lambda: self.store.finish_webhook(delivery.id))
            return
        if refused or delivery.event != "completed" or attempts >= self.max_attempts:
            log.warning(
                "webhook %s for %s/%s (%s) dropped after %d attempt(s): %s",
                delivery.id, delivery.namespace, delivery.prediction_id, delivery.event,
                attempts, detail,
            )  # fmt: skip
            await _written_back(lambda: self.store.finish_webhook(delivery.id))
            return
        log.info("webhook %s failed (%s); retry %d", delivery.id, detail, attempts)
        due = time.time() + backoff_seconds(attempts)
        await _written_back(lambda: self.store.retry_webhook(delivery.id, attempts, due))


async def _written_back(write: Callable[[], Awaitable[None]], tries: int = 3) -> None:
    """A delivery's outcome, written back to the outbox. A pooled connection that died
    with a Redis restart fails once: the next try reconnects, rather than leaving the
    delivery leased (and its retry a minute away) until the lease expires."""
    for attempt in range(tries):
        try:
            await write()
            return
        except (RedisError, OSError):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
