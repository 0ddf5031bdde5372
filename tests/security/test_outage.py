"""A Redis outage is logged once, then at most once a minute, and retried with backoff
(before: a traceback every 0.2 s, about 1 MiB of log a minute)."""

from __future__ import annotations

import logging

import pytest

from whisperx_api.outage import Outage


def test_an_outage_logs_boundedly_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = Outage(
        logging.getLogger("t"), "Redis", base_delay=0.2, max_delay=5, clock=lambda: now[0]
    )
    delays = []
    with caplog.at_level(logging.WARNING):
        for _ in range(600):  # ten minutes of failures, a try every second
            delays.append(outage.failed(ConnectionError("refused")))
            now[0] += 1
        outage.recovered()
        outage.recovered()  # nothing more to say
    assert delays[:6] == [0.2, 0.4, 0.8, 1.6, 3.2, 5]
    assert max(delays) == 5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 11 and not any(r.exc_info for r in caplog.records)
    assert messages[0] == "Redis unavailable: refused"
    assert messages[1] == "Redis still unavailable after 60 s: refused"
    assert messages[-1] == "Redis available again after 600 s"
    assert outage.failed(ConnectionError("again")) == 0.2  # a new outage starts over
