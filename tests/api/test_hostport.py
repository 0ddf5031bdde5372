"""Hosts and ports in URLs and listening sockets, IPv6 included."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from whisperx_api.hostport import bind_host, join_host_port, loopback_url, wildcard_for
from whisperx_gateway.config import GatewayConfig
from whisperx_runner.fetch import _redact


@pytest.mark.parametrize(
    ("host", "port", "joined"),
    [
        ("10.96.0.1", 443, "10.96.0.1:443"),
        ("fd00:10:96::1", 443, "[fd00:10:96::1]:443"),
        ("::", 8080, "[::]:8080"),
        ("fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
        (
            "whisperx-operator.whisperx-system.svc",
            8081,
            "whisperx-operator.whisperx-system.svc:8081",
        ),
    ],
)
def test_join_host_port_brackets_ipv6(host: str, port: int, joined: str) -> None:
    assert join_host_port(host, port) == joined


def test_wildcard_of_the_pod_ip_family() -> None:
    assert wildcard_for("fd00::7") == "::"
    assert wildcard_for("10.0.0.7") == "0.0.0.0"
    assert wildcard_for("") == "0.0.0.0"


def test_the_gateway_listens_on_every_interface_by_default() -> None:
    config = GatewayConfig.from_env({"WHISPERX_TOKENS": "token-of-ns=ns"})
    assert bind_host(config.host) is None


def has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_every_interface_answers_on_ipv4_and_ipv6() -> None:
    app = web.Application()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, bind_host(""), port).start()
    try:
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "::1"):
                async with http.get(f"http://{join_host_port(host, port)}/") as resp:
                    assert await resp.text() == "ok", host
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("listen_host", "url"),
    [
        ("", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),  # bound to IPv6 alone: 127.0.0.1 would not answer
        ("::1", "http://[::1]:8000"),
        ("192.168.1.5", "http://192.168.1.5:8000"),
    ],
)
def test_a_server_reaches_itself_on_its_own_family(listen_host: str, url: str) -> None:
    assert loopback_url(listen_host, 8000) == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://[fd00::5]:8080/a.wav?X-Amz-Signature=s", "http://[fd00::5]:8080/a.wav"),
        ("https://[2001:db8::1]/a.wav?sig=s", "https://[2001:db8::1]/a.wav"),
        ("https://example.com:8443/a.wav?sig=s", "https://example.com:8443/a.wav"),
        ("https://user:secret@example.com/a.wav", "https://example.com/a.wav"),
    ],
)
def test_the_runner_names_ipv6_audio_hosts_in_brackets(url: str, shown: str) -> None:
    assert _redact(url) == shown
