"""Warm runners: the work protocol, and the fair queue the work is handed out from.

A runner that has loaded its model asks for the next prediction of its hardware profile
with `POST /work/{runner}` (a long poll), signed as the report protocol signs, with the
runner's own credential (derived from the signing key and the runner's id). The answer
is one prediction: its input (secret fields included: they reach this runner for this
prediction only, in memory, never on disk) and that prediction's own report credentials,
so a runner can write status for the prediction it holds and no other. `204`: no work
within the wait; `410`: stop (the supervisor wants no more of this runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WORK_ROUTE = "/work/{runner}"
# A work source's answer meaning "exit" (410 on the wire).
STOP: Literal["stop"] = "stop"
REPORT_ROUTE = "/reports/{namespace}/{id}"
# The longest a runner's request for work is held before it is answered 204.
MAX_WAIT_SECONDS = 60.0


def runner_token(signing_key: bytes, runner_id: str) -> str:
    """A runner's credential for asking for work; worthless for reporting."""
    return hmac.new(signing_key, f"runner:{runner_id}".encode(), hashlib.sha256).hexdigest()


def work_url(base_url: str, runner_id: str) -> str:
    return base_url + WORK_ROUTE.format(runner=runner_id)


def report_url(base_url: str, namespace: str, prediction_id: str) -> str:
    return base_url + REPORT_ROUTE.format(namespace=namespace, id=prediction_id)


class WorkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Seconds to hold the request when no prediction is queued.
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS)] = 20.0
    # The runner's cold start (imports and model load), sent with its first request.
    setup_seconds: Annotated[float | None, Field(ge=0)] = None
    # Predictions this runner has served so far.
    served: Annotated[int, Field(ge=0)] = 0


class Assignment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: str
    id: str
    input: dict[str, Any]
    report_url: str
    report_token: str
    # Names this runner in the prediction's reports (a report sequence of its own).
    attempt: str


class FairQueue:
    """Predictions waiting for a runner: oldest first within a namespace, and namespaces
    served in turn, so one tenant's burst does not starve another's single prediction."""

    def __init__(self) -> None:
        self._by_namespace: dict[str, deque[str]] = {}
        self._turns: deque[str] = deque()

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_namespace.values())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        namespace, prediction_id = key
        return prediction_id in self._by_namespace.get(namespace, ())

    def push(self, namespace: str, prediction_id: str) -> None:
        ids = self._by_namespace.get(namespace)
        if ids is None:
            ids = self._by_namespace[namespace] = deque()
            self._turns.append(namespace)
        ids.append(prediction_id)

    def pop(self) -> tuple[str, str] | None:
        if not self._turns:
            return None
        namespace = self._turns.popleft()
        ids = self._by_namespace[namespace]
        prediction_id = ids.popleft()
        if ids:
            self._turns.append(namespace)
        else:
            del self._by_namespace[namespace]
        return namespace, prediction_id

    def remove(self, namespace: str, prediction_id: str) -> bool:
        ids = self._by_namespace.get(namespace)
        if ids is None or prediction_id not in ids:
            return False
        ids.remove(prediction_id)
        if not ids:
            del self._by_namespace[namespace]
            self._turns.remove(namespace)
        return True


class WorkWaiter:
    """Runners' long polls for work: each waits until work is announced or its wait
    runs out (the same for local mode's runners and the operator's)."""

    def __init__(self) -> None:
        self._work = asyncio.Condition()

    async def announce(self) -> None:
        """Work came (or the source is closing): every waiting runner looks again."""
        async with self._work:
            self._work.notify_all()

    async def poll(
        self,
        wait: float,
        *,
        take: Callable[[], Awaitable[Assignment | None] | None],
        alive: Callable[[], bool],
        idle: Callable[[bool], None],
    ) -> Assignment | Literal["stop"] | None:
        """The next assignment; None when none came within `wait` seconds; STOP once
        `alive()` is false. `take()` is None when nothing is queued, else the
        assignment of the next queued prediction (None when that one was dropped)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while alive():
            taking = take()
            if taking is not None:
                given = await taking
                if given is not None:
                    return given
                continue
            remaining = until - loop.time()
            if remaining <= 0:
                return None
            idle(True)
            try:
                async with self._work:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._work.wait()
            finally:
                idle(False)
        return STOP
