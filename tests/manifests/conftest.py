"""Fixtures for the manifest tests: each kustomization rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.manifests import manifest_support as support


@pytest.fixture
def rendered() -> dict[str, list[dict[str, Any]]]:
    """kustomization name (gpu, kind, base, argocd) -> the objects it renders: rendered
    once per session, deep-copied per test so that a test may change what it gets."""
    return {name: support.render(path) for name, path in support.ROOTS.items()}
