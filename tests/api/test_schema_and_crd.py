"""The one schema and the CRD generated from it."""

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from whisperx_api import crd, schema


def test_defaults_match_the_original_model() -> None:
    parsed = schema.validate_input({"audio_file": "https://example.com/a.wav"})
    assert parsed.model_dump() == {
        "audio_file": "https://example.com/a.wav",
        "language": None,
        "language_detection_min_prob": 0,
        "language_detection_max_tries": 5,
        "task": "transcribe",
        "initial_prompt": None,
        "batch_size": 64,
        "temperature": 0,
        "vad_onset": 0.5,
        "vad_offset": 0.363,
        "align_output": False,
        "diarization": False,
        "huggingface_access_token": None,
        "min_speakers": None,
        "max_speakers": None,
        "debug": False,
    }


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "input.audio_file"),
        ({"audio_file": "ftp://x/a.wav"}, "input.audio_file"),
        ({"audio_file": "data:audio/wav;base64,AA", "batch_size": 0}, "input.batch_size"),
        ({"audio_file": "data:,x", "batch_size": "many"}, "input.batch_size"),
        ({"audio_file": "data:,x", "batch_size": "64"}, "input.batch_size"),
        (
            {"audio_file": "data:,x", "language_detection_min_prob": False},
            "input.language_detection_min_prob",
        ),
        ({"audio_file": "data:,x", "debug": "yes"}, "input.debug"),
        ({"audio_file": "data:,x", "vad_onset": 1.5}, "input.vad_onset"),
        ({"audio_file": "data:,x", "language": "xx"}, "input.language"),
        ({"audio_file": "data:,x", "task": "summarize"}, "input.task"),
        ({"audio_file": "data:,x", "min_speakers": 0}, "input.min_speakers"),
        ({"audio_file": "data:,x", "colour": "red"}, "input.colour"),
        ({"audio_file": "data:,x", "min_speakers": 3, "max_speakers": 2}, "min_speakers"),
    ],
)
def test_bad_input_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        schema.validate_input(data)
    assert field in schema.describe_errors(info.value.errors())


def test_empty_strings_mean_unset_as_on_replicate() -> None:
    parsed = schema.validate_input({"audio_file": "data:,x", "language": "", "initial_prompt": ""})
    assert parsed.language is None and parsed.initial_prompt is None


def test_secret_fields_are_redacted_from_public_input_and_crd() -> None:
    data = {"audio_file": "data:,x", "huggingface_access_token": "hf_secret"}
    assert "huggingface_access_token" not in schema.public_input(data)
    spec_input = crd.spec_schema()["properties"]["input"]["properties"]
    assert "huggingface_access_token" not in spec_input
    assert set(spec_input) == set(schema.PredictionInput.model_fields) - schema.SECRET_INPUT_FIELDS


def test_crd_file_matches_the_schema() -> None:
    """Fails when crds/prediction.yaml drifts from the schema (regenerate: whisperx-crd)."""
    assert crd.DEFAULT_CRD_PATH.read_text() == crd.render_crd()
    assert crd.main(["--check"]) == 0


def test_crd_check_detects_drift(tmp_path: Any) -> None:
    stale = tmp_path / "prediction.yaml"
    stale.write_text(crd.render_crd().replace("maximum: 256", "maximum: 255"))
    assert crd.main(["--check", "--output", str(stale)]) == 1


def test_crd_conventions() -> None:
    document = yaml.safe_load(crd.DEFAULT_CRD_PATH.read_text())
    names = document["spec"]["names"]
    assert names["kind"] == "Prediction" and "pred" in names["shortNames"]
    version = document["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Language"] == ".status.detectedLanguage"
    assert columns["Duration"] == ".status.audioDuration"
    assert columns["Age"] == ".metadata.creationTimestamp"
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("hardware", "startDeadlineSeconds", "activeDeadlineSeconds", "cancel"):
        assert field in spec
    assert "ttlSecondsAfterFinished" in spec
    rules = spec["input"]["x-kubernetes-validations"]
    assert any("min_speakers <= self.max_speakers" in r["rule"] for r in rules)


def test_structural_conversion_rejects_ambiguous_unions() -> None:
    with pytest.raises(ValueError):
        crd.to_structural({"anyOf": [{"type": "string"}, {"type": "integer"}]})
