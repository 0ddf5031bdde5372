"""Prediction answers as JSON text, built for the read path.

The output is spliced in as the JSON text Redis holds (a long transcript is never parsed
and re-encoded), and the rest of an unchanged prediction is rendered once.
"""

from __future__ import annotations

import hashlib
import json

from whisperx_api.records import PredictionRecord, to_replicate
from whisperx_api.store import RawPredictionView
from whisperx_gateway.parsing import list_input


def _head(
    record: PredictionRecord, logs: str, base_url: str, status: str | None
) -> tuple[str, bool]:
    """The object without its output, as JSON text missing its closing brace."""
    body = to_replicate(record, None, logs, base_url)
    del body["output"]
    if status is not None:
        body["status"] = status
    return json.dumps(body)[:-1], record.data_removed


def _splice(head: str, output_json: str | None) -> str:
    return f'{head}, "output": {output_json or "null"}}}'


def list_item(view: RawPredictionView, base_url: str) -> bytes:
    """A prediction as a list page carries it, encoded as sent: whole, but for long
    input values (data URIs), which `list_input` summarizes."""
    body = to_replicate(view.record, None, view.logs, base_url)
    del body["output"]
    body["input"] = list_input(body["input"])
    output = None if view.record.data_removed else view.output_json
    return _splice(json.dumps(body)[:-1], output).encode()


# About 32 MB of renderings (JSON text is ASCII: a character is a byte, plus the str's
# own overhead).
DEFAULT_MAX_CHARS = 32 * 1024 * 1024


class Renderer:
    """Prediction answers, with the renderings of unchanged records kept.

    Clients poll (the official ones GET a prediction every 0.5 s until it ends) and a
    finished prediction never changes; the key is a digest of the exact text Redis
    returned, so a kept rendering is never stale. Bounded by the characters kept (a
    rendering carries the input, up to a megabyte of data URI), the oldest going first;
    one larger than an eighth of the bound is rendered each time instead.
    """

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, max_logs: int = 64 * 1024) -> None:
        self.max_chars = max_chars
        self.max_logs = max_logs
        self._heads: dict[bytes, tuple[str, bool]] = {}
        self._chars = 0

    @property
    def kept_chars(self) -> int:
        return self._chars

    def render(self, view: RawPredictionView, base_url: str, status: str | None = None) -> str:
        if status is not None or not view.record_json or len(view.logs) > self.max_logs:
            head, data_removed = _head(view.record, view.logs, base_url, status)
            return _splice(head, None if data_removed else view.output_json)
        key = _key(view.record_json, view.logs, base_url)
        found = self._heads.get(key)
        if found is None:
            found = _head(view.record, view.logs, base_url, None)
            self._keep(key, found)
        head, data_removed = found
        return _splice(head, None if data_removed else view.output_json)

    def _keep(self, key: bytes, rendered: tuple[str, bool]) -> None:
        size = len(rendered[0])
        if size > self.max_chars // 8:
            return
        self._heads[key] = rendered
        self._chars += size
        while self._chars > self.max_chars:
            oldest = next(iter(self._heads))
            self._chars -= len(self._heads.pop(oldest)[0])


def _key(*parts: str) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.digest()
