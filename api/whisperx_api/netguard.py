"""Outbound connections to URLs a client chose: public addresses only, unless allow-listed.

A client names the runner's audio URL and the control plane's webhook target. Either
could point at loopback, the cluster's private services or the cloud metadata endpoint
(169.254.169.254). The check runs on the resolved address at connection time (in the
resolver, `whisperx_api.resolver`, so a DNS answer cannot slip past it) and again for IP
literals, which aiohttp connects to without resolving. No aiohttp here (yarl only): the
runner's CLI imports this without loading its network stack.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

import yarl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_kind(address: IPAddress) -> str | None:
    """Why an address is not a public one (None when it is public)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_private or not address.is_global:
        return "private"
    return None


@dataclass(frozen=True)
class HostAllowList:
    """Hosts or address ranges a URL may reach although they are not public.

    In-cluster sources (MinIO, a Service) live on private addresses, which are refused by
    default because a URL chosen by a client must not reach the cluster's internals or the
    cloud metadata endpoint. Entries: host names, `*.suffix` or `.suffix`, addresses and
    CIDRs, separated by commas or spaces; `host:port` (`[::1]:port` for IPv6) admits that
    one port only, so a loopback service does not open every other loopback port, and
    `host:port/path/` only the URLs under that path (`allows_path`).
    """

    hostnames: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    # (host name or address text, port) pairs.
    endpoints: frozenset[tuple[str, int]] = frozenset()
    # (host name or address text, port, path prefix) of `host:port/path` entries.
    paths: frozenset[tuple[str, int, str]] = frozenset()

    @classmethod
    def parse(cls, text: str) -> HostAllowList:
        hostnames: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        endpoints: set[tuple[str, int]] = set()
        paths: set[tuple[str, int, str]] = set()
        for entry in text.replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            # Not a CIDR: a `/` starts a path.
            endpoint, slash, path = entry.partition("/")
            host, sep, port = endpoint.rpartition(":")
            if sep and port.isdigit() and host:
                if slash:
                    paths.add((_normal_host(host), int(port), slash + path))
                else:
                    endpoints.add((_normal_host(host), int(port)))
                continue
            name = entry.lower().rstrip(".")
            if name.startswith("*."):
                suffixes.append(name[1:])
            elif name.startswith("."):
                suffixes.append(name)
            elif name:
                hostnames.add(name)
        return cls(
            frozenset(hostnames),
            tuple(suffixes),
            tuple(networks),
            frozenset(endpoints),
            frozenset(paths),
        )

    def allows_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hostnames or any(name.endswith(s) for s in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)

    def allows(self, host: str, address: IPAddress | None, port: int | None) -> bool:
        """Whether the host, or the address it resolved to, is allow-listed (on `port`)."""
        if self.allows_host(host) or (address is not None and self.allows_address(address)):
            return True
        if port is None:
            return False
        names = {_normal_host(host)} | ({str(address)} if address is not None else set())
        scoped = {(name, scoped_port) for name, scoped_port, _ in self.paths}
        return any((name, port) in self.endpoints | scoped for name in names)

    def allows_path(self, host: str, port: int, path: str) -> bool:
        """Whether a URL's (normalized) path is one that its host and port admit: any,
        unless they are listed with paths only."""
        name = _normal_host(host)
        if self.allows_host(host) or (name, port) in self.endpoints:
            return True
        with contextlib.suppress(ValueError):
            if self.allows_address(ipaddress.ip_address(name)):
                return True
        prefixes = [prefix for h, p, prefix in self.paths if (h, p) == (name, port)]
        return not prefixes or any(path.startswith(prefix) for prefix in prefixes)


def _normal_host(host: str) -> str:
    """An address in its canonical text, a name in lower case without a trailing dot."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower().rstrip(".")


class AddressRefused(Exception):
    """A URL's host is (or resolves to) a non-public address that is not allow-listed.

    Not an OSError: aiohttp's connector lets it through its resolver unwrapped."""

    def __init__(self, host: str, address: IPAddress | None, kind: str) -> None:
        article = "an" if kind[0] in "aeiou" else "a"
        where = f"resolves to {address}, {article}" if address else f"is {article}"
        super().__init__(f"host {host!r} {where} {kind} address; refused")
        self.host, self.address, self.kind = host, address, kind


class PathRefused(AddressRefused):
    """An allow-listed host and port, at a path outside those listed for them."""

    def __init__(self, host: str, port: int) -> None:
        Exception.__init__(self, f"host {host!r} port {port} is allowed other paths only; refused")
        self.host, self.address, self.kind = host, None, "path"


def check_address(
    host: str, address: IPAddress, allow: HostAllowList, port: int | None = None
) -> None:
    """Refuses a non-public address unless the host or the address is allow-listed."""
    kind = address_kind(address)
    if kind is None or allow.allows(host, address, port):
        return
    raise AddressRefused(host, address, kind)


def check_literal(host: str, allow: HostAllowList, port: int | None = None) -> None:
    """The check for what never reaches a resolver: IP literals, and `localhost` names
    (which resolve to loopback by definition, RFC 6761)."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.lower().rstrip(".")
        loopback = name == "localhost" or name.endswith(".localhost")
        if loopback and not allow.allows(name, None, port):
            raise AddressRefused(host, None, "loopback") from None
        return
    kind = address_kind(literal)
    if kind is not None and not allow.allows(host, literal, port):
        raise AddressRefused(host, None, kind)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_url(url: str, allow: HostAllowList) -> None:
    """Refuses a URL whose host is visibly internal, or whose path its allow-list entry
    does not admit, before any connection (a malformed port is a ValueError)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    check_literal(parts.hostname, allow, port)
    # The path as the client sends it and the server routes it (dot segments resolved,
    # percent-escapes decoded), as yarl makes it for aiohttp.
    if port is not None and not allow.allows_path(parts.hostname, port, yarl.URL(url).path):
        raise PathRefused(parts.hostname, port)
