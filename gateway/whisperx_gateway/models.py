"""The models the gateway serves: Replicate model names mapped to hardware profiles.

The original service published one model per GPU class (`whisperx`,
`whisperx-a40-large`, `whisperx-a100-80gb`); here each name selects an operator hardware
profile. Any owner is accepted (`acme/whisperx` and `whisperx/whisperx` are the same
model) unless the configuration names an exact `owner/name`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from whisperx_api.schema import input_json_schema, output_json_schema

DEFAULT_OWNER = "whisperx"
DEFAULT_MODELS: dict[str, str] = {
    "whisperx": "whisperx",
    "whisperx-a40-large": "whisperx-a40-large",
    "whisperx-a100-80gb": "whisperx-a100-80gb",
}
# When the current input/output schema was published; its hash is the version id.
VERSION_CREATED_AT = "2026-01-01T00:00:00.000000Z"

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_PROFILE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its public name and the hardware profile it runs on."""

    owner: str
    name: str
    hardware: str
    version: str

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@functools.cache
def schema_version_id(name: str) -> str:
    """A Replicate-like 64-hex version id: changes whenever the schema changes."""
    blob = json.dumps(
        {"model": name, "input": input_json_schema(), "output": output_json_schema()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ModelCatalog:
    def __init__(self, models: dict[str, str], default_owner: str = DEFAULT_OWNER) -> None:
        for key, profile in models.items():
            owner, _, name = key.rpartition("/")
            if not _NAME.match(name) or (owner and not _NAME.match(owner)):
                raise ModelConfigError(f"invalid model name {key!r}")
            if not _PROFILE.match(profile):
                raise ModelConfigError(f"invalid hardware profile {profile!r} for {key!r}")
        if not models:
            raise ModelConfigError("no models configured")
        self.default_owner = default_owner
        self._models = dict(models)
        self._versions = {schema_version_id(key.rpartition("/")[2]): key for key in models}

    @classmethod
    def parse(cls, text: str) -> ModelCatalog:
        """`name=profile,owner/name=profile,...` (WHISPERX_MODELS)."""
        models: dict[str, str] = {}
        for item in text.split(","):
            name, sep, profile = item.strip().partition("=")
            if not sep:
                raise ModelConfigError("WHISPERX_MODELS must look like name=profile,...")
            models[name.strip()] = profile.strip()
        return cls(models)

    def get(self, owner: str, name: str) -> ModelRef | None:
        profile = self._models.get(f"{owner}/{name}") or self._models.get(name)
        if profile is None:
            return None
        return ModelRef(owner, name, profile, schema_version_id(name))

    def by_version(self, version: str) -> ModelRef | None:
        """A model from a create request's `version`: an id, `owner/name[:id]` or a name."""
        if _VERSION_ID.match(version):
            key = self._versions.get(version)
            if key is None:
                return None
            owner, _, name = key.rpartition("/")
            return self.get(owner or self.default_owner, name)
        ref, _, version_id = version.partition(":")
        owner, _, name = ref.rpartition("/")
        model = self.get(owner or self.default_owner, name)
        if model is None or (version_id and version_id != model.version):
            return None
        return model

    def all(self) -> list[ModelRef]:
        refs = []
        for key in self._models:
            owner, _, name = key.rpartition("/")
            ref = self.get(owner or self.default_owner, name)
            if ref is not None:
                refs.append(ref)
        return refs


def version_json(model: ModelRef, openapi_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model.version,
        "created_at": VERSION_CREATED_AT,
        # Not a Cog image; the clients only parse this to adapt very old Cog schemas.
        "cog_version": "whisperx-gateway",
        "openapi_schema": openapi_schema,
    }


def model_json(model: ModelRef, base_url: str, openapi_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": f"{base_url.rstrip('/')}/v1/models/{model.full_name}",
        "owner": model.owner,
        "name": model.name,
        "description": f"WhisperX speech recognition on the {model.hardware!r} hardware "
        "profile: transcripts with word timestamps and speaker labels",
        "visibility": "public",
        "github_url": None,
        "paper_url": "https://arxiv.org/abs/2303.00747",
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_json(model, openapi_schema),
    }
