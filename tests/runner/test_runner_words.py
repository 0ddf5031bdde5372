"""Word timestamps without an alignment model: Whisper's own (cross-attention DTW),
computed during transcription (WHISPERX_WORD_TIMESTAMPS_FALLBACK).

The pure placement and sentence logic runs without the ML stack. The rest is real:
tiny.en on espeak-ng speech, and, unlike the random-weight aligner's words, the timings
are checked against where the speech is (two sentences around 2 s of silence).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.runner.conftest import PausedSpeech
from whisperx_api.schema import PredictionInput, PredictionOutput
from whisperx_runner.audio import decode_audio
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import ConfigError, ModelNotFoundError
from whisperx_runner.whisper_words import (
    TimedWord,
    fit_to_speech,
    place_words,
    sentence_segments,
)

FALLBACK_LOG = "using Whisper's word timestamps"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


# --- pure logic -------------------------------------------------------------------------


def test_fallback_setting_is_read_from_the_environment() -> None:
    assert RunnerConfig.from_env({}).word_timestamps_fallback == "whisper"
    for value in ("whisper", "off", "error", " OFF "):
        env = {"WHISPERX_WORD_TIMESTAMPS_FALLBACK": value}
        assert RunnerConfig.from_env(env).word_timestamps_fallback == value.strip().lower()
    with pytest.raises(ConfigError, match="WHISPERX_WORD_TIMESTAMPS_FALLBACK"):
        RunnerConfig.from_env({"WHISPERX_WORD_TIMESTAMPS_FALLBACK": "wav2vec2"})


SPEECH = ((0.5, 2.5), (4.5, 7.0))


@pytest.mark.parametrize(
    ("word", "fitted"),
    [
        ((1.0, 1.4), (1.0, 1.4)),  # inside speech: unchanged
        ((2.2, 3.8), (2.2, 2.5)),  # runs into the pause: cut back to the speech's end
        ((3.9, 4.9), (4.5, 4.9)),  # starts in the pause: moved to the next speech
        ((3.0, 3.5), (3.0, 3.5)),  # wholly in the pause: left alone
        ((2.0, 5.0), (2.0, 5.0)),  # spans the pause: left alone
        ((6.5, 7.6), (6.5, 7.0)),  # past the last speech: cut back
        ((0.0, 0.9), (0.5, 0.9)),  # before the first speech
    ],
)
def test_word_edges_leave_the_pauses(
    word: tuple[float, float], fitted: tuple[float, float]
) -> None:
    assert fit_to_speech(*word, SPEECH) == fitted
    assert fit_to_speech(*word, ()) == word


def test_placed_words_are_ordered_inside_their_segment() -> None:
    raw = [
        TimedWord(" a", 0.9, 1.3, 0.9),
        TimedWord(" b", 1.2, 1.1, 0.8),  # overlaps a, and ends before it starts
        TimedWord("", 1.3, 1.3, 0.0),  # punctuation merged away by faster-whisper
        TimedWord(" c.", 2.0, 9.0, 0.7),
    ]
    placed = place_words(raw, 1.0, 3.0)
    assert [w.text for w in placed] == [" a", " b", " c."]
    assert [(w.start, w.end) for w in placed] == [(1.0, 1.3), (1.3, 1.3), (2.0, 3.0)]


def test_sentences_carry_their_words_and_text() -> None:
    text = " Hello there. How are you?"
    pieces = [" Hello", " there.", " How", " are", " you?"]
    timed = [TimedWord(p, i, i + 0.5, 0.91234) for i, p in enumerate(pieces)]
    spans = [(1, 13), (14, 26)]  # what punkt gives
    segments = sentence_segments(text, timed, spans, {"avg_logprob": -0.2})
    assert segments == [
        {
            "start": 0,
            "end": 1.5,
            "text": "Hello there.",
            "words": [
                {"word": "Hello", "start": 0, "end": 0.5, "score": 0.912},
                {"word": "there.", "start": 1, "end": 1.5, "score": 0.912},
            ],
            "avg_logprob": -0.2,
        },
        {
            "start": 2,
            "end": 4.5,
            "text": "How are you?",
            "words": [
                {"word": w, "start": i, "end": i + 0.5, "score": 0.912}
                for i, w in enumerate(["How", "are", "you?"], start=2)
            ],
            "avg_logprob": -0.2,
        },
    ]
    # Without sentence spans: one segment; words that are not the text: none.
    assert [s["text"] for s in sentence_segments(text, timed, None) or []] == [text]
    assert sentence_segments(" Hello there", timed, spans) is None


# --- real: tiny.en, no alignment model --------------------------------------------------


async def samples_of(path: Path) -> Any:
    return (await decode_audio(path)).samples()


@pytest.fixture
def no_aligner(transcriber: Any, tmp_path: Path) -> Iterator[Any]:
    """The session's Transcriber with a model directory that has no alignment model."""
    saved = transcriber.config
    transcriber.config = dataclasses.replace(saved, model_dir=tmp_path / "models")
    try:
        yield transcriber
    finally:
        transcriber.config = saved


def all_words(output: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for s in output["segments"] for w in s["words"]]


def check_timings(output: dict[str, Any], duration: float) -> None:
    """Every segment's words ordered, not overlapping, inside the segment and the audio."""
    previous_end = 0.0
    for segment in output["segments"]:
        assert segment["words"], segment
        assert segment["start"] == segment["words"][0]["start"]
        assert segment["end"] == segment["words"][-1]["end"]
        for word in segment["words"]:
            assert previous_end <= word["start"] <= word["end"] <= duration, (word, segment)
            assert segment["start"] <= word["start"] <= word["end"] <= segment["end"]
            assert 0 <= word["score"] <= 1
            previous_end = word["end"]


@pytest.mark.whisperx
async def test_fox_gets_whisper_word_timestamps(no_aligner: Any, fox_wav: Path) -> None:
    samples = await samples_of(fox_wav)
    duration = samples.shape[0] / 16000
    logs: list[str] = []
    inp = PredictionInput(audio_file="data:,", align_output=True, debug=True, batch_size=8)
    result = no_aligner.run(inp, samples, log=logs.append)

    output = result.output
    PredictionOutput.model_validate(output)
    json.dumps(output, allow_nan=False)
    text = " ".join(s["text"] for s in output["segments"])
    assert words(text)[:3] == ["the", "quick", "brown"] and words(text)[-2:] == ["lazy", "dog"]
    # The words are the transcript's, one for one (case and punctuation aside).
    assert [w for x in all_words(output) for w in words(x["word"])] == words(text)
    check_timings(output, duration)

    joined = "\n".join(logs)
    expected = no_aligner.config.model_dir / "align"
    assert f"no alignment model for 'en' under {expected}" in joined, joined
    assert FALLBACK_LOG in joined and "Aligning" not in joined, joined
    assert "align_time" in result.timings
    # The hooks are gone: the next run is plain whisperx again.
    model = no_aligner._model
    assert "_forward" not in vars(model) and "encode" not in vars(model.model)
    assert "merge_chunks" not in vars(model.vad_model)


@pytest.mark.whisperx
async def test_word_timestamps_follow_the_speech(
    no_aligner: Any, paused_speech: PausedSpeech
) -> None:
    """Meaningful timings: the second sentence's words start after the 2 s of silence,
    the first sentence's end before it; speakers assigned from a diarization by time."""
    import pandas as pd
    from whisperx.diarize import assign_word_speakers

    samples = await samples_of(paused_speech.path)
    duration = samples.shape[0] / 16000
    inp = PredictionInput(audio_file="data:,", align_output=True, batch_size=8)
    output = no_aligner.run(inp, samples).output
    check_timings(output, duration)

    # whisperx decodes both sentences as one chunk; the words split it into sentences.
    segments = output["segments"]
    assert len(segments) == 2, segments
    first, second = segments
    assert words(second["text"]) == words(paused_speech.second_text), second
    assert first["words"][0]["start"] < 0.5
    assert first["words"][-1]["end"] <= paused_speech.pause_start + 0.2, first
    assert second["words"][0]["start"] >= paused_speech.pause_start + 1.5, second
    assert second["words"][0]["start"] <= paused_speech.pause_end + 0.5, second

    middle = (paused_speech.pause_start + paused_speech.pause_end) / 2
    turns = pd.DataFrame(
        [
            {"start": 0.0, "end": middle, "speaker": "SPEAKER_00"},
            {"start": middle, "end": duration, "speaker": "SPEAKER_01"},
        ]
    )
    with_speakers = assign_word_speakers(turns, output)
    assert [s["speaker"] for s in with_speakers["segments"]] == ["SPEAKER_00", "SPEAKER_01"]
    for segment in with_speakers["segments"]:
        # A word Whisper's timings squeeze to no length overlaps no turn, so whisperx
        # gives it no speaker (seen under load, where CTranslate2's threads round apart).
        timed = [w for w in segment["words"] if w["end"] > w["start"]]
        assert len(timed) >= len(segment["words"]) - 1, segment
        assert {w["speaker"] for w in timed} == {segment["speaker"]}


@pytest.mark.whisperx
async def test_fallback_off_gives_no_words_and_error_fails_early(
    no_aligner: Any, fox_wav: Path
) -> None:
    samples = await samples_of(fox_wav)
    saved = no_aligner.config
    logs: list[str] = []
    inp = PredictionInput(audio_file="data:,", align_output=True, batch_size=8)

    no_aligner.config = dataclasses.replace(saved, word_timestamps_fallback="off")
    output = no_aligner.run(inp, samples, log=logs.append).output
    assert output["segments"] and all("words" not in s for s in output["segments"])
    joined = "\n".join(logs)
    assert "no alignment model for 'en'" in joined and FALLBACK_LOG not in joined, joined
    assert "no word timestamps (WHISPERX_WORD_TIMESTAMPS_FALLBACK=off)" in joined, joined

    # error: the missing model fails the prediction before any transcription.
    no_aligner.config = dataclasses.replace(saved, word_timestamps_fallback="error")
    logs.clear()
    with pytest.raises(ModelNotFoundError, match=r"align/torchaudio/wav2vec2_\w+\.pt"):
        no_aligner.run(inp, np.zeros(16000, dtype=np.float32), log=logs.append)
    assert "Transcribing" not in logs


@pytest.mark.whisperx
async def test_words_when_the_language_is_detected_during_transcription(
    multilingual_model: Path, fox_wav: Path, tmp_path: Path
) -> None:
    """Multilingual model, no language given, audio under 30 s: whisperx detects the
    language inside `transcribe`, so the words are computed before it is known."""
    from whisperx_runner.pipeline import Transcriber

    config = RunnerConfig(model=str(multilingual_model), device="cpu", model_dir=tmp_path)
    transcriber = Transcriber(config)
    samples = await samples_of(fox_wav)
    logs: list[str] = []
    inp = PredictionInput(audio_file="data:,", align_output=True, batch_size=8)
    try:
        output = transcriber.run(inp, samples, log=logs.append).output
    finally:
        transcriber.release()
    assert output["detected_language"] == "en"
    text = " ".join(s["text"] for s in output["segments"])
    assert "fox" in words(text), text
    assert [w for x in all_words(output) for w in words(x["word"])] == words(text)
    check_timings(output, samples.shape[0] / 16000)
    assert any(FALLBACK_LOG in line for line in logs), logs
