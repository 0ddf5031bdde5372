"""`Prefer: wait` without polling: one Redis subscription per gateway process.

Status writers publish `{"ns", "id", "status"}` on `wx:events` after every record change.
This hub holds the process's only subscription and wakes the requests waiting on that
prediction. A waiter registers before it reads the record, so an end published between
the read and the wait is never missed; after a lost connection every waiter is woken to
read again, since events may have been dropped meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from whisperx_api.lifecycle import Phase
from whisperx_api.outage import Outage
from whisperx_api.store import EVENTS_CHANNEL, RawPredictionView

log = logging.getLogger(__name__)

_TERMINAL = frozenset(p.value for p in Phase if p.terminal)


class Watch:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """True when woken within `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class EventHub:
    def __init__(self, client: aioredis.Redis, *, reconnect_delay: float = 0.5) -> None:
        self.redis = client
        self.reconnect_delay = reconnect_delay
        self._watches: defaultdict[tuple[str, str], set[Watch]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        # Set when the server stops: held waits answer now instead of delaying the stop.
        self.releasing = False

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._watches.values())

    async def start(self, subscribe_within: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="wx-event-hub")
        with contextlib.suppress(TimeoutError):
            # Serving before subscribing is safe (waiters re-read on connect), only slower.
            async with asyncio.timeout(subscribe_within):
                await self.subscribed.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def watch(self, namespace: str, prediction_id: str) -> Iterator[Watch]:
        key = (namespace, prediction_id)
        watch = Watch()
        self._watches[key].add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(key)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[key]

    def dispatch(self, data: Any) -> None:
        try:
            event = json.loads(data)
            key = (str(event["ns"]), str(event["id"]))
            status = event.get("status")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed event on %s", EVENTS_CHANNEL)
            return
        if status in _TERMINAL:
            for watch in self._watches.get(key, ()):
                watch.notify()

    def release(self) -> None:
        """The server is stopping: every held wait answers at once with what it has."""
        self.releasing = True
        self._wake_all()

    def _wake_all(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.notify()

    async def _run(self) -> None:
        outage = Outage(log, "event subscription (Redis)", base_delay=self.reconnect_delay)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            delay = 0.0
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
                outage.recovered()
                self.subscribed.set()
                self._wake_all()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.dispatch(message["data"])
            except (RedisError, OSError) as exc:
                delay = outage.failed(exc)
            finally:
                self.subscribed.clear()
                self._wake_all()
                # Bounded: closing a pub/sub connection whose listener was just canceled
                # can wait on that listener forever (seen as a rare hang at shutdown).
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(2):
                        await pubsub.aclose()
            await asyncio.sleep(delay)


async def wait_for_end(
    hub: EventHub,
    namespace: str,
    prediction_id: str,
    read: Callable[[], Awaitable[RawPredictionView | None]],
    seconds: float,
) -> tuple[RawPredictionView | None, bool]:
    """The view once the prediction has ended, or the latest one after `seconds`.

    Returns (view, ended).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with hub.watch(namespace, prediction_id) as watch:
        view = await read()
        while view is not None and not view.record.state.terminal:
            remaining = deadline - loop.time()
            if hub.releasing or remaining <= 0 or not await watch.wait(remaining):
                return view, False
            view = await read()
    return view, view is not None
