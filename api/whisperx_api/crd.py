"""Generates `crds/prediction.yaml` from the one schema (`whisperx_api.schema`).

`whisperx-crd` writes the file; `whisperx-crd --check` fails when it has drifted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from whisperx_api.schema import WEBHOOK_EVENTS, input_json_schema

GROUP = "whisperx.io"
VERSION = "v1alpha1"
KIND = "Prediction"
PLURAL = "predictions"
SINGULAR = "prediction"
SHORT_NAMES = ["pred", "wxp"]
CANCEL_ANNOTATION = f"{GROUP}/cancel"
PREDICTION_LABEL = f"{GROUP}/prediction"
# Set by the gateway: creation time to the microsecond (creationTimestamp has seconds).
CREATED_AT_ANNOTATION = f"{GROUP}/created-at"
PHASES = ("starting", "processing", "succeeded", "failed", "canceled")
CONDITION_TYPES = ("Queued", "Running", "Succeeded", "Failed", "Canceled")

DEFAULT_CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "prediction.yaml"

# Keys of JSON Schema that Kubernetes' structural OpenAPI v3 schemas accept.
_ALLOWED_KEYS = {
    "type", "format", "description", "default", "enum", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
    "items", "properties", "required", "additionalProperties", "minItems", "maxItems",
}  # fmt: skip


def to_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Turns a pydantic JSON Schema node into a Kubernetes structural schema node.

    `anyOf: [X, {type: null}]` (an optional field, None meaning unset) becomes X, not
    nullable: the API server drops a null it is sent for such a field before validating
    (as unset), where a nullable field with an enum would refuse it. Keys Kubernetes does
    not know (title, writeOnly, x-secret) and `additionalProperties: false` are dropped.
    """
    node = copy.deepcopy(schema)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [option for option in any_of if option.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {any_of!r} as a structural schema")
        node = {**non_null[0], **node}
    if "enum" in node:
        node["enum"] = [value for value in node["enum"] if value is not None]
    if node.get("default", 0) is None:
        del node["default"]
    out = {key: value for key, value in node.items() if key in _ALLOWED_KEYS}
    if "properties" in out:
        # pydantic's `extra="forbid"`: the API server prunes unknown fields, and refuses
        # them under strict field validation (`kubectl --validate=strict`);
        # `additionalProperties` beside `properties` would make it refuse the CRD.
        out.pop("additionalProperties", None)
        out["properties"] = {k: to_structural(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = to_structural(out["items"])
    return out


def _input_schema() -> dict[str, Any]:
    schema = to_structural(input_json_schema(include_secrets=False))
    schema["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.min_speakers) || !has(self.max_speakers) "
            "|| self.min_speakers <= self.max_speakers",
            "message": "min_speakers must not be greater than max_speakers",
            "fieldPath": ".min_speakers",
        }
    ]
    return schema


def _secret_ref() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "key"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 253},
            "key": {"type": "string", "minLength": 1, "maxLength": 253},
        },
    }


def _seconds(description: str, minimum: int = 1) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "format": "int64", "description": description}


def spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": _input_schema(),
            "hardware": {
                "type": "string",
                "default": "whisperx",
                "maxLength": 63,
                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                "description": "Hardware profile (operator configuration) the Job runs on",
            },
            "model": {"type": "string", "maxLength": 200, "description": "owner/name"},
            "version": {"type": "string", "maxLength": 200},
            "webhook": {
                "type": "string",
                "maxLength": 2048,
                "pattern": "^https?://",
                "description": "URL that receives Replicate-style webhooks",
            },
            "webhookEventsFilter": {
                "type": "array",
                "maxItems": 4,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
            },
            "secretInputs": {
                "type": "object",
                "description": "Secret inputs (e.g. huggingface_access_token) by Secret reference",
                "additionalProperties": _secret_ref(),
            },
            "startDeadlineSeconds": _seconds(
                "Seconds the runner may take to start (image pull, queue, scheduling)"
            ),
            "activeDeadlineSeconds": _seconds("Seconds the run may take once started"),
            "ttlSecondsAfterFinished": _seconds(
                "Seconds after the end before the Prediction and its data are deleted", 0
            ),
            "backoffLimit": {
                "type": "integer",
                "minimum": 0,
                "maximum": 10,
                "description": "Retries for failures other than preemption",
            },
            "cancel": {"type": "boolean", "description": "Set to true to cancel"},
        },
    }


def _condition() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }


def status_schema() -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "type": "object",
        "properties": {
            "phase": {"type": "string", "enum": list(PHASES)},
            "reason": {"type": "string"},
            "error": {"type": "string"},
            "observedGeneration": {"type": "integer", "format": "int64"},
            "conditions": {
                "type": "array",
                "items": _condition(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "jobName": {"type": "string"},
            "podName": {"type": "string"},
            "createdAt": timestamp,
            "startedAt": timestamp,
            "completedAt": timestamp,
            "detectedLanguage": {"type": "string"},
            "audioDuration": {"type": "number"},
            "metrics": {
                "type": "object",
                "properties": {
                    "predictTime": {"type": "number"},
                    "totalTime": {"type": "number"},
                },
            },
            "output": {
                "type": "object",
                "properties": {
                    "store": {"type": "string"},
                    "key": {"type": "string"},
                    "segments": {"type": "integer"},
                },
            },
        },
        # kopf keeps its own handler progress in status; leave room for it.
        "x-kubernetes-preserve-unknown-fields": True,
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["whisperx"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Language",
                            "type": "string",
                            "jsonPath": ".status.detectedLanguage",
                        },
                        {
                            "name": "Duration",
                            "type": "number",
                            "jsonPath": ".status.audioDuration",
                            "description": "Audio duration in seconds",
                        },
                        {
                            "name": "Hardware",
                            "type": "string",
                            "jsonPath": ".spec.hardware",
                            "priority": 1,
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": ".status.reason",
                            "priority": 1,
                        },
                        {
                            "name": "Age",
                            "type": "date",
                            "jsonPath": ".metadata.creationTimestamp",
                        },
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated from whisperx_api.schema by `whisperx-crd`; do not edit by hand.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=DEFAULT_CRD_PATH)
    parser.add_argument("--check", action="store_true", help="fail if the file has drifted")
    args = parser.parse_args(argv)
    rendered = render_crd()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != rendered:
            print(f"{args.output} is out of date: run `whisperx-crd`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(rendered)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
