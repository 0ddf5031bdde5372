"""One scheduler for every prediction's next deadline: start, run, or TTL.

A prediction has at most one pending deadline at a time, decided by its state: before the
runner starts, the start deadline (image pull, queue, scheduling), or sooner the end of
the grace for a container that waits on a kubelet's retries (image pull back-off, a
missing Secret); while it runs, the run deadline, paused while Kueue has suspended the
Job again (then the start deadline bounds the wait for re-admission); once finished,
its TTL. Kept in a heap rather than a kopf timer per object, so
thousands of live Predictions cost a few hundred bytes each, not a task each.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from whisperx_api import lifecycle as lc

log = logging.getLogger(__name__)

Kind = Literal["start", "waiting", "run", "ttl"]
# A finished Prediction with this annotation set to "true" outlives its TTL.
KEEP_ANNOTATION = "whisperx.io/keep"
# How Argo CD marks what it manages (annotation tracking, the default since Argo CD 3,
# or label tracking before it): deleting such a Prediction makes self-heal create it
# again, and run it again, every TTL period.
ARGOCD_TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"
ARGOCD_TRACKING_LABEL = "app.kubernetes.io/instance"
Key = tuple[str, str]
FireFn = Callable[[Kind, str, str], Awaitable[None]]
RETRY_SECONDS = 5.0
# Deadlines acted on at once (each a few API calls and Redis commands).
CONCURRENCY = 16
# A run deadline already past when the operator first sees a prediction (it was away):
# the runner may have finished meanwhile and be retrying its terminal report, at most
# 15 s apart (whisperx_runner.report), so its result lands before the deadline is acted on.
RESUME_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Limits:
    start: int
    run: int
    ttl: int | None
    # How long a container may wait on a kubelet's retries before the prediction fails.
    waiting: int

    @classmethod
    def from_spec(
        cls, spec: dict[str, Any], *, start: int, run: int, ttl: int | None, waiting: int
    ) -> Limits:
        given_ttl = spec.get("ttlSecondsAfterFinished")
        return cls(
            start=int(spec.get("startDeadlineSeconds") or start),
            run=int(spec.get("activeDeadlineSeconds") or run),
            ttl=int(given_ttl) if given_ttl is not None else ttl,
            waiting=waiting,
        )


def kept_after_ttl(metadata: dict[str, Any]) -> str | None:
    """Why a finished Prediction must not be deleted at its TTL (None: delete it).

    Such a Prediction is declared elsewhere (Git) and would come back: at its TTL only
    what it holds elsewhere (its Job, its transcript in Redis) is removed.
    """
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    if str(annotations.get(KEEP_ANNOTATION, "")).lower() == "true":
        return f"annotation {KEEP_ANNOTATION}"
    if ARGOCD_TRACKING_ANNOTATION in annotations:
        return f"tracked by Argo CD ({ARGOCD_TRACKING_ANNOTATION})"
    if ARGOCD_TRACKING_LABEL in labels:
        return f"tracked by Argo CD or another deployer ({ARGOCD_TRACKING_LABEL})"
    return None


def next_deadline(state: lc.PredictionState, limits: Limits) -> tuple[Kind, float] | None:
    """The deadline that applies now, as (kind, unix time), or None."""
    if state.terminal:
        if limits.ttl is None:
            return None
        ended = state.completed_at or lc.now_utc()
        return "ttl", ended.timestamp() + limits.ttl
    queued = state.condition("Queued")
    if state.phase is lc.Phase.PROCESSING and state.started_at is not None:
        if queued is not None and queued.status == "True":
            return "start", queued.last_transition_time.timestamp() + limits.start
        return "run", state.started_at.timestamp() + limits.run + state.suspended_seconds
    if state.created_at is None:
        return None
    start = state.created_at.timestamp() + limits.start
    waiting = state.condition("Waiting")
    if waiting is not None and waiting.status == "True":
        grace_ends = waiting.last_transition_time.timestamp() + limits.waiting
        if grace_ends < start:
            return "waiting", grace_ends
    return "start", start


class Deadlines:
    def __init__(
        self,
        fire: FireFn,
        *,
        active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.fire = fire
        self.active = active
        self.clock = clock
        self._limits: dict[Key, Limits] = {}
        self._plan: dict[Key, tuple[Kind, float]] = {}
        self._heap: list[tuple[float, Key]] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()

    def track(self, namespace: str, name: str, limits: Limits, state: lc.PredictionState) -> None:
        key = (namespace, name)
        self._limits[key] = limits
        plan = next_deadline(state, limits)
        if plan is not None and plan[0] == "run":
            plan = ("run", max(plan[1], self.clock() + RESUME_GRACE_SECONDS))
        self._set(key, plan)

    def update(self, namespace: str, name: str, state: lc.PredictionState) -> None:
        """A new state of a tracked prediction (untracked ones are left to `track`)."""
        limits = self._limits.get((namespace, name))
        if limits is not None:
            self._set((namespace, name), next_deadline(state, limits))

    def forget(self, namespace: str, name: str) -> None:
        self._limits.pop((namespace, name), None)
        self._plan.pop((namespace, name), None)

    def limits_of(self, namespace: str, name: str) -> Limits | None:
        return self._limits.get((namespace, name))

    def planned(self, namespace: str, name: str) -> tuple[Kind, float] | None:
        return self._plan.get((namespace, name))

    def __len__(self) -> int:
        return len(self._plan)

    def _set(self, key: Key, plan: tuple[Kind, float] | None) -> None:
        if plan is None:
            self._plan.pop(key, None)
            return
        if self._plan.get(key) == plan:
            return
        self._plan[key] = plan
        heapq.heappush(self._heap, (plan[1], key))
        if self._heap[0] == (plan[1], key):
            self._wake.set()
        # Superseded plans stay in the heap until popped; compact when they pile up.
        if len(self._heap) > 4 * len(self._plan) + 64:
            self._heap = [(when, k) for k, (_, when) in self._plan.items()]
            heapq.heapify(self._heap)

    def _due(self, now: float) -> list[tuple[Kind, Key]]:
        due: list[tuple[Kind, Key]] = []
        while self._heap and self._heap[0][0] <= now:
            when, key = heapq.heappop(self._heap)
            plan = self._plan.get(key)
            if plan is None or plan[1] != when:
                continue  # superseded
            del self._plan[key]
            due.append((plan[0], key))
        return due

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                now = self.clock()
                if self.active():
                    for kind, key in self._due(now):
                        task = asyncio.create_task(self._fire(kind, key))
                        self._running.add(task)
                        task.add_done_callback(self._running.discard)
                    timeout = self._heap[0][0] - now if self._heap else None
                else:
                    timeout = 1.0  # a standby replica checks again when it may be active
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            for task in self._running:
                task.cancel()

    async def _fire(self, kind: Kind, key: Key) -> None:
        async with self._slots:
            try:
                await self.fire(kind, *key)
            except Exception:
                log.exception("%s deadline of %s/%s failed; retrying", kind, *key)
                if key in self._limits and key not in self._plan:
                    self._set(key, (kind, self.clock() + RETRY_SECONDS))
