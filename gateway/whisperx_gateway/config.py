"""Gateway settings from the environment (names in docs/architecture.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from whisperx_api import webhooks
from whisperx_api.hostport import ALL_INTERFACES
from whisperx_api.netguard import HostAllowList
from whisperx_gateway.auth import TokenMap
from whisperx_gateway.files import DEFAULT_QUOTA_BYTES
from whisperx_gateway.models import DEFAULT_MODELS, ModelCatalog

# A data-URI audio file may be up to 1,000,000 characters (whisperx_api.schema); leave
# room for the rest of the body, and answer larger bodies 413 before reading them.
DEFAULT_MAX_BODY_BYTES = 1_200_000


REDIS_BACKGROUND_CONNECTIONS = 32


def redis_pool_size(max_in_flight: int) -> int:
    """Redis connections: one per request in flight, and some for the background work
    (event hub, webhook sender, local mode's runs), so a full gateway never finds the
    pool empty."""
    return max_in_flight + REDIS_BACKGROUND_CONNECTIONS


class ConfigError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def load_tokens(env: Mapping[str, str]) -> TokenMap | None:
    path = env.get("WHISPERX_TOKENS_FILE", "").strip()
    if path:
        return TokenMap.load_file(Path(path))
    text = env.get("WHISPERX_TOKENS", "").strip()
    return TokenMap.parse_env(text) if text else None


@dataclass
class GatewayConfig:
    tokens: TokenMap
    redis_url: str = "redis://127.0.0.1:6379/0"
    models: ModelCatalog = field(default_factory=lambda: ModelCatalog(DEFAULT_MODELS))
    # Base of the URLs in answers (urls.get, next); None: taken from each request's Host.
    public_url: str | None = None
    # Where runners reach this gateway (e.g. its in-cluster Service) when the public URL
    # is not reachable from them: links to uploaded files in inputs are rewritten to it.
    internal_url: str | None = None
    # "": every interface, IPv4 and IPv6 (whisperx_api.hostport).
    host: str = ALL_INTERFACES
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Requests in flight (including those held by Prefer: wait) before answering 503.
    max_in_flight: int = 1000
    # One token's share of them before answering it 429; None: a quarter of the total.
    max_in_flight_per_token: int | None = None
    # Seconds to receive a whole request body (an upload included) before answering 408;
    # also how long a client may take none of an answer before it is disconnected.
    body_timeout: int = 120
    max_wait_seconds: int = 60
    page_size: int = 100
    # The most a list page's results take as sent; a prediction larger alone has a page
    # of its own.
    page_bytes: int = 4 << 20
    metrics: bool = True
    # The master `whsec_` secret; each namespace's webhooks are signed with one derived
    # from it (whisperx_api.webhooks.tenant_secret).
    webhook_secret: str | None = None
    # Internal hosts webhooks may name (WHISPERX_WEBHOOK_ALLOW_HOSTS).
    webhook_allow_hosts: HostAllowList = field(default_factory=HostAllowList)
    # Signs the download URLs of uploaded files (shared by all replicas); None: no uploads.
    files_key: bytes | None = None
    max_file_bytes: int = 100 * 1024 * 1024
    # What one namespace's live uploads may take in all.
    files_quota_bytes: int = DEFAULT_QUOTA_BYTES

    @property
    def tenant_in_flight(self) -> int:
        return self.max_in_flight_per_token or max(1, self.max_in_flight // 4)

    @property
    def redis_pool_size(self) -> int:
        return redis_pool_size(self.max_in_flight)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, tokens: TokenMap | None = None
    ) -> GatewayConfig:
        """`tokens`: local mode's own; otherwise read from the environment."""
        env = os.environ if env is None else env
        tokens = tokens or load_tokens(env)
        if tokens is None:
            raise ConfigError("set WHISPERX_TOKENS_FILE or WHISPERX_TOKENS (token=namespace)")
        models = env.get("WHISPERX_MODELS", "").strip()
        return cls(
            tokens=tokens,
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            models=ModelCatalog.parse(models) if models else ModelCatalog(DEFAULT_MODELS),
            public_url=env.get("WHISPERX_PUBLIC_URL", "").strip().rstrip("/") or None,
            internal_url=env.get("WHISPERX_INTERNAL_URL", "").strip().rstrip("/") or None,
            host=env.get("WHISPERX_GATEWAY_HOST", "").strip() or cls.host,
            port=_int(env, "WHISPERX_GATEWAY_PORT", cls.port),
            max_body_bytes=_int(env, "WHISPERX_MAX_BODY_BYTES", cls.max_body_bytes, 1024),
            max_in_flight=_int(env, "WHISPERX_MAX_IN_FLIGHT", cls.max_in_flight),
            max_in_flight_per_token=_int(env, "WHISPERX_MAX_IN_FLIGHT_PER_TOKEN", 0, 0) or None,
            body_timeout=_int(env, "WHISPERX_BODY_TIMEOUT_SECONDS", cls.body_timeout),
            max_wait_seconds=_int(env, "WHISPERX_MAX_WAIT_SECONDS", cls.max_wait_seconds),
            page_size=_int(env, "WHISPERX_PAGE_SIZE", cls.page_size),
            page_bytes=_int(env, "WHISPERX_PAGE_MAX_BYTES", cls.page_bytes),
            metrics=_bool(env, "WHISPERX_METRICS", cls.metrics),
            webhook_secret=env.get("WHISPERX_WEBHOOK_SECRET", "").strip() or None,
            webhook_allow_hosts=webhooks.allow_list(env),
            files_key=env.get("WHISPERX_FILES_KEY", "").strip().encode() or None,
            max_file_bytes=_int(env, "WHISPERX_MAX_FILE_BYTES", cls.max_file_bytes),
            files_quota_bytes=_int(env, "WHISPERX_FILES_QUOTA_BYTES", cls.files_quota_bytes),
        )
