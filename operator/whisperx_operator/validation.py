"""Checks on a Prediction spec that the CRD schema cannot express (pure).

The CRD refuses wrong types, bad URL schemes and min > max speakers at admission; the
operator checks again (a cluster may run without the CEL rule, or a client may bypass the
schema) and adds what only its configuration knows: the hardware profiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from whisperx_api.schema import SECRET_INPUT_FIELDS, WEBHOOK_EVENTS, describe_errors, validate_input
from whisperx_operator.config import HardwareProfile


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def validate_spec(spec: Mapping[str, Any], profiles: Mapping[str, object]) -> Problem | None:
    hardware = spec.get("hardware") or "whisperx"
    if hardware not in profiles:
        known = ", ".join(sorted(profiles))
        return Problem(
            "UnknownHardware",
            f"spec.hardware: unknown hardware profile {hardware!r}; configured: {known}",
        )
    raw_input = spec.get("input")
    if not isinstance(raw_input, Mapping):
        return Problem("InvalidInput", "spec.input: must be an object")
    secrets = sorted(SECRET_INPUT_FIELDS & set(raw_input))
    if secrets:
        return Problem(
            "InvalidInput",
            f"spec.input.{secrets[0]}: secret inputs must not be in the spec; "
            "put the value in a Secret and reference it in spec.secretInputs",
        )
    try:
        validate_input(dict(raw_input))
    except ValidationError as exc:
        return Problem("InvalidInput", describe_errors(list(exc.errors()), prefix="spec.input"))
    for field, ref in (spec.get("secretInputs") or {}).items():
        if field not in SECRET_INPUT_FIELDS:
            return Problem(
                "InvalidInput",
                f"spec.secretInputs.{field}: not a secret input; "
                f"known: {', '.join(sorted(SECRET_INPUT_FIELDS))}",
            )
        if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("key"):
            return Problem("InvalidInput", f"spec.secretInputs.{field}: needs name and key")
    webhook = spec.get("webhook")
    if webhook is not None and not str(webhook).startswith(("http://", "https://")):
        return Problem("InvalidWebhook", "spec.webhook: must be an http(s) URL")
    unknown_events = set(spec.get("webhookEventsFilter") or ()) - set(WEBHOOK_EVENTS)
    if unknown_events:
        return Problem(
            "InvalidWebhook",
            f"spec.webhookEventsFilter: unknown events {sorted(unknown_events)}; "
            f"known: {', '.join(WEBHOOK_EVENTS)}",
        )
    return None


def profile_for(
    spec: Mapping[str, Any], profiles: Mapping[str, HardwareProfile]
) -> HardwareProfile:
    return profiles[spec.get("hardware") or "whisperx"]
