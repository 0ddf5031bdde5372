"""The hostile-input suite reuses the runner's loopback servers (audio source, report
endpoint) and the gateway's fixtures (a gateway on local mode's backend, a webhook
receiver)."""

from tests.gateway.conftest import gateway, http, receiver
from tests.runner.conftest import audio_server, fox_bytes, report_server

__all__ = ["audio_server", "fox_bytes", "gateway", "http", "receiver", "report_server"]
