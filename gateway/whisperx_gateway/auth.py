"""API tokens: each maps to the one Kubernetes namespace its predictions live in.

Tokens come from a YAML file (`WHISPERX_TOKENS_FILE`: a mapping token -> namespace, the
shape of a mounted Secret) or from `WHISPERX_TOKENS` (`token=namespace,...`).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

# Kubernetes namespace names are DNS labels.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SCHEMES = ("bearer", "token")  # `Token` is Replicate's legacy scheme


class TokenConfigError(ValueError):
    pass


def parse_authorization(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` or `Token <token>`, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() not in _SCHEMES or not token or " " in token:
        return None
    return token


@dataclass(frozen=True)
class TokenMap:
    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> TokenMap:
        entries = []
        for token, namespace in mapping.items():
            if not isinstance(token, str) or len(token) < 8:
                raise TokenConfigError("every token must be a string of at least 8 characters")
            if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
                raise TokenConfigError(f"{namespace!r} is not a valid namespace name")
            entries.append((token.encode(), namespace))
        if not entries:
            raise TokenConfigError("no API tokens configured")
        return cls(tuple(entries))

    @classmethod
    def parse_env(cls, text: str) -> TokenMap:
        mapping: dict[str, str] = {}
        for item in text.split(","):
            token, sep, namespace = item.strip().rpartition("=")
            if not sep:
                raise TokenConfigError("WHISPERX_TOKENS must look like token=namespace,...")
            mapping[token.strip()] = namespace.strip()
        return cls.from_mapping(mapping)

    @classmethod
    def load_file(cls, path: Path) -> TokenMap:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise TokenConfigError(f"{path} must hold a YAML mapping token -> namespace")
        return cls.from_mapping(data)

    def namespace_for(self, token: str) -> str | None:
        """The token's namespace; compares against every entry so timing reveals nothing."""
        given = token.encode()
        found: str | None = None
        for expected, namespace in self.entries:
            if hmac.compare_digest(given, expected):
                found = namespace
        return found
