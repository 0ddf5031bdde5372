"""Operator settings and hardware profiles."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT
from whisperx_operator.config import DEFAULT_PROFILES, ConfigError, OperatorConfig, load_profiles
from whisperx_operator.main import KOPF_PREFIX, DiffBase, kopf_settings

KEY = {"WHISPERX_REPORT_KEY": "k" * 32}


def test_three_default_profiles_match_the_original_models() -> None:
    assert set(DEFAULT_PROFILES) == {"whisperx", "whisperx-a40-large", "whisperx-a100-80gb"}
    memory = [p.resources["limits"]["memory"] for p in DEFAULT_PROFILES.values()]
    assert memory == ["16Gi", "32Gi", "64Gi"]
    assert all(p.resources["limits"]["nvidia.com/gpu"] == "1" for p in DEFAULT_PROFILES.values())


@pytest.mark.parametrize(
    "path",
    [
        "manifests/base/control-plane/profiles.yaml",
        "manifests/overlays/gpu/profiles.yaml",
        "manifests/overlays/kind/profiles.yaml",
    ],
)
def test_the_deployed_profile_files_load(path: str) -> None:
    profiles = load_profiles(str(REPO_ROOT / path))
    assert set(DEFAULT_PROFILES) <= set(profiles)


def test_profiles_file_replaces_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text("cpu:\n  device: cpu\n  computeType: int8\n  model: tiny.en\n")
    config = OperatorConfig.from_env({**KEY, "WHISPERX_PROFILES_FILE": str(path)})
    assert list(config.profiles) == ["cpu"]
    assert config.profiles["cpu"].device == "cpu"


@pytest.mark.parametrize(
    "text",
    ["cpu:\n  device: tpu\n", "cpu:\n  gpus: 2\n", "- a list\n", "{}\n", "cpu: [\n"],
)
def test_bad_profiles_are_refused_at_startup(tmp_path: Path, text: str) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        OperatorConfig.from_env({**KEY, "WHISPERX_PROFILES_FILE": str(path)})


def test_warm_runner_settings_per_profile_with_errors_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text("cpu:\n  idleSeconds: 60\n  maxPredictions: 9\n  maxRunners: 2\n")
    profile = OperatorConfig.from_env({**KEY, "WHISPERX_PROFILES_FILE": str(path)}).profiles["cpu"]
    assert (profile.warm, profile.idle_seconds, profile.max_predictions) == (True, 60, 9)
    assert profile.max_runners == 2
    # One Job per prediction unless a profile says otherwise.
    assert not any(p.warm for p in DEFAULT_PROFILES.values())
    assert all(
        p.warm
        for p in load_profiles(str(REPO_ROOT / "manifests/overlays/gpu/profiles.yaml")).values()
    )
    for bad, field in (("idleSeconds: -1", "idleSeconds"), ("maxRunners: 0", "maxRunners")):
        path.write_text(f"cpu:\n  {bad}\n")
        with pytest.raises(ConfigError, match=field):
            OperatorConfig.from_env({**KEY, "WHISPERX_PROFILES_FILE": str(path)})


def test_environment() -> None:
    config = OperatorConfig.from_env(
        {
            **KEY,
            "WHISPERX_RUNNER_COMMAND": '["python", "runner.py"]',
            "WHISPERX_NAMESPACES": "a, b",
            "WHISPERX_DEFAULT_TTL_SECONDS": "-1",
            "WHISPERX_KUEUE_QUEUE": "q",
            "WHISPERX_REPORT_BASE_URL": "http://op:8081/",
        }
    )
    assert config.runner_command == ("python", "runner.py")
    assert config.namespaces == ("a", "b")
    assert config.default_ttl_seconds is None
    assert config.kueue_queue == "q" and config.report_base_url == "http://op:8081"
    assert OperatorConfig.from_env(KEY).default_ttl_seconds == 86400


def test_handler_concurrency_is_a_setting() -> None:
    env = {**KEY, "WHISPERX_MAX_CONCURRENT_HANDLERS": "5"}
    assert OperatorConfig.from_env(env).max_concurrent_handlers == 5
    assert OperatorConfig.from_env(KEY).max_concurrent_handlers == 32
    for bad in ("0", "-1", "many"):
        env = {**KEY, "WHISPERX_MAX_CONCURRENT_HANDLERS": bad}
        with pytest.raises(ConfigError, match="WHISPERX_MAX_CONCURRENT_HANDLERS"):
            OperatorConfig.from_env(env)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {**KEY, "WHISPERX_RUNNER_COMMAND": "whisperx-runner run"},
        {**KEY, "WHISPERX_RUNNER_COMMAND": "[]"},
        {**KEY, "WHISPERX_DEFAULT_TTL_SECONDS": "a day"},
        {**KEY, "WHISPERX_RUNNER_ENV": "[1]"},
    ],
)
def test_bad_environment_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        OperatorConfig.from_env(env)


@pytest.mark.parametrize(
    ("listen_host", "pod_ip", "endpoint"),
    [
        # Every interface: kopf binds one address, of the pod IP's family.
        ("", "10.244.0.7", "http://0.0.0.0:8080/healthz"),
        ("", "fd00:10:244::7", "http://[::]:8080/healthz"),
        ("", "", "http://0.0.0.0:8080/healthz"),
        ("::1", "10.244.0.7", "http://[::1]:8080/healthz"),
        ("127.0.0.1", "", "http://127.0.0.1:8080/healthz"),
    ],
)
def test_liveness_endpoint_on_ipv4_and_ipv6(listen_host: str, pod_ip: str, endpoint: str) -> None:
    env = {"WHISPERX_REPORT_KEY": "k" * 32, "WHISPERX_LISTEN_HOST": listen_host, "POD_IP": pod_ip}
    assert OperatorConfig.from_env(env).liveness_endpoint == endpoint


def test_servers_listen_on_every_interface_by_default() -> None:
    config = OperatorConfig.from_env({"WHISPERX_REPORT_KEY": "k" * 32})
    assert config.listen_host == ""  # IPv4 and IPv6 (whisperx_api.hostport)


def test_the_declared_kopf_floor_has_the_settings_used() -> None:
    """settings.watching.label_selectors / field_selectors (main.kopf_settings) and
    kopf.on.login with ConnectionInfo (login.py) exist from kopf 1.45 on."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (kopf,) = [Requirement(r) for r in project["dependencies"] if r.startswith("kopf")]
    assert kopf.specifier.contains("1.45.0") and not kopf.specifier.contains("1.44.9")


def test_the_diff_base_is_kopfs_own() -> None:
    """main.DiffBase copies less than kopf, and finds the same essence."""
    settings = kopf_settings(OperatorConfig(report_key=b"k" * 32))
    ours = settings.persistence.diffbase_storage
    kopfs = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX,
        key="last-handled-configuration",
        ignored_fields=["spec.input", "status"],
    )
    raw: dict[str, Any] = {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {
            "name": "p1",
            "labels": {"whisperx.io/source": "api"},
            "annotations": {
                "whisperx.io/cancel": "true",
                f"{KOPF_PREFIX}/last-handled-configuration": "{}",
            },
            "managedFields": [{"manager": "kopf", "fieldsV1": {"f:metadata": {}}}],
            "finalizers": ["whisperx.io/cleanup"],
        },
        "spec": {"input": {"audio_file": "https://a.test/a.wav"}, "cancel": True},
        "status": {"phase": "starting"},
    }
    body = kopf.Body(cast(kopf.RawBody, raw))
    assert isinstance(ours, DiffBase)
    assert ours.build(body=body) == kopfs.build(body=body)
    assert ours.build(body=body) == {
        "metadata": {
            "labels": {"whisperx.io/source": "api"},
            "annotations": {"whisperx.io/cancel": "true"},
        },
        "spec": {"cancel": True},
    }
