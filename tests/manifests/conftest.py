"""Fixtures for the manifest tests: each kustomization rendered once per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# `--import-mode=importlib` keeps test folders off sys.path; the tests here share
# manifest_support.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import manifest_support as support


@pytest.fixture
def rendered() -> dict[str, list[dict[str, Any]]]:
    """kustomization name (gpu, kind, base, argocd) -> the objects it renders: rendered
    once per session, deep-copied per test so that a test may change what it gets."""
    return {name: support.render(path) for name, path in support.ROOTS.items()}
