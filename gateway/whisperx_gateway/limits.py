"""Admission of requests: the gateway's in-flight limit, and each tenant's share of it.

Without a share, one tenant holding many slow requests (half-sent bodies, long
`Prefer: wait`s) fills the gateway and every other tenant gets 503s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from whisperx_gateway.errors import ApiError, unavailable


@dataclass
class InFlight:
    total_limit: int
    tenant_limit: int
    total: int = 0
    by_tenant: Counter[str] = field(default_factory=Counter)

    def admit(self, tenant: str | None) -> None:
        """Counts a request in, or raises the answer that refuses it (503 when the gateway
        is full, 429 when this tenant holds its share). `tenant` None: not authenticated
        (refused by its handler before it reads anything)."""
        if self.total >= self.total_limit:
            raise unavailable("the gateway is at its concurrency limit; retry shortly")
        if tenant is not None and self.by_tenant[tenant] >= self.tenant_limit:
            raise ApiError(
                429,
                f"this token's namespace has {self.tenant_limit} requests in flight, its "
                "share of the gateway (WHISPERX_MAX_IN_FLIGHT_PER_TOKEN); retry when some "
                "have finished",
                headers={"Retry-After": "1"},
            )
        self.total += 1
        if tenant is not None:
            self.by_tenant[tenant] += 1

    def release(self, tenant: str | None) -> None:
        self.total -= 1
        if tenant is not None:
            self.by_tenant[tenant] -= 1
            if not self.by_tenant[tenant]:
                del self.by_tenant[tenant]
