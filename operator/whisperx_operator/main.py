"""`whisperx-operator`: kopf with the settings this operator needs, plus its own servers.

Configuration is environment only (see config.py and docs/architecture.md); Kubernetes
credentials come from the pod's service account or $KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from whisperx_api.crd import GROUP

# Imported to register kopf's handlers and its login (the same credentials as ours).
from whisperx_operator import handlers, login  # noqa: F401
from whisperx_operator.config import ConfigError, OperatorConfig
from whisperx_operator.jobs import MANAGED_BY, MANAGED_BY_LABEL
from whisperx_operator.runtime import FINALIZER, Runtime

log = logging.getLogger("whisperx_operator")

KOPF_PREFIX = f"kopf.{GROUP}"


class DiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base in annotations, built from a copy of only what it keeps: kopf
    deep-copies the whole body on every event of a Prediction, managedFields and status
    included, to drop them at once (about 7% of the operator's CPU in the benchmark)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        if extra_fields:  # a field handler's fields may be anywhere
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        kept = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        # Labels and annotations are diffed; ownerReferences name kopf's keys.
        kept["metadata"] = {
            k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta
        }
        return super().build(body=kopf.Body(cast(kopf.RawBody, kept)))


def operator_identity() -> str:
    """Like kopf's own: the pod name in a cluster, else user@host with a start stamp."""
    pod = os.environ.get("POD_ID") or os.environ.get("POD_NAME")
    if pod:
        return pod
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"whisperx-operator@{socket.gethostname()}/{stamp}/{random.randrange(16**4):04x}"


def kopf_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    # The spec's input can hold a data URI near 1 MB: never copy it into an annotation
    # (annotations are capped at 256 KiB). Only cancellation is diffed.
    # kopf ignores every annotation under its storage prefix when diffing, so the prefix
    # must not be whisperx.io (the cancel annotation lives there).
    settings.persistence.diffbase_storage = DiffBase(
        prefix=KOPF_PREFIX,
        key="last-handled-configuration",
        ignored_fields=["spec.input", "status"],
    )
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    # Only problems become Events from kopf's own logs; the operator posts its own.
    settings.posting.level = logging.WARNING
    # Server-side filtering: only the Jobs and pods the operator made reach it (those of
    # predictions and those of warm runners; handlers.py tells them apart).
    managed = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    settings.watching.label_selectors["batch", "v1", "jobs"] = managed
    settings.watching.label_selectors["v1", "pods"] = managed
    settings.watching.field_selectors["v1", "events"] = (
        "involvedObject.kind=Job,reason=FailedCreate"
    )
    # kopf starts a worker for every object with a watch event, without bound: under bulk
    # creation thousands of them, each holding its object's body and kopf's state for its
    # handlers (about 100 KB), waited for the handler slots. Bounded, an object waiting
    # its turn holds only its raw event. A worker keeps its slot while it waits for its
    # object's next event, so it waits briefly: kopf's own patches come back in
    # milliseconds, and it keeps its worker until they do. Twice the handler slots, so
    # that events needing no handler (most of them) pass while the slots are taken.
    settings.queueing.worker_limit = 2 * config.max_concurrent_handlers
    settings.queueing.idle_timeout = 0.5  # kopf: 5 s
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    return settings


async def run(config: OperatorConfig) -> None:
    identity = operator_identity()
    runtime = Runtime(config, identity=identity)
    await runtime.start()
    log.info(
        "whisperx operator %s: reports on :%d, liveness on :%d/healthz, %s",
        identity, config.report_port, config.liveness_port,
        f"namespaces {', '.join(config.namespaces)}" if config.namespaces else "cluster-wide",
    )  # fmt: skip
    try:
        await kopf.operator(
            registry=kopf.get_default_registry(),
            settings=kopf_settings(config),
            identity=identity,  # type: ignore[arg-type]  # kopf's NewType of str, not exported
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            peering_name=config.peering or None,
            standalone=not config.peering,
            priority=config.peering_priority,
            liveness_endpoint=config.liveness_endpoint,
            memo=kopf.Memo(runtime=runtime),
        )
    finally:
        await runtime.stop()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("WHISPERX_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"whisperx-operator: {exc}", file=sys.stderr)
        sys.exit(2)
    if not os.environ.get("WHISPERX_WEBHOOK_SECRET"):
        log.warning("WHISPERX_WEBHOOK_SECRET is not set: webhooks are signed with a random key")
    asyncio.run(run(config))
