"""Warm runners on a cluster: runner Jobs that serve many predictions, and their queues.

A hardware profile with an idle time (`idleSeconds`) keeps its runners warm. Its
predictions get no Job of their own: they wait in a queue, and a runner Job of the
profile asks the operator for the next one over the work protocol (`whisperx_api.work`)
once its model is loaded and after each prediction. This class is the operator's
`WorkSource`: it keeps the queues, hands predictions out oldest first, starts runner Jobs
while queued predictions outnumber the runners free to take them (up to the profile's
`maxRunners`, all namespaces together, each namespace in turn), and settles what a runner
held when its Job ends.

Pools are per (namespace, profile). A runner pod runs in its tenant's namespace, with
that namespace's ServiceAccount, model cache and network policy, and only ever holds
that namespace's predictions: no tenant's input or token reaches a pod that another
tenant's predictions use. Everything here is rebuilt after a restart: the runner Jobs
from the API server (`load`), the queues and what each runner holds from the
Predictions' status (`adopt`, by kopf's resume handlers).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from whisperx_api import lifecycle as lc
from whisperx_api.kube import ApiError, KubeClient, resource_path
from whisperx_api.metrics import RunnerMetrics
from whisperx_api.records import PredictionRecord
from whisperx_api.status_writer import StatusWriter
from whisperx_api.work import (
    STOP,
    Assignment,
    WorkRequest,
    WorkWaiter,
    report_url,
    runner_token,
)
from whisperx_operator import jobs
from whisperx_operator.config import HardwareProfile, OperatorConfig
from whisperx_operator.pods import (
    JOB_NAME_LABEL,
    NODE_LOST,
    RETRIED_WAITING,
    pod_event,
    pod_failure,
    runner_output,
)

log = logging.getLogger(__name__)

Pool = tuple[str, str]  # (namespace, hardware profile)
# A runner pod that ended for these did nothing wrong: what it held is queued again.
_REQUEUED = ("Evicted", "Preempted", "RunnerLost", NODE_LOST)


@dataclass(order=True, frozen=True)
class _Queued:
    created: datetime
    name: str
    # spec.secretInputs: {input field: {name, key}} of Secrets in the namespace.
    secrets: tuple[tuple[str, str, str], ...] = field(compare=False, default=())
    since: float = field(compare=False, default_factory=time.monotonic)


@dataclass
class _Runner:
    namespace: str
    job: str
    hardware: str
    pod: str | None = None
    # The prediction it holds, as it was queued (to queue it again if the runner goes).
    held: _Queued | None = None
    # The prediction it holds has ended (reported, canceled, failed from outside).
    held_ended: bool = False
    served: int = 0
    waiting: bool = False  # in a request for work right now
    # Its pod's container waits on what a kubelet retries (an image pull back-off): the
    # latest such event, and the timer that gives the runner up after the grace.
    stuck: lc.Waiting | None = None
    give_up: asyncio.Task[None] | None = field(default=None, repr=False)
    # Whether it has asked for work (its model loaded), and the timer that deletes its
    # Job if it has not within the start deadline (never admitted, never scheduled).
    asked: bool = False
    start_bound: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop_timers(self) -> None:
        for task in (self.give_up, self.start_bound):
            if task is not None:
                task.cancel()

    @property
    def holding(self) -> str | None:
        return self.held.name if self.held is not None else None

    @property
    def id(self) -> str:
        return jobs.runner_id(self.namespace, self.job)


def _entry(body: dict[str, Any], record: PredictionRecord) -> _Queued:
    refs = (body.get("spec") or {}).get("secretInputs") or {}
    return _Queued(
        created=record.state.created_at or lc.now_utc(),
        name=record.id,
        secrets=tuple((f, r["name"], r["key"]) for f, r in sorted(refs.items())),
    )


def _job_path(namespace: str | None, name: str | None = None) -> str:
    if namespace is None:
        return "/apis/batch/v1/jobs"
    return resource_path(namespace, name, group="batch", version="v1", plural="jobs")


def _conditions(job: dict[str, Any]) -> set[str]:
    return {
        c.get("type", "")
        for c in (job.get("status") or {}).get("conditions") or ()
        if c.get("status") == "True"
    }


def job_finished(job: dict[str, Any]) -> bool:
    return bool(_conditions(job) & {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"})


class Pools:
    def __init__(
        self,
        config: OperatorConfig,
        kube: KubeClient,
        writer: StatusWriter,
    ) -> None:
        self.config = config
        self.kube = kube
        self.writer = writer
        self._queues: dict[Pool, list[_Queued]] = {}
        # (namespace, name) -> its pool, for each queued prediction: kopf's repeated
        # events and every status save ask whether one is queued.
        self._queued_in: dict[tuple[str, str], Pool] = {}
        self._runners: dict[str, _Runner] = {}
        # When each pool last got a new runner (a count): the namespaces take turns.
        self._last_start: dict[Pool, int] = {}
        self._starts = 0
        self._waiter = WorkWaiter()
        self._scaling = asyncio.Lock()
        self.metrics = RunnerMetrics(
            "whisperx_operator",
            busy=lambda: sum(r.held is not None for r in self._runners.values()),
            idle=lambda: sum(r.waiting for r in self._runners.values()),
        )

    def profile(self, hardware: str) -> HardwareProfile | None:
        profile = self.config.profiles.get(hardware)
        return profile if profile is not None and profile.warm else None

    # --- what the operator's handlers tell it ---

    async def load(self) -> None:
        """The runner Jobs that exist (an operator restart): they count against the
        profiles' limits, and their runners keep asking for work."""
        for job in await self.kube.list(_job_path(None), labelSelector=jobs.RUNNER_LABEL):
            self.job_seen(job)

    def job_seen(self, job: dict[str, Any]) -> _Runner | None:
        meta = job["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        runner = self._runners.get(jobs.runner_id(namespace, name))
        if runner is None and not job_finished(job) and not meta.get("deletionTimestamp"):
            hardware = (meta.get("annotations") or {}).get(jobs.HARDWARE_ANNOTATION, "")
            runner = _Runner(namespace, name, hardware)
            self._runners[runner.id] = runner
            created = lc.parse_time(meta.get("creationTimestamp")) or lc.now_utc()
            runner.start_bound = asyncio.create_task(self._bound_start(runner, created))
        return runner

    async def submit(self, body: dict[str, Any], record: PredictionRecord) -> None:
        """A prediction of a warm profile that no runner holds: it waits in its pool's
        queue (oldest first). Repeats (kopf's events, a resume) change nothing."""
        namespace, name = record.namespace, record.id
        if self._holder(namespace, name) is not None or self._queued(namespace, name):
            return
        pool = (namespace, record.hardware)
        self._enqueue(pool, _entry(body, record))
        if self._idle(pool) < len(self._queues[pool]):
            await self.writer.apply(
                namespace,
                name,
                lc.Queued("WaitingForRunner", self._waiting_message(pool), lc.now_utc()),
            )
        await self.scale(record.hardware)
        await self._waiter.announce()

    async def adopt(self, body: dict[str, Any], record: PredictionRecord) -> None:
        """A running prediction seen again after a restart: if the runner its status
        names still runs, that runner holds it; otherwise it is queued again."""
        state = record.state
        if state.job is not None and state.pod is not None and not state.queued:
            try:
                job = await self.kube.get(_job_path(record.namespace, state.job))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                job = None
            runner = self.job_seen(job) if job is not None else None
            if runner is not None and runner.holding in (None, record.id):
                runner.held, runner.held_ended = _entry(body, record), False
                runner.pod = runner.pod or state.pod
                return
            # Its runner ended while the operator was down: it waits for another.
            message = f"its runner Job {state.job} is gone; waiting for another runner"
            await self.writer.apply(
                record.namespace, record.id, lc.Queued("RunnerLost", message, lc.now_utc())
            )
        await self.submit(body, record)

    def saved(self, record: PredictionRecord) -> None:
        """Every status save: an ended prediction leaves its queue, and its runner (if
        any) is done with it."""
        if not record.state.terminal:
            return
        self._unqueue(record.namespace, record.id)
        runner = self._holder(record.namespace, record.id)
        if runner is not None:
            runner.held_ended = True

    async def stop(self, namespace: str, name: str) -> None:
        """The prediction has ended from outside (cancel, deadline, deletion): out of its
        queue, or its runner is stopped (SIGTERM, as a pod deletion sends) and replaced
        when work needs one."""
        self._unqueue(namespace, name)
        runner = self._holder(namespace, name)
        if runner is not None:
            runner.held_ended = True
            log.info("stopping runner %s, which holds %s/%s", runner.id, namespace, name)
            await self.kube.delete(_job_path(namespace, runner.job))

    async def job_changed(self, event_type: str | None, job: dict[str, Any]) -> None:
        runner = self.job_seen(job)
        if runner is None:
            return
        gone = event_type == "DELETED" or job_finished(job)
        suspended = bool((job.get("spec") or {}).get("suspend"))
        if not gone and not (suspended and runner.holding is not None):
            return
        # Ended, deleted, or preempted (Kueue suspends the Job and deletes its pod).
        held, runner.held = runner.held, None
        if held is not None and not runner.held_ended:
            if suspended and not gone:
                reason, message = "Preempted", f"its runner Job {runner.job} was suspended"
            else:
                reason, message = await self._pod_failure(runner)
            await self._requeue_or_fail(runner, held, reason, message)
        if gone:
            self._runners.pop(runner.id, None)
            runner.stop_timers()
            log.info("runner %s ended after %d prediction(s)", runner.id, runner.served)
        await self.scale(runner.hardware)

    async def pod_changed(self, pod: dict[str, Any]) -> None:
        """A runner pod that will never start (an image that is not there) fails what
        waits for its pool, rather than leaving it to the start deadline; one that waits
        on a kubelet's retries (an image pull back-off) does so after the waiting grace."""
        meta = pod["metadata"]
        namespace = meta.get("namespace") or "default"
        job = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
        runner = self._runners.get(jobs.runner_id(namespace, job or ""))
        if runner is None:
            return
        runner.pod = meta.get("name")
        event = pod_event(pod, lc.now_utc())
        if isinstance(event, lc.Failed) and event.reason == NODE_LOST:
            await self._runner_lost(runner, event.message)
        elif isinstance(event, lc.Failed):
            await self.runner_not_started(runner, event.reason, event.message)
        elif isinstance(event, lc.Waiting):
            # What the kubelet retries may heal (a registry's hiccup); past the grace a
            # one-shot prediction would fail, and so does what waits for this runner.
            runner.stuck = event
            if runner.give_up is None:
                runner.give_up = asyncio.create_task(self._give_up_after_grace(runner))
        elif runner.give_up is not None:
            runner.give_up.cancel()
            runner.give_up, runner.stuck = None, None

    async def _runner_lost(self, runner: _Runner, message: str) -> None:
        """Its node is gone: what it held is queued again for another runner, and it no
        longer counts against the profile's limit (its Job is deleted; the pod goes when
        the node comes back or is removed)."""
        log.warning("runner %s lost: %s", runner.id, message)
        self._runners.pop(runner.id, None)
        runner.stop_timers()
        held, runner.held = runner.held, None
        if held is not None and not runner.held_ended:
            await self._requeue_or_fail(runner, held, NODE_LOST, message)
        await self.kube.delete(_job_path(runner.namespace, runner.job))
        await self.scale(runner.hardware)

    async def _bound_start(self, runner: _Runner, created: datetime) -> None:
        """A runner that has not asked for work within the start deadline of its Job's
        creation (Kueue never admits it, no node fits it) will not serve: its Job goes,
        and with it the quota and the `maxRunners` slot it held. What waits keeps its
        own start deadline."""
        bound = self.config.default_start_deadline_seconds
        await asyncio.sleep(max(0.0, created.timestamp() + bound - time.time()))
        if runner.asked or self._runners.get(runner.id) is not runner:
            return
        log.warning("runner %s did not start within %d s; deleting its Job", runner.id, bound)
        self._runners.pop(runner.id, None)
        if runner.give_up is not None:
            runner.give_up.cancel()
        await self.kube.delete(_job_path(runner.namespace, runner.job))
        await self.scale(runner.hardware)

    async def _give_up_after_grace(self, runner: _Runner) -> None:
        grace = self.config.waiting_grace_seconds
        await asyncio.sleep(grace)
        stuck = runner.stuck
        if stuck is None or self._runners.get(runner.id) is not runner:
            return
        message = f"{stuck.message} (still {stuck.reason} after {grace} s)"
        await self.runner_not_started(runner, RETRIED_WAITING[stuck.reason], message)

    async def runner_not_started(self, runner: _Runner, reason: str, message: str) -> None:
        log.warning("runner %s cannot start: %s: %s", runner.id, reason, message)
        await self._fail_queue((runner.namespace, runner.hardware), reason, message)
        await self.kube.delete(_job_path(runner.namespace, runner.job))

    def runner_of_job(self, namespace: str, job: str) -> _Runner | None:
        return self._runners.get(jobs.runner_id(namespace, job))

    # --- the runners' side (WorkSource) ---

    async def claim(
        self, runner_id: str, request: WorkRequest
    ) -> Assignment | Literal["stop"] | None:
        runner = self._runners.get(runner_id) or await self._runner_from_api(runner_id)
        if runner is None:
            return STOP
        if request.setup_seconds is not None:
            self.metrics.setup.observe(request.setup_seconds)
            log.info("runner %s ready in %.1f s", runner.id, request.setup_seconds)
        if not runner.asked:
            runner.asked = True
            if runner.start_bound is not None:
                runner.start_bound.cancel()
        await self._release(runner)
        profile = self.profile(runner.hardware)
        if profile is None:
            return STOP
        if profile.max_predictions and runner.served >= profile.max_predictions:
            return STOP
        if runner.served and self._slot_wanted_elsewhere(runner, profile):
            log.info("runner %s gives up its slot to another namespace", runner.id)
            return STOP
        pool = (runner.namespace, runner.hardware)

        def take() -> Awaitable[Assignment | None] | None:
            queue = self._queues.get(pool)
            if not queue:
                return None
            entry = queue.pop(0)
            del self._queued_in[runner.namespace, entry.name]
            return self._assign(runner, entry)

        def idle(waiting: bool) -> None:
            runner.waiting = waiting

        return await self._waiter.poll(
            request.wait, take=take, alive=lambda: runner.id in self._runners, idle=idle
        )

    # --- internals ---

    def _holder(self, namespace: str, name: str) -> _Runner | None:
        return next(
            (r for r in self._runners.values() if r.namespace == namespace and r.holding == name),
            None,
        )

    def _queued(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._queued_in

    def _enqueue(self, pool: Pool, entry: _Queued) -> None:
        bisect.insort(self._queues.setdefault(pool, []), entry)
        self._queued_in[pool[0], entry.name] = pool

    def _unqueue(self, namespace: str, name: str) -> None:
        pool = self._queued_in.pop((namespace, name), None)
        if pool is not None:
            queue = self._queues[pool]
            queue[:] = [e for e in queue if e.name != name]

    def _pool_runners(self, pool: Pool) -> list[_Runner]:
        return [r for r in self._runners.values() if (r.namespace, r.hardware) == pool]

    def _idle(self, pool: Pool) -> int:
        """Runners of the pool that hold nothing (starting ones included, not those whose
        container waits on the kubelet's retries: they may never serve)."""
        return sum(r.holding is None and r.stuck is None for r in self._pool_runners(pool))

    def _slot_wanted_elsewhere(self, runner: _Runner, profile: HardwareProfile) -> bool:
        """The profile is at its runner limit and another namespace's predictions wait
        for a runner: this one exits after its prediction, so that namespace gets the
        slot (a busy namespace does not keep every runner)."""
        same = [r for r in self._runners.values() if r.hardware == runner.hardware]
        if len(same) < profile.max_runners:
            return False
        return any(
            queue and len(queue) > self._idle(pool)
            for pool, queue in self._queues.items()
            if pool[1] == runner.hardware and pool[0] != runner.namespace
        )

    def _waiting_message(self, pool: Pool) -> str:
        hardware = pool[1]
        runners = self._pool_runners(pool)
        if runners:
            return f"{len(runners)} runner(s) of profile {hardware} here, all busy or starting"
        return f"starting a runner of profile {hardware}"

    async def scale(self, hardware: str) -> None:
        """Starts runner Jobs while a pool's queue outnumbers its idle runners, up to the
        profile's `maxRunners` over all namespaces, the namespaces in turn."""
        profile = self.profile(hardware)
        if profile is None:
            return
        async with self._scaling:
            while sum(r.hardware == hardware for r in self._runners.values()) < profile.max_runners:
                wanting = [
                    ns
                    for ns, h in self._queues
                    if h == hardware and len(self._queues[ns, h]) > self._idle((ns, h))
                ]
                if not wanting:
                    return
                # The namespace that got a runner of this profile longest ago goes first.
                namespace = min(wanting, key=lambda ns: self._last_start.get((ns, hardware), -1))
                self._starts += 1
                self._last_start[namespace, hardware] = self._starts
                await self._start_runner(namespace, hardware, profile)

    async def _start_runner(self, namespace: str, hardware: str, profile: HardwareProfile) -> None:
        name = jobs.warm_job_name(hardware, uuid.uuid4().hex[:6])
        job = jobs.warm_runner_job(namespace, name, hardware, profile, self.config)
        try:
            created = await self.kube.create(_job_path(namespace), job)
        except ApiError as exc:
            reason = "NamespaceNotServed" if exc.status == 403 else "RunnerNotCreated"
            message = f"cannot create a runner Job in {namespace}: {exc.message}"
            log.warning("%s", message)
            await self._fail_queue((namespace, hardware), reason, message)
            return
        self.job_seen(created)
        # Its credential, owned by the Job (gone with it); the kubelet waits for it.
        token = runner_token(self.writer.report_key, jobs.runner_id(namespace, name))
        await self.kube.create(
            resource_path(namespace, group="", version="v1", plural="secrets"),
            jobs.warm_token_secret(namespace, created, token),
        )
        log.info("started runner %s (profile %s)", jobs.runner_id(namespace, name), hardware)

    async def _runner_from_api(self, runner_id: str) -> _Runner | None:
        """A runner this process has not seen (it started before a restart)."""
        parsed = jobs.parse_runner_id(runner_id)
        if parsed is None:
            return None
        try:
            job = await self.kube.get(_job_path(*parsed))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        if jobs.RUNNER_LABEL not in (job["metadata"].get("labels") or {}):
            return None
        return self.job_seen(job)

    async def _release(self, runner: _Runner) -> None:
        """A runner asking for work is done with what it held: if that has not ended,
        its result will never come."""
        held, runner.held = runner.held, None
        if held is not None and not runner.held_ended:
            message = "the runner went on without delivering this prediction's result"
            await self.writer.apply(
                runner.namespace, held.name, lc.Failed("NoResult", message, lc.now_utc())
            )

    async def _assign(self, runner: _Runner, entry: _Queued) -> Assignment | None:
        namespace = runner.namespace
        # Held from here on: a cancel now finds it on this runner.
        runner.held, runner.held_ended = entry, False
        try:
            secrets = await self._secret_inputs(namespace, entry)
            pod = runner.pod or await self._pod_name(runner)
            record = await self.writer.apply(
                namespace, entry.name, lc.Admitted(lc.now_utc(), job=runner.job, pod=pod)
            )
        except LookupError as exc:
            runner.held = None
            failed = lc.Failed("SecretNotFound", str(exc), lc.now_utc())
            await self.writer.apply(namespace, entry.name, failed)
            return None
        except BaseException:
            # Cut off (the API server, or the runner's request gone): the next takes it,
            # and its time queued goes on.
            runner.held = None
            self._enqueue((namespace, runner.hardware), entry)
            raise
        if record is None or record.state.terminal:
            runner.held = None
            return None
        start = "warm" if runner.served else "cold"
        runner.served += 1
        self.metrics.starts.inc(start)
        self.metrics.queued.observe(time.monotonic() - entry.since)
        log.info("prediction %s/%s: on runner %s (pod %s, %s start, queued %.2f s)",
                 namespace, entry.name, runner.id, pod, start,
                 time.monotonic() - entry.since)  # fmt: skip
        return Assignment(
            namespace=namespace,
            id=entry.name,
            input={**record.input, **secrets},
            report_url=report_url(self.config.report_base_url, namespace, entry.name),
            report_token=self.writer.report_token(record),
            # Its own report sequence: the same runner may take it again after a requeue.
            attempt=uuid.uuid4().hex[:12],
        )

    async def _requeue_or_fail(
        self, runner: _Runner, held: _Queued, reason: str, message: str
    ) -> None:
        """What a runner held when it went away: queued again when the runner was
        evicted, preempted or lost (as a Job's podFailurePolicy ignores disruptions),
        failed with the pod's reason otherwise (a crash, OOMKilled)."""
        namespace = runner.namespace
        if reason not in _REQUEUED:
            await self.writer.apply(namespace, held.name, lc.Failed(reason, message, lc.now_utc()))
            return
        queued = lc.Queued(reason, f"{message}; waiting for another runner", lc.now_utc())
        record = await self.writer.apply(namespace, held.name, queued)
        if record is not None and not record.state.terminal:
            # Its place by creation time, its time queued from now (not its first run's).
            self._enqueue((namespace, runner.hardware), replace(held, since=time.monotonic()))

    async def _fail_queue(self, pool: Pool, reason: str, message: str) -> None:
        entries = self._queues.pop(pool, [])
        # Out of the index before the first save: each one's `saved` unqueues it.
        for entry in entries:
            self._queued_in.pop((pool[0], entry.name), None)
        for entry in entries:
            await self.writer.apply(pool[0], entry.name, lc.Failed(reason, message, lc.now_utc()))

    async def _secret_inputs(self, namespace: str, entry: _Queued) -> dict[str, str]:
        """The prediction's secret inputs, read from its Secrets now: they travel only in
        the answer to the runner that takes it."""
        values: dict[str, str] = {}
        for field_name, secret, key in entry.secrets:
            path = resource_path(namespace, secret, group="", version="v1", plural="secrets")
            try:
                data = (await self.kube.get(path)).get("data") or {}
            except ApiError as exc:
                if exc.status != 404:
                    raise
                data = {}
            if key not in data:
                raise LookupError(
                    f"spec.secretInputs.{field_name}: Secret {secret} has no key {key!r}"
                )
            values[field_name] = base64.b64decode(data[key]).decode()
        return values

    async def _pods(self, runner: _Runner) -> list[dict[str, Any]]:
        # Listed, not read by name: the operator may list and watch pods, not get them.
        return await self.kube.list(
            resource_path(runner.namespace, group="", version="v1", plural="pods"),
            labelSelector=f"{JOB_NAME_LABEL}={runner.job}",
        )

    async def _pod_name(self, runner: _Runner) -> str | None:
        pods = await self._pods(runner)
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if running or pods:
            runner.pod = (running or pods)[0]["metadata"]["name"]
        return runner.pod

    async def _pod_failure(self, runner: _Runner) -> tuple[str, str]:
        """Why the runner's pod ended, in the words a one-shot Job's failure uses."""
        failed = [
            p for p in await self._pods(runner) if (p.get("status") or {}).get("phase") == "Failed"
        ]
        if not failed:
            return "RunnerLost", f"its runner Job {runner.job} ended"
        output = runner_output(failed[0])
        if output:
            # For the operator's admins, never in the prediction's error (API callers').
            log.warning("runner %s failed; its last output: %s", runner.id, output)
        return pod_failure(failed[0])
