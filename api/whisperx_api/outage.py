"""Retrying a dependency that is down (Redis), with bounded logging.

A loop that polls Redis every 0.2 s and logs a traceback on each failure writes about a
megabyte a minute while Redis is away. An `Outage` logs the first failure, then at most
one line a minute while it lasts, and one when it ends; it also spaces the retries out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Outage:
    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
        log_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.what = what
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.log_every = log_every
        self.clock = clock
        self.since: float | None = None
        self.failures = 0
        self._logged_at = 0.0

    def failed(self, error: BaseException) -> float:
        """Records a failure; returns the seconds to wait before the next try."""
        now = self.clock()
        if self.since is None:
            self.since, self._logged_at = now, now
            self.log.warning("%s unavailable: %s", self.what, error)
        elif now - self._logged_at >= self.log_every:
            self._logged_at = now
            self.log.warning(
                "%s still unavailable after %.0f s: %s", self.what, now - self.since, error
            )
        self.failures += 1
        return min(self.base_delay * 2.0 ** (self.failures - 1), self.max_delay)

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning(
                "%s available again after %.0f s", self.what, self.clock() - self.since
            )
        self.since, self.failures = None, 0
