"""Pure runner logic, without the ML stack: settings, URL safety, data URIs, language
detection windows, JSON safety, progress, model resolution, input reading."""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from whisperx_api.netguard import address_kind
from whisperx_runner.config import HostAllowList, RunnerConfig
from whisperx_runner.errors import ConfigError, InputError, ModelNotFoundError
from whisperx_runner.fetch import check_address, decode_data_uri
from whisperx_runner.models import punkt_data_dir, resolve_whisper_model, write_punkt_data
from whisperx_runner.pipeline import (
    StageProgress,
    detect_language_multiwindow,
    detection_window_starts,
    distribute_segments_equally,
    json_safe,
    senko_label,
)
from whisperx_runner.runner import read_input

# --- settings -------------------------------------------------------------------------


def test_config_from_env_reads_the_documented_names(tmp_path: Path) -> None:
    config = RunnerConfig.from_env(
        {
            "WHISPERX_MODEL_DIR": str(tmp_path),
            "WHISPERX_MODEL": "tiny.en",
            "WHISPERX_DEVICE": "cpu",
            "WHISPERX_COMPUTE_TYPE": "int8",
            "WHISPERX_ALLOW_HOSTS": "minio.storage.svc, 10.0.0.0/8 *.cluster.local",
            "WHISPERX_ALLOW_DOWNLOADS": "true",
            "WHISPERX_REPORT_URL": "http://op:8081/reports/ns/p",
            "WHISPERX_REPORT_TOKEN": "t",
            "WHISPERX_INPUT_FILE": "/input/input.json",
            "WHISPERX_REPORT_RETRY_SECONDS": "5",
            "WHISPERX_BATCH_SIZE": "16",
        }
    )
    assert config.max_batch_size == 16
    assert config.model_dir == tmp_path and config.model == "tiny.en"
    assert config.device == "cpu" and config.compute_type == "int8"
    assert config.allow_downloads and config.report_retry_seconds == 5
    assert config.input_file == Path("/input/input.json")
    assert config.allow_hosts.allows_host("minio.storage.svc")
    assert config.allow_hosts.allows_host("api.default.svc.cluster.local")
    assert config.allow_hosts.allows_address(ipaddress.ip_address("10.1.2.3"))
    assert not config.allow_hosts.allows_address(ipaddress.ip_address("192.168.1.1"))


def test_config_defaults_are_the_gpu_profile_and_safe() -> None:
    config = RunnerConfig.from_env({})
    assert config.model == "large-v3" and config.model_dir == Path("/models")
    assert config.device == "auto" and config.compute_type is None
    assert not config.allow_downloads and config.report_url is None
    assert config.max_batch_size is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WHISPERX_DEVICE", "tpu"),
        ("WHISPERX_ALLOW_DOWNLOADS", "maybe"),
        ("WHISPERX_FETCH_TIMEOUT", "x"),
        ("WHISPERX_BATCH_SIZE", "0"),
        ("WHISPERX_MAX_AUDIO_SECONDS", "0"),
        ("WHISPERX_DECODE_MEMORY_BYTES", "1000"),  # not even ffmpeg's libraries fit
    ],
)
def test_config_refuses_malformed_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        RunnerConfig.from_env({name: value})


# --- URL safety -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("fe80::1", "link-local (cloud metadata)"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "private"),  # carrier-grade NAT, not global
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_allow_list_permits_by_host_or_range() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    with pytest.raises(InputError, match="loopback"):
        check_address("localhost", loopback, HostAllowList())
    check_address("localhost", loopback, HostAllowList.parse("localhost"))
    check_address("anything", loopback, HostAllowList.parse("127.0.0.0/8"))
    check_address("example.org", ipaddress.ip_address("93.184.215.14"), HostAllowList())


# --- data URIs --------------------------------------------------------------------------


def test_data_uri_base64_is_decoded() -> None:
    payload = base64.b64encode(b"RIFF....WAVE").decode()
    assert decode_data_uri(f"data:audio/wav;base64,{payload}", 1000) == b"RIFF....WAVE"
    assert decode_data_uri(f"data:;base64,{payload}", 1000) == b"RIFF....WAVE"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:audio/wav,RIFF", "must be base64"),
        ("data:audio/wav;base64,@@@not-base64@@@", "not valid base64"),
        ("data:audio/wav;base64", "malformed data URI"),
        ("data:audio/wav;base64,", "empty"),
        ("data:audio/wav;base64," + "A" * 4000, "larger than"),
    ],
)
def test_bad_data_uris_are_input_errors(uri: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_data_uri(uri, 1000)


# --- language detection windows (the original's distribute_segments_equally) -----------


def test_windows_spread_from_start_to_end() -> None:
    assert distribute_segments_equally(120_000, 30_000, 4) == [0, 30_000, 60_000, 90_000]
    assert distribute_segments_equally(100_000, 30_000, 3) == [0, 35_000, 70_000]
    assert distribute_segments_equally(45_000, 30_000, 1) == [0]


def test_detection_runs_only_when_the_original_did() -> None:
    assert detection_window_starts(300, 0.5, 5, None) == [0, 67_500, 135_000, 202_500, 270_000]
    assert detection_window_starts(65, 0.5, 5, None) == [0, 35_000]  # tries capped by length
    assert detection_window_starts(300, 0.0, 5, None) == []  # min_prob 0: whisperx detects
    assert detection_window_starts(300, 0.5, 5, "de") == []  # language given
    assert detection_window_starts(30, 0.5, 5, None) == []  # one window only


def test_multiwindow_detection_stops_at_min_prob_and_keeps_the_best() -> None:
    answers = {0: ("de", 0.4), 1000: ("en", 0.7), 2000: ("en", 0.95), 3000: ("fr", 0.99)}
    tried: list[int] = []

    def detect(start: int) -> tuple[str, float]:
        tried.append(start)
        return answers[start]

    guess = detect_language_multiwindow([0, 1000, 2000, 3000], 0.9, detect)
    assert (guess.language, guess.iteration) == ("en", 3) and tried == [0, 1000, 2000]
    # Never reaching min_prob: all windows tried, the most probable kept (earliest on ties).
    flat = {0: ("de", 0.5), 1000: ("nl", 0.6), 2000: ("en", 0.6)}
    guess = detect_language_multiwindow([0, 1000, 2000], 0.99, lambda s: flat[s])
    assert (guess.language, guess.probability, guess.iteration) == ("nl", 0.6, 2)


# --- output --------------------------------------------------------------------------------


@pytest.mark.whisperx  # numpy comes with the runner's stack
def test_json_safe_converts_numpy_and_non_finite_numbers() -> None:
    import numpy as np

    value = {
        "a": np.float64(1.5),
        "b": np.float32(math.nan),
        "c": [np.int64(3), np.bool_(True), math.inf],
        "d": np.array([0.25, 0.5]),
        "e": (None, "x"),
    }
    safe = json_safe(value)
    assert safe == {"a": 1.5, "b": None, "c": [3, True, None], "d": [0.25, 0.5], "e": [None, "x"]}
    json.dumps(safe, allow_nan=False)
    assert type(safe["c"][0]) is int and type(safe["a"]) is float
    with pytest.raises(TypeError):
        json_safe(object())


def test_stage_progress_is_monotonic_over_the_enabled_stages() -> None:
    seen: list[float] = []
    progress = StageProgress(["transcribe", "diarize"], seen.append)
    for pct in (50, 100):
        progress.stage("transcribe")(pct)
    for pct in (0, 100):
        progress.stage("diarize")(pct)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert seen[1] == pytest.approx(0.6 / 0.85)


def test_senko_labels_count_from_zero_like_pyannote() -> None:
    assert senko_label("SPEAKER_01") == "SPEAKER_00"
    assert senko_label("SPEAKER_12") == "SPEAKER_11"
    assert senko_label("other") == "other"


# --- models ----------------------------------------------------------------------------


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"")
    return folder


def test_whisper_model_resolution(tmp_path: Path) -> None:
    models = tmp_path / "models"
    named = _fake_model(models / "large-v3")
    assert resolve_whisper_model("large-v3", models, allow_downloads=False) == str(named)
    direct = _fake_model(tmp_path / "elsewhere" / "mine")
    assert resolve_whisper_model(str(direct), models, allow_downloads=False) == str(direct)
    # A missing model names the path it was expected at, unless downloads are allowed.
    with pytest.raises(ModelNotFoundError, match=re.escape(str(models / "medium" / "model.bin"))):
        resolve_whisper_model("medium", models, allow_downloads=False)
    assert resolve_whisper_model("medium", models, allow_downloads=True) == "medium"
    with pytest.raises(ModelNotFoundError, match=r"no model\.bin"):
        resolve_whisper_model(str(tmp_path / "nothing"), models, allow_downloads=True)


@pytest.mark.whisperx
def test_tiny_en_resolves_to_the_packaged_model(tmp_path: Path) -> None:
    path = Path(resolve_whisper_model("tiny.en", tmp_path, allow_downloads=False))
    assert (path / "model.bin").is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.whisperx
def test_punkt_data_loads_in_nltk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = punkt_data_dir(tmp_path / "models")  # nothing baked: written to the cache
    assert root == tmp_path / "cache" / "whisperx-runner" / "nltk_data"
    assert punkt_data_dir(tmp_path / "models") == root  # written once
    baked = write_punkt_data(tmp_path / "models" / "nltk_data")
    assert punkt_data_dir(tmp_path / "models") == baked
    # NLTK itself reads the files (in a child: nltk.data.path is process-global).
    code = (
        "import nltk, sys; nltk.data.path.insert(0, sys.argv[1]); "
        "from nltk.data import load; t = load('tokenizers/punkt_tab/english.pickle'); "
        "print(len(list(t.span_tokenize('Mr. Smith went home. He slept.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert out.stdout.strip() == "2", out.stderr


# --- input -----------------------------------------------------------------------------


def test_read_input_names_the_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps({"audio_file": "https://example.org/a.wav", "batch_size": 0}))
    with pytest.raises(InputError, match=r"input\.batch_size"):
        read_input(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_input(path)
    with pytest.raises(ConfigError, match="WHISPERX_INPUT_FILE"):
        read_input(None)
    path.write_text(json.dumps({"audio_file": "https://example.org/a.wav", "language": ""}))
    assert read_input(path).language is None
