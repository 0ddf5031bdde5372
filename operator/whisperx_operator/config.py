"""Operator configuration: environment settings and hardware profiles.

A hardware profile says how a prediction's Job runs: the container's resources, where it
may be scheduled, and which model and precision the runner uses. The three built-in
profiles match the three Replicate models of the original service; a YAML file
(`WHISPERX_PROFILES_FILE`, profile name -> profile) replaces them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from whisperx_api.hostport import ALL_INTERFACES, join_host_port, wildcard_for
from whisperx_api.webhooks import generate_secret


class ConfigError(Exception):
    """The operator cannot start with this configuration."""


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    resources: dict[str, dict[str, str | int]] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    model: str = "large-v3"
    compute_type: Literal["float16", "int8", "int8_float16", "float32"] = Field(
        "float16", alias="computeType"
    )
    device: Literal["cuda", "cpu"] = "cuda"
    batch_size: int | None = Field(None, alias="batchSize", ge=1, le=256)
    # Warm runners: how long a runner waits for the next prediction of this profile
    # (in its namespace) before it exits. 0: one prediction per Job, a Job owned by it.
    idle_seconds: int = Field(0, alias="idleSeconds", ge=0, le=86400)
    # The most predictions one runner serves (0: no limit), and the most runner Jobs of
    # this profile at once, all namespaces together.
    max_predictions: int = Field(0, alias="maxPredictions", ge=0)
    max_runners: int = Field(10, alias="maxRunners", ge=1)

    @property
    def warm(self) -> bool:
        return self.idle_seconds > 0


_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _gpu(memory: str, cpu: str, batch_size: int) -> HardwareProfile:
    return HardwareProfile(
        resources={
            "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": "1"},
            "limits": {"memory": memory, "nvidia.com/gpu": "1"},
        },
        tolerations=[_GPU_TOLERATION],
        batch_size=batch_size,
    )


# The original service's three models: a low-cost 16 GB GPU (T4/L4 class), an A40 48 GB,
# an A100 80 GB. Host memory grows with the GPU class (larger batches, longer audio).
DEFAULT_PROFILES: dict[str, HardwareProfile] = {
    "whisperx": _gpu("16Gi", "4", 16),
    "whisperx-a40-large": _gpu("32Gi", "8", 32),
    "whisperx-a100-80gb": _gpu("64Gi", "8", 64),
}


def parse_profiles(data: Any) -> dict[str, HardwareProfile]:
    if not isinstance(data, Mapping) or not data:
        raise ConfigError("hardware profiles: expected a mapping of profile name -> profile")
    profiles = {}
    for name, spec in data.items():
        try:
            profiles[str(name)] = HardwareProfile.model_validate(spec or {})
        except ValidationError as exc:
            raise ConfigError(f"hardware profile {name!r}: {exc}") from exc
    return profiles


def load_profiles(path: str | None) -> dict[str, HardwareProfile]:
    if not path:
        return dict(DEFAULT_PROFILES)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read WHISPERX_PROFILES_FILE {path}: {exc}") from exc
    return parse_profiles(data)


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from exc


def _required_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    assert value is not None
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _required_int(env, name, default)
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, not {value}")
    return value


def _json(env: Mapping[str, str], name: str, default: Any) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be JSON: {exc}") from exc


@dataclass(frozen=True)
class OperatorConfig:
    report_key: bytes
    redis_url: str = "redis://localhost:6379/0"
    report_base_url: str = "http://whisperx-operator.whisperx-system.svc:8081"
    # Base of the Replicate `urls` in webhook bodies: the gateway's public address.
    public_url: str = "http://localhost:8000"
    webhook_secret: str = field(default_factory=generate_secret)
    profiles: dict[str, HardwareProfile] = field(default_factory=lambda: dict(DEFAULT_PROFILES))
    runner_image: str = "whisperx/runner:0.1.0"
    runner_command: tuple[str, ...] = ("whisperx-runner", "run")
    runner_image_pull_policy: str = "IfNotPresent"
    runner_service_account: str = ""
    # Extra plain environment for runners (e.g. WHISPERX_ALLOW_HOSTS); never secrets.
    runner_env: dict[str, str] = field(default_factory=dict)
    model_cache_pvc: str = ""
    kueue_queue: str = ""
    hf_token_secret: str = ""
    hf_token_secret_key: str = "token"
    default_ttl_seconds: int | None = 86400
    default_start_deadline_seconds: int = 3600
    default_active_deadline_seconds: int = 7200
    default_backoff_limit: int = 0
    # How long a runner container may wait on what a kubelet retries (image pull back-off,
    # a missing Secret) before its prediction fails; the start deadline bounds it too.
    waiting_grace_seconds: int = 300
    namespaces: tuple[str, ...] = ()
    # kopf runs a handler per object at once, unbounded: under bulk creation thousands
    # then wait for the Kubernetes client's 100 connections and time out (30 s), and
    # retry. Past this many, handlers wait their turn instead.
    max_concurrent_handlers: int = 32
    peering: str = "whisperx"
    peering_priority: int = 0
    # "": every interface, IPv4 and IPv6 (pods are reached on their pod IP, either family).
    listen_host: str = ALL_INTERFACES
    liveness_port: int = 8080
    report_port: int = 8081
    # The pod's IP (downward API): its family picks the one address kopf's liveness
    # endpoint binds when listen_host is every interface.
    pod_ip: str = ""

    @property
    def liveness_endpoint(self) -> str:
        host = self.listen_host or wildcard_for(self.pod_ip)
        return f"http://{join_host_port(host, self.liveness_port)}/healthz"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        key = env.get("WHISPERX_REPORT_KEY", "")
        if len(key) < 16:
            raise ConfigError("WHISPERX_REPORT_KEY must be set (at least 16 characters)")
        command = _json(env, "WHISPERX_RUNNER_COMMAND", list(cls.runner_command))
        if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
            raise ConfigError("WHISPERX_RUNNER_COMMAND must be a JSON list of strings")
        runner_env = _json(env, "WHISPERX_RUNNER_ENV", {})
        if not isinstance(runner_env, dict):
            raise ConfigError("WHISPERX_RUNNER_ENV must be a JSON object")
        ttl = _int(env, "WHISPERX_DEFAULT_TTL_SECONDS", cls.default_ttl_seconds)
        namespaces = env.get("WHISPERX_NAMESPACES", "")
        extra: dict[str, Any] = {}
        if env.get("WHISPERX_WEBHOOK_SECRET"):
            extra["webhook_secret"] = env["WHISPERX_WEBHOOK_SECRET"]
        return cls(
            report_key=key.encode(),
            redis_url=env.get("REDIS_URL", cls.redis_url),
            report_base_url=env.get("WHISPERX_REPORT_BASE_URL", cls.report_base_url).rstrip("/"),
            public_url=env.get("WHISPERX_PUBLIC_URL", cls.public_url),
            profiles=load_profiles(env.get("WHISPERX_PROFILES_FILE")),
            runner_image=env.get("WHISPERX_RUNNER_IMAGE") or cls.runner_image,
            runner_command=tuple(command),
            runner_image_pull_policy=env.get(
                "WHISPERX_RUNNER_IMAGE_PULL_POLICY", cls.runner_image_pull_policy
            ),
            runner_service_account=env.get("WHISPERX_RUNNER_SERVICE_ACCOUNT", ""),
            runner_env={str(k): str(v) for k, v in runner_env.items()},
            model_cache_pvc=env.get("WHISPERX_MODEL_CACHE_PVC", ""),
            kueue_queue=env.get("WHISPERX_KUEUE_QUEUE", ""),
            hf_token_secret=env.get("WHISPERX_HF_TOKEN_SECRET", ""),
            hf_token_secret_key=env.get("WHISPERX_HF_TOKEN_SECRET_KEY") or "token",
            # A negative TTL keeps finished Predictions forever.
            default_ttl_seconds=None if ttl is None or ttl < 0 else ttl,
            default_start_deadline_seconds=_required_int(
                env, "WHISPERX_DEFAULT_START_DEADLINE_SECONDS", cls.default_start_deadline_seconds
            ),
            default_active_deadline_seconds=_required_int(
                env, "WHISPERX_DEFAULT_ACTIVE_DEADLINE_SECONDS", cls.default_active_deadline_seconds
            ),
            default_backoff_limit=_required_int(
                env, "WHISPERX_DEFAULT_BACKOFF_LIMIT", cls.default_backoff_limit
            ),
            waiting_grace_seconds=_required_int(
                env, "WHISPERX_WAITING_GRACE_SECONDS", cls.waiting_grace_seconds
            ),
            namespaces=tuple(ns.strip() for ns in namespaces.split(",") if ns.strip()),
            max_concurrent_handlers=_positive_int(
                env, "WHISPERX_MAX_CONCURRENT_HANDLERS", cls.max_concurrent_handlers
            ),
            peering=env.get("WHISPERX_PEERING", cls.peering),
            peering_priority=_required_int(env, "WHISPERX_PEERING_PRIORITY", 0),
            listen_host=env.get("WHISPERX_LISTEN_HOST", cls.listen_host),
            liveness_port=_required_int(env, "WHISPERX_LIVENESS_PORT", cls.liveness_port),
            report_port=_required_int(env, "WHISPERX_REPORT_PORT", cls.report_port),
            pod_ip=env.get("POD_IP", ""),
            **extra,
        )
