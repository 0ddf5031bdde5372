"""Fetching `audio_file`: an http(s) URL or a data URI, into a local file.

Every limit a hostile or broken source could push against is bounded: size (checked on
the declared length and again while streaming), total and connect time, the number of
redirects, and the addresses a URL may reach. The address check runs in the resolver and
again for IP literals, on every redirect hop, so neither a redirect nor a DNS answer can
steer the download to loopback, link-local (cloud metadata) or private addresses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import aiohttp

from whisperx_api import netguard
from whisperx_api.netguard import AddressRefused, HostAllowList, IPAddress
from whisperx_api.resolver import GuardedResolver
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import InputError, RunnerError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Statuses worth a retry of the whole prediction; other 4xx answers are final.
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_CHUNK = 1 << 20


def _refused(exc: AddressRefused) -> InputError:
    return InputError(
        f"audio_file: {exc} (set WHISPERX_ALLOW_HOSTS to allow in-cluster sources)",
        reason="AddressRefused",
    )


def check_address(host: str, address: IPAddress, allow: HostAllowList) -> None:
    """Refuses a non-public address unless the host or the address is allow-listed."""
    try:
        netguard.check_address(host, address, allow)
    except AddressRefused as exc:
        raise _refused(exc) from None


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data URI (`data:[type][;params];base64,<payload>`)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError("audio_file: malformed data URI (no ',' before the payload)")
    params = header[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InputError("audio_file: data URI must be base64-encoded (data:audio/wav;base64,...)")
    # Percent-encoding is legal in a URI; decode it before the base64 alphabet check.
    raw = unquote_to_bytes(payload.strip()) if "%" in payload else payload.strip().encode()
    if len(raw) * 3 // 4 > max_bytes:
        raise InputError(f"audio_file: data URI is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("audio_file: data URI payload is not valid base64") from None
    if not data:
        raise InputError("audio_file: the audio is empty (0 bytes)", reason="InvalidAudio")
    return data


def _hop_checks(url: str, allow: HostAllowList) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InputError(f"audio_file: only http(s) URLs can be fetched, not {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise InputError(f"audio_file: URL has no host: {url!r}")
    try:
        # aiohttp skips the resolver for IP literals, so they are checked here; and the
        # path, for a host and port allow-listed for some paths only.
        netguard.check_url(url, allow)
    except AddressRefused as exc:
        raise _refused(exc) from None
    return host


def _status_error(url: str, status: int, phrase: str | None) -> RunnerError:
    text = f"audio_file: {_redact(url)} answered HTTP {status} {phrase or ''}".rstrip()
    if status >= 500 or status in _TRANSIENT_STATUSES:
        return RunnerError(text, reason="AudioFetchFailed")
    return InputError(text, reason="AudioFetchFailed")


def _redact(url: str) -> str:
    # Presigned URLs carry credentials in the query string: keep them out of errors.
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # no user:password; IPv6 keeps its brackets
    return f"{parts.scheme}://{host}{parts.path}"


async def download(url: str, dest: Path, config: RunnerConfig) -> Path:
    """Downloads an http(s) URL to `dest` within the configured bounds."""
    timeout = aiohttp.ClientTimeout(
        total=config.fetch_timeout, sock_connect=min(config.connect_timeout, config.fetch_timeout)
    )
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(config.allow_hosts))
    # trust_env=False: a proxy from the environment would bypass the address checks.
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:
        try:
            return await _follow(session, url, dest, config)
        except AddressRefused as exc:
            raise _refused(exc) from None
        except TimeoutError:
            raise RunnerError(
                f"audio_file: fetching {_redact(url)} timed out after {config.fetch_timeout:g} s",
                reason="AudioFetchFailed",
            ) from None
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error.strerror or str(exc.os_error)
            raise RunnerError(
                f"audio_file: cannot connect to {exc.host}:{exc.port} ({cause})",
                reason="AudioFetchFailed",
            ) from None
        except aiohttp.ClientError as exc:
            raise RunnerError(
                f"audio_file: fetching {_redact(url)} failed: {exc.__class__.__name__} {exc}",
                reason="AudioFetchFailed",
            ) from None


async def _follow(
    session: aiohttp.ClientSession, url: str, dest: Path, config: RunnerConfig
) -> Path:
    current = url
    for _ in range(config.max_redirects + 1):
        _hop_checks(current, config.allow_hosts)
        async with session.get(current, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise InputError(
                        f"audio_file: {_redact(current)} redirected without a Location",
                        reason="AudioFetchFailed",
                    )
                current = urljoin(current, location)
                continue
            if response.status >= 400:
                raise _status_error(current, response.status, response.reason)
            await _save(response, dest, config.max_audio_bytes)
            return dest
    raise InputError(
        f"audio_file: more than {config.max_redirects} redirects", reason="AudioFetchFailed"
    )


async def _save(response: aiohttp.ClientResponse, dest: Path, max_bytes: int) -> None:
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise InputError(
            f"audio_file is too large: {declared} bytes declared, the limit is {max_bytes}",
            reason="AudioTooLarge",
        )
    total = 0
    with dest.open("wb") as out:
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise InputError(
                    f"audio_file is too large: more than {max_bytes} bytes",
                    reason="AudioTooLarge",
                )
            out.write(chunk)
    if total == 0:
        raise InputError("audio_file: the audio is empty (0 bytes)", reason="InvalidAudio")


async def fetch_audio(source: str, dest_dir: Path, config: RunnerConfig) -> Path:
    """Brings `audio_file` to a local file under `dest_dir` and returns its path."""
    dest = dest_dir / "audio"
    if source.startswith("data:"):
        data = decode_data_uri(source, config.max_audio_bytes)
        await asyncio.to_thread(dest.write_bytes, data)
        return dest
    if source.startswith(("http://", "https://")):
        return await download(source, dest, config)
    raise InputError("audio_file must be an http(s) URL or a data URI")


def describe_source(source: str) -> str:
    """A loggable name for `audio_file` (no data URI payload, no URL query)."""
    if source.startswith("data:"):
        kind = source[5:].split(",", 1)[0].split(";", 1)[0] or "unknown type"
        return f"data URI ({kind}, {len(source)} characters)"
    return _redact(source)
