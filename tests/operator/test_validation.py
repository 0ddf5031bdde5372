"""Spec checks the CRD schema cannot express, or that a cluster might skip (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from whisperx_operator.config import DEFAULT_PROFILES
from whisperx_operator.validation import validate_spec

AUDIO = {"audio_file": "https://example.com/a.wav"}


@pytest.mark.parametrize(
    ("spec", "reason", "field"),
    [
        ({"input": AUDIO, "hardware": "h100"}, "UnknownHardware", "spec.hardware"),
        ({"input": {"audio_file": "ftp://x/a.wav"}}, "InvalidInput", "spec.input.audio_file"),
        ({"input": {**AUDIO, "batch_size": "big"}}, "InvalidInput", "spec.input.batch_size"),
        ({"input": {**AUDIO, "min_speakers": 3, "max_speakers": 2}}, "InvalidInput",
         "min_speakers must not be greater than max_speakers"),
        ({"input": {**AUDIO, "huggingface_access_token": "hf_x"}}, "InvalidInput",
         "spec.secretInputs"),
        ({"input": AUDIO, "secretInputs": {"audio_file": {"name": "s", "key": "k"}}},
         "InvalidInput", "spec.secretInputs.audio_file"),
        ({"input": {}}, "InvalidInput", "spec.input.audio_file"),
        ({"input": AUDIO, "webhook": "ftp://hook"}, "InvalidWebhook", "spec.webhook"),
        ({"input": AUDIO, "webhookEventsFilter": ["done"]}, "InvalidWebhook", "done"),
    ],
)  # fmt: skip
def test_problems_name_the_field(spec: dict[str, Any], reason: str, field: str) -> None:
    problem = validate_spec(spec, DEFAULT_PROFILES)
    assert problem is not None and problem.reason == reason and field in problem.message


def test_a_valid_spec_passes() -> None:
    spec = {
        "input": {**AUDIO, "diarization": True, "min_speakers": 1, "max_speakers": 2},
        "hardware": "whisperx-a40-large",
        "secretInputs": {"huggingface_access_token": {"name": "hf", "key": "token"}},
        "webhook": "https://example.com/hook",
        "webhookEventsFilter": ["start", "completed"],
    }
    assert validate_spec(spec, DEFAULT_PROFILES) is None
