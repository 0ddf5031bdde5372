"""SRT, WebVTT and text renderings of the output segments."""

from __future__ import annotations

import json
from typing import Any

import pytest

from whisperx_api.render import FORMATS, render, timestamp
from whisperx_api.schema import PredictionOutput

OUTPUT: dict[str, Any] = {
    "segments": [
        {
            "start": 0.031,
            "end": 2.528,
            "text": " The quick brown fox",
            "speaker": "SPEAKER_00",
            "avg_logprob": -0.2,
            "words": [
                {"word": "The", "start": 0.031, "end": 0.2, "score": 0.9, "speaker": "SPEAKER_00"},
                {"word": "quick", "start": 0.25, "end": 0.5, "score": 0.8},
                {"word": "brown"},
            ],
        },
        {"start": 3661.5, "end": 3663.0, "text": "a <b> & c\n\nnext", "speaker": "SPEAKER_01"},
        {"start": 4000.0, "end": 4001.0, "text": "   "},
        {"start": 4002.0, "end": 4003.25, "text": "no speaker"},
    ],
    "detected_language": "en",
}


def test_timestamps() -> None:
    assert timestamp(0) == "00:00:00.000"
    assert timestamp(3661.5, ",") == "01:01:01,500"
    assert timestamp(59.9996) == "00:01:00.000"  # rounds across the second
    assert timestamp(float("nan")) == "00:00:00.000"
    assert timestamp(-1) == "00:00:00.000"


def test_srt() -> None:
    assert render(OUTPUT, "srt") == (
        "1\n00:00:00,031 --> 00:00:02,528\n[SPEAKER_00]: The quick brown fox\n\n"
        "2\n01:01:01,500 --> 01:01:03,000\n[SPEAKER_01]: a <b> & c next\n\n"
        "3\n01:06:42,000 --> 01:06:43,250\nno speaker\n"
    )


def test_vtt_escapes_and_uses_voice_spans() -> None:
    assert render(OUTPUT, "vtt") == (
        "WEBVTT\n\n"
        "00:00:00.031 --> 00:00:02.528\n<v SPEAKER_00>The quick brown fox\n\n"
        "01:01:01.500 --> 01:01:03.000\n<v SPEAKER_01>a &lt;b&gt; &amp; c next\n\n"
        "01:06:42.000 --> 01:06:43.250\nno speaker\n"
    )


def test_txt() -> None:
    assert render(OUTPUT, "txt") == (
        "[SPEAKER_00]: The quick brown fox\n[SPEAKER_01]: a <b> & c next\nno speaker\n"
    )


def test_json_keeps_the_output_as_it_was() -> None:
    assert json.loads(render(OUTPUT, "json")) == OUTPUT
    parsed = PredictionOutput.model_validate(OUTPUT)
    assert render(parsed, "srt") == render(OUTPUT, "srt")


def test_empty_output_renders_valid_empty_documents() -> None:
    empty = {"segments": [], "detected_language": "en"}
    assert render(empty, "srt") == "" and render(empty, "txt") == ""
    assert render(empty, "vtt") == "WEBVTT\n"


def test_unknown_format_and_bad_output_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render(OUTPUT, "docx")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        render({"segments": [{"text": "no times"}], "detected_language": "en"}, "srt")
    assert FORMATS == ("json", "srt", "vtt", "txt")
