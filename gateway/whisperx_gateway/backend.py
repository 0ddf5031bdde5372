"""Where predictions are created and canceled (a `Backend`), and how they are read.

Two backends sit behind the same gateway: `KubeBackend` creates Prediction resources for
the operator, `LocalBackend` (local mode) keeps predictions in Redis and runs the runner
as a local process. Both status writers keep the same Redis record, so reading is shared
(`PredictionReader`): `GET /v1/predictions/{id}` is one Redis round trip for either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from whisperx_api.records import PredictionRecord
from whisperx_api.store import PredictionView, RawPredictionView, Store, index_key
from whisperx_gateway.models import ModelRef
from whisperx_gateway.parsing import Cursor, PageLinks, page_links


@dataclass(frozen=True)
class NewPrediction:
    """A validated create request, with its id chosen."""

    id: str
    namespace: str
    input: dict[str, Any]  # without secret fields
    secrets: dict[str, str]  # secret input fields, for the runner only
    model: ModelRef
    webhook: str | None
    webhook_events_filter: tuple[str, ...]
    run_deadline_seconds: int | None


class BackendError(Exception):
    """The backend cannot take the request now (answered 503 with Retry-After)."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, new: NewPrediction) -> PredictionRecord:
        """Makes the prediction exist durably; returns its record."""
        ...

    async def cancel(self, record: PredictionRecord) -> PredictionRecord:
        """Asks a prediction that has not ended to stop; returns its record now."""
        ...

    async def lookup(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        """The record of a prediction that has none in Redis yet (just created)."""
        ...

    def metric_lines(self) -> list[str]:
        """The backend's own metrics, in the text exposition format."""
        ...


class PredictionReader:
    """Reads shared by both backends: the Redis records the status writers keep."""

    # Records read from Redis at a time while a page is built (each may hold a 1 MB input).
    PAGE_READ_BATCH = 10

    def __init__(
        self, store: Store, backend: Backend, page_size: int = 100, page_bytes: int = 4 << 20
    ) -> None:
        self.store = store
        self.backend = backend
        self.page_size = page_size
        self.page_bytes = page_bytes

    async def view(self, namespace: str, prediction_id: str) -> RawPredictionView | None:
        """One Redis round trip; the backend only for a prediction not in Redis yet."""
        view = await self.store.get_raw_view(namespace, prediction_id)
        if view is not None:
            return view
        record = await self.backend.lookup(namespace, prediction_id)
        return None if record is None else RawPredictionView.of(record, None, "")

    async def page(
        self,
        namespace: str,
        cursor: Cursor | None,
        render: Callable[[PredictionView], dict[str, Any]],
    ) -> tuple[list[str], PageLinks]:
        """A page of rendered predictions (JSON texts, newest first) and its links.

        At most `page_size` predictions and about `page_bytes` of JSON: a page that
        reaches the byte budget ends early (with at least one prediction) and its `next`
        link goes on from there, so neither the answer nor the memory it takes grows with
        what the predictions hold.
        """
        rows = await self._rows(namespace, cursor, self.page_size + 1)
        has_more = len(rows) > self.page_size
        rows = rows[: self.page_size]  # nearest to the cursor first
        texts: dict[str, str] = {}
        size = 0
        kept = 0
        while kept < len(rows) and not (texts and size >= self.page_bytes):
            batch = rows[kept : kept + self.PAGE_READ_BATCH]
            views = await self.store.get_views(namespace, [pid for pid, _ in batch])
            rendered = {v.record.id: json.dumps(render(v)) for v in views}
            for prediction_id, _ in batch:
                if texts and size >= self.page_bytes:
                    break
                text = rendered.get(prediction_id)
                if text is not None:  # a record deleted since it was listed
                    texts[prediction_id] = text
                    size += len(text)
                kept += 1
        has_more = has_more or kept < len(rows)
        rows = rows[:kept]
        if cursor is not None and not cursor.older:
            rows.reverse()  # read oldest-first going back; a page is always newest first
        page = [texts[pid] for pid, _ in rows if pid in texts]
        return page, page_links(rows, cursor, has_more=has_more)

    async def _rows(
        self, namespace: str, cursor: Cursor | None, want: int
    ) -> list[tuple[str, float]]:
        """Up to `want` index rows beyond `cursor`, nearest first.

        The score bound is inclusive so rows sharing the cursor's instant are found; the
        cursor's (score, id) order then decides, reading on while a batch is all ties.
        """
        key = index_key(namespace)
        kept: list[tuple[str, float]] = []
        offset = 0
        while len(kept) < want:
            if cursor is None:
                batch = await self.store.redis.zrevrangebyscore(
                    key, "+inf", "-inf", start=offset, num=want, withscores=True
                )
            elif cursor.older:
                batch = await self.store.redis.zrevrangebyscore(
                    key, cursor.score, "-inf", start=offset, num=want, withscores=True
                )
            else:
                batch = await self.store.redis.zrangebyscore(
                    key, cursor.score, "+inf", start=offset, num=want, withscores=True
                )
            for member, score in cast(list[tuple[str, float]], batch):
                row = (str(member), float(score))
                if cursor is None or cursor.admits(row[1], row[0]):
                    kept.append(row)
            if len(batch) < want:
                break
            offset += len(batch)
        return kept[:want]
