"""The hostile-input suite reuses the runner's loopback report endpoint."""

from tests.runner.conftest import report_server

__all__ = ["report_server"]
