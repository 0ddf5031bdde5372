"""Replicate's files API: uploads that a prediction's input can point at.

The official clients upload a local file given as input (`open("a.wav", "rb")`) to
`POST /v1/files` and pass the file's `urls.get` as the input. The runner fetches that
URL without an API token, so it is signed (HMAC, with an expiry) instead. Files live in
Redis, per namespace, and expire like Replicate's (24 hours by default).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from whisperx_api.lifecycle import format_time

DEFAULT_TTL_SECONDS = 24 * 3600


def _file_key(namespace: str, file_id: str) -> str:
    return f"wx:file:{namespace}:{file_id}"


def _index_key(namespace: str) -> str:
    return f"wx:files:{namespace}"


def download_signature(key: bytes, namespace: str, file_id: str, expires: int) -> str:
    message = f"{namespace}/{file_id}/{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def download_path(key: bytes, namespace: str, file_id: str, expires: int) -> str:
    signature = download_signature(key, namespace, file_id, expires)
    return f"/v1/files/{namespace}/{file_id}/download?expires={expires}&signature={signature}"


def valid_download(
    key: bytes, namespace: str, file_id: str, expires: str, signature: str, now: float
) -> bool:
    if not expires.isdigit() or int(expires) < now:
        return False
    expected = download_signature(key, namespace, file_id, int(expires))
    return hmac.compare_digest(expected, signature)


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
    def __init__(self, client: aioredis.Redis, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds

    async def put(
        self,
        namespace: str,
        file_id: str,
        *,
        name: str,
        content_type: str,
        content: bytes,
        metadata: dict[str, Any],
    ) -> StoredFile:
        now = time.time()
        stored = StoredFile(
            id=file_id,
            namespace=namespace,
            name=name,
            content_type=content_type,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            md5=hashlib.md5(content, usedforsecurity=False).hexdigest(),
            metadata=metadata,
            created_at=now,
            expires_at=now + self.ttl_seconds,
        )
        info = {k: v for k, v in stored.__dict__.items() if k != "metadata"}
        key = _file_key(namespace, file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            # The connection decodes replies as text, so the bytes travel as base64.
            pipe.hset(
                key,
                mapping={
                    "info": json.dumps({**info, "metadata": metadata}),
                    "content": base64.b64encode(content).decode(),
                },
            )
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(_index_key(namespace), {file_id: now})
            pipe.zremrangebyscore(_index_key(namespace), "-inf", now - self.ttl_seconds)
            await pipe.execute()
        return stored

    async def get(self, namespace: str, file_id: str) -> StoredFile | None:
        raw = await self.redis.hget(_file_key(namespace, file_id), "info")
        return StoredFile(**json.loads(raw)) if raw else None

    async def content(self, namespace: str, file_id: str) -> tuple[StoredFile, bytes] | None:
        info, content = await self.redis.hmget(_file_key(namespace, file_id), "info", "content")
        if info is None or content is None:
            return None
        return StoredFile(**json.loads(info)), base64.b64decode(content)

    async def list(self, namespace: str, limit: int = 100) -> list[StoredFile]:
        ids = await self.redis.zrevrangebyscore(
            _index_key(namespace), "+inf", time.time() - self.ttl_seconds, start=0, num=limit
        )
        files = [await self.get(namespace, str(file_id)) for file_id in ids]
        return [f for f in files if f is not None]

    async def delete(self, namespace: str, file_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_file_key(namespace, file_id))
            pipe.zrem(_index_key(namespace), file_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)
