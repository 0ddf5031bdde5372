"""The hostile-input suite reuses the runner's loopback report endpoint and the
gateway's fixtures (a gateway on local mode's backend, a webhook receiver)."""

from tests.gateway.conftest import gateway, http, receiver
from tests.runner.conftest import report_server

__all__ = ["gateway", "http", "receiver", "report_server"]
