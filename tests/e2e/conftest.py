"""The real-cluster suite: runs where $KUBECONFIG points at a reachable cluster (kind or
k3d) with the stack deployed (`kubectl apply -k manifests/overlays/kind`, images loaded);
skipped, with the reason, everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

KUBECTL = str(Path(sys.executable).parent / "kubectl")


@cache
def cluster_unavailable() -> str | None:
    """Why there is no cluster to test against, or None when there is one."""
    if not os.environ.get("KUBECONFIG"):
        return "KUBECONFIG is not set: no cluster to run the end-to-end suite against"
    try:
        result = subprocess.run(
            [KUBECTL, "version", "--request-timeout=3s"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"kubectl cannot reach the cluster: {exc}"
    if result.returncode != 0:
        return f"the cluster in $KUBECONFIG is unreachable: {result.stderr.strip()[:300]}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            reason = cluster_unavailable()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
