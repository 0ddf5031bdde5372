"""What the operator does, behind thin kopf handlers (handlers.py).

One `Runtime` per process holds the Kubernetes and Redis clients, the status writer with
its Kubernetes sink, the deadline scheduler, the peering gate, the Event poster, the
webhook sender and the report server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from redis.exceptions import RedisError

from whisperx_api import lifecycle as lc
from whisperx_api.crd import GROUP, PREDICTION_LABEL
from whisperx_api.hostport import bind_host
from whisperx_api.kube import ApiError, KubeClient, resource_path
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import prediction_token
from whisperx_api.runner_endpoint import runner_app
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.webhooks import WebhookSender
from whisperx_operator import deadlines, jobs
from whisperx_operator.config import OperatorConfig
from whisperx_operator.deadlines import Deadlines, Kind, Limits, kept_after_ttl
from whisperx_operator.events import EventPoster, involved_object
from whisperx_operator.peering import PeeringGate
from whisperx_operator.pods import (
    RETRIED_WAITING,
    failure_pod,
    has_had_pods,
    job_event,
    pod_creation_failed,
    pod_event,
    runner_output,
)
from whisperx_operator.pools import Pools
from whisperx_operator.sink import KubeStatusSink
from whisperx_operator.validation import profile_for, validate_spec

log = logging.getLogger(__name__)

# kopf's finalizer on Predictions (main.py gives it to kopf): their deletion waits for the
# delete handler, which removes their Redis data.
FINALIZER = f"{GROUP}/cleanup"
# Redis connections for what runs beside the kopf handlers: runner reports, the webhook
# sender, and deadlines acted on at once. Past the pool, a command waits (up to 5 s)
# for a free connection rather than failing with MaxConnectionsError.
OTHER_REDIS_CONNECTIONS = 16 + deadlines.CONCURRENCY


def redis_pool_size(config: OperatorConfig) -> int:
    """One connection per handler that may run at once, and the others'."""
    return config.max_concurrent_handlers + OTHER_REDIS_CONNECTIONS


def _job_path(namespace: str, name: str | None = None) -> str:
    return resource_path(namespace, name, group="batch", version="v1", plural="jobs")


def _core_path(namespace: str, plural: str, name: str | None = None) -> str:
    return resource_path(namespace, name, group="", version="v1", plural=plural)


def prediction_of(obj: dict[str, Any]) -> str | None:
    """The Prediction a Job or pod belongs to."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    name = annotations.get(jobs.PREDICTION_ANNOTATION) or labels.get(PREDICTION_LABEL)
    return str(name) if name else None


class Runtime:
    def __init__(self, config: OperatorConfig, *, identity: str) -> None:
        self.config = config
        self.kube = KubeClient(field_manager=jobs.MANAGED_BY)
        self.store = Store.from_url(config.redis_url, redis_pool_size(config))
        # Taken by every kopf handler (handlers.py) for its whole run.
        self.handler_slots = asyncio.Semaphore(config.max_concurrent_handlers)
        # (namespace, name) -> uid of Predictions whose Secret and Job `prepare` created
        # before kopf's first cycle ended; `reconcile` takes it from here.
        self._prepared: dict[tuple[str, str], str] = {}
        self.events = EventPoster(self.kube, identity)
        self.gate = PeeringGate(
            self.kube,
            name=config.peering,
            identity=identity,
            priority=config.peering_priority,
            namespaces=config.namespaces,
        )
        self.deadlines = Deadlines(self.deadline_reached, active=lambda: self.gate.active)
        self.sink = KubeStatusSink(
            self.kube,
            self.events,
            on_saved=self._saved,
            own_job=lambda hardware: self.pools.profile(hardware) is None,
        )
        self.webhooks = WebhookSender(self.store, config.webhook_secret)
        self.writer = StatusWriter(
            store=self.store,
            sink=self.sink,
            report_key=config.report_key,
            public_url=config.public_url,
            webhooks=self.webhooks,
        )
        self.pools = Pools(config, self.kube, self.writer)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._stopped = False

    # --- process lifecycle ---

    async def start(self) -> None:
        await self.gate.ensure()
        await self.pools.load()
        app = runner_app(
            self.writer,
            self.store,
            work=self.pools,
            active=lambda: self.gate.active,
            metrics=self.pools.metrics.render,
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, bind_host(self.config.listen_host), self.config.report_port
        )
        await site.start()
        for name, coro in (
            ("events", self.events.run()),
            ("peering gate", self.gate.run()),
            ("deadlines", self.deadlines.run()),
            ("webhooks", self.webhooks.run()),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.close()
        await self.kube.close()

    # --- Predictions ---

    def _saved(self, record: PredictionRecord) -> None:
        self.deadlines.update(record.namespace, record.id, record.state)
        self.pools.saved(record)

    def limits(self, spec: dict[str, Any]) -> Limits:
        return Limits.from_spec(
            spec,
            start=self.config.default_start_deadline_seconds,
            run=self.config.default_active_deadline_seconds,
            ttl=self.config.default_ttl_seconds,
            waiting=self.config.waiting_grace_seconds,
        )

    async def reconcile(self, body: dict[str, Any]) -> None:
        """A Prediction seen for the first time by this process (created or resumed)."""
        ref = jobs.PredictionRef.from_body(body)
        record = self.sink.remember(body)
        # Tracked first: every later save moves its deadline (start, run, then TTL).
        self.deadlines.track(ref.namespace, ref.name, self.limits(ref.spec), record.state)
        if record.state.terminal:
            # Resumed after the end: the status is authoritative; re-publish it so a crash
            # between the status save and the Redis write loses nothing (the terminal
            # webhook is queued at most once).
            await self.writer.publish(record)
            return
        if record.cancel_requested:
            await self.cancel(ref.namespace, ref.name)
            return
        problem = validate_spec(ref.spec, self.config.profiles)
        if problem is not None:
            await self.writer.apply(
                ref.namespace, ref.name, lc.Failed(problem.reason, problem.message, lc.now_utc())
            )
            return
        try:
            if self._prepared.pop((ref.namespace, ref.name), None) != ref.uid:
                fresh = not (body.get("status") or {}).get("phase")
                await self._start(body, ref, record, fresh=fresh)
        except ApiError as exc:
            if exc.status != 403:
                raise
            # The operator's Role is bound in tenant namespaces only: no retry will help
            # until someone makes this namespace a tenant.
            message = (
                f"namespace {ref.namespace} is not served (not a whisperx tenant: apply "
                f"manifests/base/tenant there): {exc.message}"
            )
            await self.writer.apply(
                ref.namespace, ref.name, lc.Failed("NamespaceNotServed", message, lc.now_utc())
            )
            return
        async with self.writer.lock(ref.namespace, ref.name):
            # A report may have moved the prediction on since `body` was read.
            current = await self.sink.load(ref.namespace, ref.name)
            if current is None:
                return
            if not current.state.terminal:
                await self.sink.save(current)
            await self.writer.publish(current)

    async def prepare(self, body: Mapping[str, Any]) -> None:
        """A Prediction's first event, before kopf has put its finalizer on it: kopf runs
        `reconcile` only on the event that write brings back, so the Secret and the Job
        are created now rather than a round trip later. Best effort: on any failure
        `reconcile` does it again, and handles what went wrong. Every other event of a
        Prediction passes through here too: those return at once, without a handler
        slot."""
        meta = body.get("metadata") or {}
        if (
            (body.get("status") or {}).get("phase")
            or FINALIZER in (meta.get("finalizers") or ())
            or meta.get("deletionTimestamp")
        ):
            return  # not new, or kopf is past its first step (reconcile runs now)
        ref = jobs.PredictionRef.from_body(dict(body))
        record = PredictionRecord.from_resource(dict(body))
        if record.cancel_requested or validate_spec(ref.spec, self.config.profiles):
            return  # reconcile ends it without a Job
        try:
            async with self.handler_slots:
                await self._start(dict(body), ref, record, fresh=True)
        except (ApiError, kopf.TemporaryError, RedisError, aiohttp.ClientError, OSError) as exc:
            log.debug("preparing %s/%s: %r (left to reconcile)", ref.namespace, ref.name, exc)
            return
        self._prepared[(ref.namespace, ref.name)] = ref.uid

    async def _start(
        self,
        body: dict[str, Any],
        ref: jobs.PredictionRef,
        record: PredictionRecord,
        *,
        fresh: bool,
    ) -> None:
        if fresh:
            # No status yet, so no report of this prediction was applied: whatever Redis
            # holds under its name was left by an earlier namesake, and that one's report
            # sequence number would make this one's reports look like replays.
            await self.store.delete_prediction(ref.namespace, ref.name)
        if self.pools.profile(record.hardware) is not None:
            await self.pools.adopt(body, record)
        else:
            await self._ensure_runner_objects(ref, record)

    async def _ensure_runner_objects(
        self, ref: jobs.PredictionRef, record: PredictionRecord
    ) -> None:
        token = prediction_token(self.config.report_key, ref.namespace, ref.name, ref.uid)
        profile = profile_for(ref.spec, self.config.profiles)
        job = jobs.runner_job(ref, profile, self.config)
        # Both at once: the Job's pod needs the Secret only when a kubelet starts it,
        # far later, and a kubelet waits for a missing Secret anyway.
        _, job_created = await asyncio.gather(
            self._create_owned(
                _core_path(ref.namespace, "secrets"), jobs.runner_secret(ref, token), ref.uid
            ),
            self._create_owned(_job_path(ref.namespace), job, ref.uid),
        )
        if job_created:
            self.events.post(
                involved_object(record),
                "Normal",
                "JobCreated",
                f"created Job {job['metadata']['name']} (hardware {record.hardware})",
            )

    async def _create_owned(self, collection: str, obj: dict[str, Any], owner_uid: str) -> bool:
        """Creates `obj`; False when it exists already (a repeated event or a restart)."""
        try:
            await self.kube.create(collection, obj)
            return True
        except ApiError as exc:
            if exc.status != 409:
                raise
        name = obj["metadata"]["name"]
        existing = await self.kube.get(f"{collection}/{name}")
        owners = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or ()}
        if owner_uid not in owners:
            # Left by a deleted Prediction of the same name, not yet garbage-collected.
            raise kopf.TemporaryError(f"{obj['kind']} {name} belongs to another owner", delay=5)
        return False

    async def cancel(self, namespace: str, name: str) -> None:
        record = await self.writer.apply(namespace, name, lc.CancelRequested(at=lc.now_utc()))
        # Status first: once canceled, a late report from the dying runner changes nothing.
        if record is not None and record.state.phase is lc.Phase.CANCELED:
            await self._stop_run(record)

    async def forget(self, namespace: str, name: str) -> None:
        """The Prediction is being deleted: remove its Redis data and in-memory state."""
        await self.store.delete_prediction(namespace, name)
        # A warm runner would go on transcribing it (a Job of its own goes with it).
        await self.pools.stop(namespace, name)
        self._prepared.pop((namespace, name), None)
        self.writer.forget(namespace, name)
        self.sink.forget(namespace, name)
        self.deadlines.forget(namespace, name)

    async def _stop_run(self, record: PredictionRecord) -> None:
        """Stops whatever still runs the prediction: its own Job, or the warm runner
        holding it (or takes it out of its queue)."""
        if self.pools.profile(record.hardware) is not None:
            await self.pools.stop(record.namespace, record.id)
        else:
            await self.kube.delete(_job_path(record.namespace, jobs.job_name(record.id)))

    async def _end(self, namespace: str, name: str, event: lc.Failed) -> None:
        """Ends a prediction from outside the runner and stops whatever still runs."""
        record = await self.writer.apply(namespace, name, event)
        if record is not None and record.state.terminal and record.state.reason == event.reason:
            await self._stop_run(record)

    # --- deadlines ---

    async def deadline_reached(self, kind: Kind, namespace: str, name: str) -> None:
        if kind == "ttl":
            await self._expire(namespace, name)
            return
        record = await self.sink.load(namespace, name)
        if record is None or record.state.terminal:
            return
        limits = self.deadlines.limits_of(namespace, name) or self.limits({})
        if kind == "waiting":
            await self._waited_too_long(namespace, name, limits)
        elif kind == "start" and record.state.phase is lc.Phase.PROCESSING:
            message = f"the suspended run was not admitted again within {limits.start} s"
            await self._end(
                namespace, name, lc.Failed("StartDeadlineExceeded", message, lc.now_utc())
            )
        elif kind == "start":
            message = f"the runner did not start within {limits.start} s"
            waiting = await self._why_waiting(namespace, name, record)
            if waiting:
                message += f" ({waiting})"
            await self._end(
                namespace, name, lc.Failed("StartDeadlineExceeded", message, lc.now_utc())
            )
        else:
            message = f"the run took longer than {limits.run} s"
            await self._end(namespace, name, lc.Failed("DeadlineExceeded", message, lc.now_utc()))

    async def _expire(self, namespace: str, name: str) -> None:
        """The TTL after finishing has passed: delete the Prediction, or only its data."""
        try:
            obj = await self.kube.get(resource_path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        kept = kept_after_ttl(obj.get("metadata") or {})
        if kept is None:
            log.info("deleting %s/%s: its TTL after finishing has passed", namespace, name)
            await self.kube.delete(resource_path(namespace, name))
            return
        log.info("%s/%s is kept (%s): removing only its Job and data", namespace, name, kept)
        await self._stop_run(PredictionRecord.from_resource(obj))
        await self.store.remove_data(namespace, name)
        self.deadlines.forget(namespace, name)

    async def _waited_too_long(self, namespace: str, name: str, limits: Limits) -> None:
        """The grace for a container waiting on a kubelet's retries has run out."""
        for pod in await self._pods(namespace, name):
            event = pod_event(pod, lc.now_utc())
            if isinstance(event, lc.Waiting):
                message = f"{event.message} (still {event.reason} after {limits.waiting} s)"
                failed = lc.Failed(RETRIED_WAITING[event.reason], message, lc.now_utc())
                await self._end(namespace, name, failed)
                return
        # Its container has stopped waiting since: clear the condition (the start deadline
        # applies again).
        await self.writer.apply(namespace, name, lc.Admitted(lc.now_utc()))

    async def _pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return await self.kube.list(
            _core_path(namespace, "pods"),
            labelSelector=f"{PREDICTION_LABEL}={jobs.label_value(name)}",
        )

    async def _why_waiting(self, namespace: str, name: str, record: PredictionRecord) -> str:
        """Why a prediction has not started: its Queued condition, else its pods now."""
        queued = record.state.condition("Queued")
        if queued is not None and queued.status == "True":
            return f"{queued.reason}: {queued.message}"
        pods = await self._pods(namespace, name)
        for pod in pods:
            event = pod_event(pod, lc.now_utc())
            if isinstance(event, lc.Queued | lc.Waiting):
                return f"{event.reason}: {event.message}"
        return "no pod was started" if not pods else ""

    # --- Jobs and pods ---

    async def job_changed(self, event_type: str | None, job: dict[str, Any]) -> None:
        name = prediction_of(job)
        namespace = job["metadata"].get("namespace") or "default"
        if name is None:
            return
        if event_type == "DELETED":
            gone = lc.Failed(
                "JobDeleted", "the Job was deleted before the runner finished", lc.now_utc()
            )
            await self.writer.apply(namespace, name, gone)
            return
        pods: list[dict[str, Any]] = []
        if _has_failed(job):
            # Why it failed is in its pods (OOMKilled, evicted, exit code).
            pods = await self._pods(namespace, name)
        event = job_event(job, pods, lc.now_utc())
        if event is None:
            return
        record = await self.writer.apply(namespace, name, event)
        last = failure_pod(pods)
        output = runner_output(last) if last is not None else ""
        # Once, when this event ended the prediction (a Job's later updates repeat it).
        if output and record is not None and record.state.completed_at == event.at:
            self.events.post(involved_object(record), "Warning", "RunnerOutput", output)

    async def pod_not_created(self, event: dict[str, Any]) -> None:
        """The Job controller recorded `FailedCreate` on a Job: it could not create its
        pod (say, no runner ServiceAccount in the namespace), and retrying will not help."""
        involved = event.get("involvedObject") or {}
        namespace, job = involved.get("namespace") or "default", involved.get("name")
        if not job:
            return
        try:
            found = await self.kube.get(_job_path(namespace, job))
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        name = prediction_of(found)
        runner = self.pools.runner_of_job(namespace, job)
        if (name is None and runner is None) or found["metadata"].get("uid") != involved.get("uid"):
            return  # not ours, or about an earlier Job of the same name
        if has_had_pods(found):
            return  # a pod was created since (say, the ServiceAccount came)
        outcome = pod_creation_failed(str(event.get("message") or ""), lc.now_utc())
        if runner is not None:
            # A warm runner's Job: what waits for its pool would wait for ever.
            if isinstance(outcome, lc.Failed):
                await self.pools.runner_not_started(runner, outcome.reason, outcome.message)
            return
        assert name is not None
        if isinstance(outcome, lc.Failed):
            await self._end(namespace, name, outcome)
        else:
            await self.writer.apply(namespace, name, outcome)

    async def pod_changed(self, pod: dict[str, Any]) -> None:
        name = prediction_of(pod)
        if name is None:
            return
        namespace = pod["metadata"].get("namespace") or "default"
        event = pod_event(pod, lc.now_utc())
        if isinstance(event, lc.Failed):
            await self._end(namespace, name, event)
        elif event is not None:
            await self.writer.apply(namespace, name, event)


def _has_failed(job: dict[str, Any]) -> bool:
    return any(
        c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or ()
    )
