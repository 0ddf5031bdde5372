"""The CRD as kube-apiserver's apiextensions sees it: a structural schema it accepts, and
what it does with the objects it is sent (see tests/api/structural.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.api.structural import admit, structural_errors
from tests.conftest import REPO_ROOT
from whisperx_api import crd
from whisperx_api.schema import SECRET_INPUT_FIELDS, PredictionInput

Crd = dict[str, Any]


def stored_crd() -> Crd:
    return dict(yaml.safe_load(crd.DEFAULT_CRD_PATH.read_text()))


def root(document: Crd) -> dict[str, Any]:
    node: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return node


def input_schema(document: Crd) -> dict[str, Any]:
    node: dict[str, Any] = root(document)["properties"]["spec"]["properties"]["input"]
    return node


def test_the_crd_is_a_structural_schema() -> None:
    assert structural_errors(stored_crd()) == []
    assert structural_errors(crd.build_crd()) == []


def test_kopfs_peering_crds_are_structural_schemas() -> None:
    """Applied beside ours (manifests/base/kopf), so held to the same rules."""
    path = REPO_ROOT / "manifests" / "base" / "kopf" / "peering-crds.yaml"
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert {d["kind"] for d in documents} == {"CustomResourceDefinition"}
    for document in documents:
        assert structural_errors(document) == [], document["metadata"]["name"]


def _set(path: str, value: Any) -> Callable[[Crd], None]:
    """Sets a node under the version's openAPIV3Schema (path: keys joined by '/')."""

    def mutate(document: Crd) -> None:
        *parents, last = path.split("/")
        node: Any = root(document)
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


INPUT = "properties/spec/properties/input"
STATUS = "properties/status"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set(f"{INPUT}/additionalProperties", False), "mutual exclusive"),
        (_set(f"{INPUT}/properties/language/nullable", True), "null is not in the enum"),
        (_set("additionalProperties", {"type": "string"}), "must not be used at the root"),
        (_set("properties/metadata/properties", {"labels": {"type": "object"}}), "metadata"),
        (_set("properties/kind/type", "integer"), "must be string"),
        (_set(f"{INPUT}/properties/debug/type", "null"), "cannot be set to null"),
        (_set(f"{INPUT}/properties/debug", {"description": "typeless"}), "must not be empty"),
        (_set(f"{INPUT}/properties/debug/type", "bool"), "is not one of"),
        (_set(f"{INPUT}/properties/debug/$ref", "#/x"), "unsupported keys"),
        (_set(f"{INPUT}/properties/batch_size/default", "64"), "default"),
        (_set(f"{INPUT}/properties/task/enum", ["transcribe", 3]), "enum"),
        (_set(f"{INPUT}/required", ["audio_file", "absent"]), "'absent' is not a property"),
        (_set(f"{STATUS}/properties/conditions/items", None), "must be a single schema"),
        (
            _set(f"{STATUS}/properties/conditions/x-kubernetes-list-map-keys", []),
            "must not be empty",
        ),
        (_set(f"{STATUS}/properties/conditions/x-kubernetes-list-map-keys", ["id"]), "'id'"),
        (
            _set(f"{STATUS}/properties/conditions/items/required", ["status"]),
            "required or defaulted",
        ),
        (_set(f"{STATUS}/properties/conditions/items/nullable", True), "cannot be nullable"),
        (_set(f"{STATUS}/properties/phase/x-kubernetes-list-type", "set"), "must be array"),
        (
            _set(f"{STATUS}/x-kubernetes-preserve-unknown-fields", False),
            "must be true or undefined",
        ),
        (_set(f"{INPUT}/anyOf", [{"type": "object"}]), "anyOf[0].type: must be empty"),
        (_set(f"{INPUT}/properties/audio_file/pattern", "^(http"), "not a regular expression"),
        (
            _set(f"{INPUT}/x-kubernetes-validations", [{"rule": "self.min_speakers <= self.maxi"}]),
            "self.maxi",
        ),
        (_set(f"{INPUT}/x-kubernetes-validations", [{"rule": "size(self.task"}]), "unbalanced"),
        (_set(f"{INPUT}/x-kubernetes-validations", [{"rule": " "}]), "rule is not specified"),
        (
            _set(f"{INPUT}/x-kubernetes-validations", [{"rule": "true", "message": "a\nb"}]),
            "must be non-empty and on one line",
        ),
        (
            _set(f"{INPUT}/x-kubernetes-validations", [{"rule": "true", "fieldPath": "min"}]),
            "is not a valid path",
        ),
        (
            _set(f"{INPUT}/x-kubernetes-validations", [{"rule": "true", "fieldPath": ".nope"}]),
            "names no property",
        ),
        (
            _set(f"{INPUT}/x-kubernetes-validations", [{"rule": "true", "reason": "Bad"}]),
            "is not one of",
        ),
    ],
)
def test_the_validator_catches_what_the_server_refuses(
    mutate: Callable[[Crd], None], expected: str
) -> None:
    document = copy.deepcopy(stored_crd())
    mutate(document)
    errors = structural_errors(document)
    assert any(expected in error for error in errors), errors


AUDIO = "https://a/b.wav"


@pytest.mark.parametrize(
    ("spec_value", "strict", "refused"),
    [
        ({"input": {"audio_file": AUDIO}}, False, None),
        # Replicate clients send "" for unset; the gateway drops it, a null is dropped here.
        ({"input": {"audio_file": AUDIO, "language": None}}, False, None),
        ({"input": {"audio_file": AUDIO, "min_speakers": None}}, False, None),
        ({"input": {"audio_file": AUDIO, "language": "en"}}, False, None),
        ({"input": {"audio_file": AUDIO, "language": "xx"}}, False, "language"),
        ({"input": {"audio_file": AUDIO, "batch_size": "64"}}, False, "batch_size"),
        ({"input": {"audio_file": "file:///etc/passwd"}}, False, "audio_file"),
        # Unknown fields are pruned, and refused under strict field validation.
        ({"input": {"audio_file": AUDIO, "unknown": 1}}, False, None),
        ({"input": {"audio_file": AUDIO, "unknown": 1}}, True, "spec.input.unknown"),
        ({"input": {"audio_file": AUDIO}, "hardware": "Bad Name"}, False, "hardware"),
        ({"input": {"audio_file": AUDIO}, "webhookEventsFilter": ["done"]}, False, "done"),
        ({}, False, "input"),
    ],
)
def test_what_the_server_stores_or_refuses(
    spec_value: dict[str, Any], strict: bool, refused: str | None
) -> None:
    errors = admit(root(stored_crd()), {"spec": spec_value}, strict=strict)
    if refused is None:
        assert errors == []
    else:
        assert errors and any(refused in error for error in errors), errors


def test_every_optional_input_accepts_null() -> None:
    """Each field whose input default is None: a null is dropped by the server (as unset),
    never refused; enum fields are not nullable (null would meet the enum)."""

    properties = input_schema(stored_crd())["properties"]
    optional = [
        name
        for name, field in PredictionInput.model_fields.items()
        if field.default is None and name not in SECRET_INPUT_FIELDS
    ]
    assert "language" in optional
    for name in optional:
        assert not properties[name].get("nullable"), name
        body = {"spec": {"input": {"audio_file": AUDIO, name: None}}}
        assert admit(root(stored_crd()), body) == [], name
