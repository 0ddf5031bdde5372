"""Hosts and ports in URLs and listening sockets, IPv6 included.

A listen host of "" means every interface, IPv4 and IPv6 (one socket per family; IPv4
alone where the node has no IPv6), so a server answers on whichever pod IP a cluster
gives: single-stack IPv4, single-stack IPv6 or dual-stack.
"""

from __future__ import annotations

import ipaddress

ALL_INTERFACES = ""


def join_host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (Go's net.JoinHostPort)."""
    return f"[{host}]:{port}" if ":" in host or "%" in host else f"{host}:{port}"


def bind_host(host: str) -> str | None:
    """What aiohttp binds for a listen host: None (every interface) for ""."""
    return host or None


def wildcard_for(ip: str) -> str:
    """The wildcard address of `ip`'s family, for a server that binds one address only
    (kopf's liveness endpoint): "::" for an IPv6 pod IP, else "0.0.0.0"."""
    try:
        version = ipaddress.ip_address(ip.strip()).version
    except ValueError:
        version = 4
    return "::" if version == 6 else "0.0.0.0"


def loopback_url(listen_host: str, port: int) -> str:
    """The URL a process reaches its own server at: a wildcard listen host through the
    loopback of its family (a server bound to "::" alone does not answer 127.0.0.1)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)
    return f"http://{join_host_port(host, port)}"
