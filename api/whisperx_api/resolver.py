"""The address guard (`whisperx_api.netguard`) inside aiohttp's connector: names are
resolved, then only the addresses the allow-list permits are connected to."""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from whisperx_api.netguard import AddressRefused, HostAllowList, check_address


class GuardedResolver(AbstractResolver):
    """Resolves names, then keeps only addresses the allow policy permits."""

    def __init__(self, allow: HostAllowList) -> None:
        self._inner = ThreadedResolver()
        self._allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refusal: AddressRefused | None = None
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
                check_address(host, address, self._allow, result["port"])
            except AddressRefused as exc:
                refusal = exc
            else:
                kept.append(result)
        if not kept and refusal is not None:
            raise refusal
        return kept

    async def close(self) -> None:
        await self._inner.close()
