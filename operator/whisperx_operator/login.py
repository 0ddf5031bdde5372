"""kopf logs in from the same loader as the operator's own client (`whisperx_api.kube`).

Registering a login handler replaces kopf's fallbacks, so both clients read one
credentials source: in-cluster, else the kubeconfig (exec plugins included). kopf calls
it again after a 401, which runs an exec plugin again or re-reads a rotated token.
"""

from __future__ import annotations

from typing import Any

import kopf

from whisperx_api.kube import load_configuration


async def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's view of a `kubernetes_asyncio` client configuration."""
    header = await configuration.get_api_key_with_prefix("BearerToken")
    scheme, _, token = (header or "").strip().rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        proxy_url=configuration.proxy,
    )


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    return await connection_info(await load_configuration())
