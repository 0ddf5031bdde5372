"""Where predictions are created and canceled (a `Backend`), and how they are read.

Two backends sit behind the same gateway: `KubeBackend` creates Prediction resources for
the operator, `LocalBackend` (local mode) keeps predictions in Redis and runs the runner
as a local process. Both status writers keep the same Redis record, so reading is shared
(`PredictionReader`): `GET /v1/predictions/{id}` is one Redis round trip for either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from whisperx_api.records import PredictionRecord
from whisperx_api.store import RawPredictionView, Store, index_key
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

    # The most records read from Redis in one round trip while a page is built.
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
        render: Callable[[RawPredictionView], bytes],
    ) -> tuple[list[bytes], PageLinks]:
        """A page of rendered predictions (JSON as sent, newest first) and its links.

        At most `page_size` predictions, and a results array (`[`, the items, `, ` between
        them, `]`) of at most `page_bytes`: a prediction that would take the page past
        that is left to the next page, which its `next` link starts at. A page still
        carries one prediction, whole, when that one alone is larger (a transcript of
        hours of audio): Replicate's list holds full predictions, and a cut one would be
        invalid JSON.

        Records are read in batches whose size in Redis (asked first, STRLEN) fits what
        the page has left, so a request holds about twice the budget (what it read and
        what it rendered) or one large prediction, however many large ones there are.
        """
        rows = await self._rows(namespace, cursor, self.page_size + 1)
        has_more = len(rows) > self.page_size
        rows = rows[: self.page_size]  # nearest to the cursor first
        stored = await self.store.stored_sizes(namespace, [pid for pid, _ in rows])
        items: dict[str, bytes] = {}
        used = len(b"[]")
        kept = 0
        full = False
        while kept < len(rows) and not full:
            end, reading = kept + 1, stored[kept]
            while (
                end < len(rows)
                and end - kept < self.PAGE_READ_BATCH
                and used + reading + stored[end] <= self.page_bytes
            ):
                reading += stored[end]
                end += 1
            batch = rows[kept:end]
            rendered = await self._render(namespace, [pid for pid, _ in batch], render)
            for (prediction_id, _), item in zip(batch, rendered, strict=True):
                if item is not None:  # None: deleted since it was listed
                    cost = len(item) + (len(b", ") if items else 0)
                    if items and used + cost > self.page_bytes:
                        full = True
                        break
                    items[prediction_id] = item
                    used += cost
                kept += 1
        has_more = has_more or kept < len(rows)
        rows = rows[:kept]
        if cursor is not None and not cursor.older:
            rows.reverse()  # read oldest-first going back; a page is always newest first
        page = [items[pid] for pid, _ in rows if pid in items]
        return page, page_links(rows, cursor, has_more=has_more)

    async def _render(
        self, namespace: str, ids: list[str], render: Callable[[RawPredictionView], bytes]
    ) -> list[bytes | None]:
        """These predictions rendered (None: deleted since listed); what Redis returned
        is let go on return, so a page's outputs are held once, rendered."""
        views = await self.store.get_raw_views(namespace, ids)
        return [None if view is None else render(view) for view in views]

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
