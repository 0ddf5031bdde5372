"""pytest fixtures for the real node (tests/cluster/node.py): a control plane on the node's
address and one real node registered to it, for the whole test session.

Loaded once, by tests/cluster/conftest.py: a fixture imported into each test module would
be a fixture of its own there, and a second node would start (one runs per machine).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.node import BUSYBOX_IMAGE, RealNode, busybox_image, running_node


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """The node (its control plane is `real_node.plane`); the host is restored after."""
    with running_node(tmp_path_factory.mktemp("real-node")) as node:
        yield node


@pytest.fixture(scope="session")
def busybox(real_node: RealNode) -> str:
    """A busybox image on the node (`imagePullPolicy: Never`); its name."""
    return real_node.import_image(busybox_image(), BUSYBOX_IMAGE)


__all__ = ["busybox", "real_node"]
