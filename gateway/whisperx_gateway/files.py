"""Replicate's files API: uploads that a prediction's input can point at.

The official clients upload a local file given as input (`open("a.wav", "rb")`) to
`POST /v1/files` and pass the file's `urls.get` as the input. The runner fetches that
URL without an API token, so it is signed (HMAC, with an expiry) instead. Files live in
Redis, per namespace, and expire like Replicate's (24 hours by default). Their bytes go
to Redis as they arrive and come back in pieces: a request holds about a megabyte of a
file, whatever its size.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aiohttp.helpers import content_disposition_header

from whisperx_api.lifecycle import format_time

DEFAULT_TTL_SECONDS = 24 * 3600
# What one namespace's live uploads may take (their bytes, before Redis's base64).
DEFAULT_QUOTA_BYTES = 1 << 30


def _file_key(namespace: str, file_id: str) -> str:
    return f"wx:file:{namespace}:{file_id}"


def _content_key(namespace: str, file_id: str) -> str:
    return f"wx:file:{namespace}:{file_id}:content"


def _staging_key(namespace: str, file_id: str) -> str:
    return f"wx:file:{namespace}:{file_id}:upload"


# A file travels to and from Redis in pieces of this many bytes: a multiple of 3, so the
# pieces' base64 texts join into the whole's and a whole piece's text splits off again.
PIECE_BYTES = 3 * 256 * 1024
_PIECE_CHARS = PIECE_BYTES // 3 * 4
# An upload's staging key outlives a stalled or killed request by this long at most.
_STAGING_SECONDS = 3600


def _index_key(namespace: str) -> str:
    return f"wx:files:{namespace}"


def _sizes_key(namespace: str) -> str:
    return f"wx:files:{namespace}:sizes"


# Stores a staged upload unless the namespace's live files and it would exceed the quota;
# first forgets the files that have expired. Returns -1 when stored, else the bytes in use
# (the staged bytes are then deleted).
_PUT_WITHIN_QUOTA = """
local index, sizes, file, content, staging = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, ttl, quota, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                              tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl)
for _, id in ipairs(expired) do
  redis.call('HDEL', sizes, id)
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
local used = 0
for _, bytes in ipairs(redis.call('HVALS', sizes)) do
  used = used + tonumber(bytes)
end
if used + size > quota then
  redis.call('DEL', staging)
  return used
end
if redis.call('EXISTS', staging) == 1 then
  redis.call('RENAME', staging, content)
else
  redis.call('SET', content, '')
end
redis.call('EXPIRE', content, ttl)
redis.call('HSET', file, 'info', ARGV[6])
redis.call('EXPIRE', file, ttl)
redis.call('ZADD', index, now, ARGV[5])
redis.call('HSET', sizes, ARGV[5], size)
redis.call('EXPIRE', sizes, ttl)
redis.call('EXPIRE', index, ttl)
return -1
"""


class QuotaExceeded(Exception):
    def __init__(self, used: int, quota: int) -> None:
        super().__init__(f"{used} of {quota} bytes in use")
        self.used, self.quota = used, quota


class FileTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


# Where uploaded files and their download links live: all a runner fetches from here.
FILES_PATH = "/v1/files/"


def download_signature(key: bytes, namespace: str, file_id: str, expires: int) -> str:
    message = f"{namespace}/{file_id}/{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def download_path(key: bytes, namespace: str, file_id: str, expires: int) -> str:
    signature = download_signature(key, namespace, file_id, expires)
    query = f"expires={expires}&signature={signature}"
    return f"{FILES_PATH}{namespace}/{file_id}/download?{query}"


def valid_download(
    key: bytes, namespace: str, file_id: str, expires: str, signature: str, now: float
) -> bool:
    # ASCII digits only (str.isdigit admits '²'), and no more than a timestamp has.
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return False
    if int(expires) < now:
        return False
    expected = download_signature(key, namespace, file_id, int(expires))
    return hmac.compare_digest(expected, signature)


# What a download may be served as; anything else (text/html from a hostile upload, on
# this gateway's own origin) is served as opaque bytes.
_SERVED_TYPE = re.compile(r"^(audio|video)/[a-z0-9][a-z0-9.+-]{0,100}$")


def download_headers(stored: StoredFile) -> dict[str, str]:
    """Headers of a download: an audio or video type without parameters, else
    application/octet-stream; never sniffed, never rendered (an attachment, sandboxed)."""
    media_type = stored.content_type.split(";", 1)[0].strip().lower()
    if not _SERVED_TYPE.match(media_type):
        media_type = "application/octet-stream"
    return {
        "Content-Type": media_type,
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": content_disposition_header("attachment", filename=stored.name),
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }


@dataclass(frozen=True)
class StoredFile:
    id: str
    namespace: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    metadata: dict[str, Any]
    created_at: float
    expires_at: float

    def to_replicate(self, base_url: str, key: bytes) -> dict[str, Any]:
        """Replicate's file object; `urls.get` downloads it without a token until expiry."""
        path = download_path(key, self.namespace, self.id, int(self.expires_at))
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "etag": self.md5,
            "checksums": {"sha256": self.sha256, "md5": self.md5},
            "metadata": self.metadata,
            "created_at": format_time(datetime.fromtimestamp(self.created_at, UTC)),
            "expires_at": format_time(datetime.fromtimestamp(self.expires_at, UTC)),
            "urls": {"get": base_url.rstrip("/") + path},
        }


class FileStore:
    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
    ) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self.quota_bytes = quota_bytes
        self._put = client.register_script(_PUT_WITHIN_QUOTA)

    def upload(self, namespace: str, file_id: str, max_bytes: int) -> Upload:
        return Upload(self, namespace, file_id, max_bytes)

    async def used(self, namespace: str) -> int:
        """The bytes a namespace's files take (those expired but not yet forgotten too)."""
        return sum(int(size) for size in await self.redis.hvals(_sizes_key(namespace)))

    async def get(self, namespace: str, file_id: str) -> StoredFile | None:
        raw = await self.redis.hget(_file_key(namespace, file_id), "info")
        return StoredFile(**json.loads(raw)) if raw else None

    async def pieces(self, namespace: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a piece at a time (none once it has expired)."""
        key, start = _content_key(namespace, file_id), 0
        while text := await self.redis.getrange(key, start, start + _PIECE_CHARS - 1):
            yield base64.b64decode(text)
            start += _PIECE_CHARS

    async def list(self, namespace: str, limit: int = 100) -> list[StoredFile]:
        ids = await self.redis.zrevrangebyscore(
            _index_key(namespace), "+inf", time.time() - self.ttl_seconds, start=0, num=limit
        )
        files = [await self.get(namespace, str(file_id)) for file_id in ids]
        return [f for f in files if f is not None]

    async def delete(self, namespace: str, file_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_file_key(namespace, file_id), _content_key(namespace, file_id))
            pipe.zrem(_index_key(namespace), file_id)
            pipe.hdel(_sizes_key(namespace), file_id)
            deleted, _, _ = await pipe.execute()
        return bool(deleted)


class Upload:
    """A file on its way in: each piece goes to a staging key in Redis as it arrives
    (hashed on the way), and `finish` stores the whole if the namespace's quota allows.
    Past `max_bytes`, or the quota, it stops with FileTooLarge or QuotaExceeded; `abort`
    drops what was staged."""

    def __init__(self, store: FileStore, namespace: str, file_id: str, max_bytes: int) -> None:
        self.store, self.namespace, self.file_id = store, namespace, file_id
        self.max_bytes = max_bytes
        self.size = 0
        self._used: int | None = None
        self._pending = bytearray()
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)

    async def write(self, chunk: bytes) -> None:
        if self._used is None:
            self._used = await self.store.used(self.namespace)
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise FileTooLarge(self.max_bytes)
        if self._used + self.size > self.store.quota_bytes:
            # Known to fail at `finish`: refused now, before it is all staged.
            raise QuotaExceeded(self._used, self.store.quota_bytes)
        self._sha256.update(chunk)
        self._md5.update(chunk)
        self._pending += chunk
        if len(self._pending) >= PIECE_BYTES:
            whole = len(self._pending) - len(self._pending) % 3
            await self._stage(bytes(self._pending[:whole]))
            del self._pending[:whole]

    async def _stage(self, data: bytes) -> None:
        key = _staging_key(self.namespace, self.file_id)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            # The connection decodes replies as text, so the bytes travel as base64.
            pipe.append(key, base64.b64encode(data))
            pipe.expire(key, _STAGING_SECONDS)
            await pipe.execute()

    async def finish(self, *, name: str, content_type: str, metadata: dict[str, Any]) -> StoredFile:
        if self._pending:
            await self._stage(bytes(self._pending))
            self._pending.clear()
        store, namespace, file_id = self.store, self.namespace, self.file_id
        now = time.time()
        stored = StoredFile(
            id=file_id,
            namespace=namespace,
            name=name,
            content_type=content_type,
            size=self.size,
            sha256=self._sha256.hexdigest(),
            md5=self._md5.hexdigest(),
            metadata=metadata,
            created_at=now,
            expires_at=now + store.ttl_seconds,
        )
        info = {k: v for k, v in stored.__dict__.items() if k != "metadata"}
        keys = [
            _index_key(namespace), _sizes_key(namespace), _file_key(namespace, file_id),
            _content_key(namespace, file_id), _staging_key(namespace, file_id),
        ]  # fmt: skip
        used = await store._put(
            keys=keys,
            args=[now, store.ttl_seconds, store.quota_bytes, self.size, file_id,
                  json.dumps({**info, "metadata": metadata})],
        )  # fmt: skip
        if int(used) >= 0:
            raise QuotaExceeded(int(used), store.quota_bytes)
        return stored

    async def abort(self) -> None:
        await self.store.redis.delete(_staging_key(self.namespace, self.file_id))
