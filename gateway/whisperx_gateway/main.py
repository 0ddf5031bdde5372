"""`whisperx-gateway`: the Replicate-compatible API in front of the cluster.

Configured from the environment (docs/architecture.md). `WHISPERX_BACKEND=local` runs
local mode instead (the same as `whisperx-local`).
"""

from __future__ import annotations

import logging
import os
import sys

from aiohttp import web

from whisperx_api.hostport import bind_host, join_host_port
from whisperx_api.kube import KubeClient
from whisperx_api.store import Store
from whisperx_gateway import local
from whisperx_gateway.app import create_app
from whisperx_gateway.auth import TokenConfigError
from whisperx_gateway.config import ConfigError, GatewayConfig
from whisperx_gateway.kube_backend import KubeBackend
from whisperx_gateway.models import ModelConfigError


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("WHISPERX_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    backend = os.environ.get("WHISPERX_BACKEND", "kubernetes").strip().lower()
    if backend == "local":
        local.main([])
        return
    if backend != "kubernetes":
        sys.exit(f"WHISPERX_BACKEND must be kubernetes or local, not {backend!r}")
    try:
        config = GatewayConfig.from_env()
    except (ConfigError, TokenConfigError, ModelConfigError, OSError) as exc:
        sys.exit(f"whisperx-gateway: {exc}")

    async def build() -> web.Application:
        # WHISPERX_KUBE_SERVER: an API server URL without credentials (development,
        # tests); otherwise the in-cluster service account, else $KUBECONFIG.
        kube = KubeClient(
            server=os.environ.get("WHISPERX_KUBE_SERVER"), field_manager="whisperx-gateway"
        )
        return create_app(
            config, Store.from_url(config.redis_url, config.redis_pool_size), KubeBackend(kube)
        )

    logging.getLogger("whisperx_gateway").info(
        "whisperx-gateway on %s (Kubernetes backend)",
        join_host_port(config.host or "*", config.port),
    )
    web.run_app(build(), host=bind_host(config.host), port=config.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
