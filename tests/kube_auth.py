"""Kubeconfigs whose user is an exec credential plugin, as EKS (`aws eks get-token`) and
GKE (`gke-gcloud-auth-plugin`) write them.

`write_exec_kubeconfig(path, server, token, ca_file=...)` writes a kubeconfig and a small
plugin beside it. The plugin prints an `ExecCredential` carrying the token currently in
its token file (so a test can rotate it) and appends a line to `<path>.calls` per run (so a
test can count the runs). The same helper works against the emulator (http, no CA) and a
real API server (https, its CA file, a ServiceAccount token from TokenRequest).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

EXEC_API_VERSION = "client.authentication.k8s.io/v1"

PLUGIN = """\
import json, pathlib, sys

token_file, calls_file, lifetime = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(calls_file, "a") as calls:
    calls.write("run\\n")
status = {"token": pathlib.Path(token_file).read_text().strip()}
if lifetime > 0:
    from datetime import datetime, timedelta, timezone
    expiry = datetime.now(timezone.utc) + timedelta(seconds=lifetime)
    status["expirationTimestamp"] = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({"apiVersion": API_VERSION, "kind": "ExecCredential", "status": status}))
"""


def write_exec_kubeconfig(
    path: Path,
    server: str,
    token: str | Path,
    *,
    ca_file: Path | None = None,
    lifetime: float = 0,
) -> Path:
    """A kubeconfig at `path` for `server` whose user runs the exec plugin.

    `token`: the token itself (kept in `<path>.token`), or a file the plugin reads at each
    run (write another token there to rotate it). `ca_file`: the API server's CA (https).
    `lifetime` > 0: the plugin's credential carries an expirationTimestamp that far ahead.
    """
    if isinstance(token, str):
        token_file = path.with_name(path.name + ".token")
        token_file.write_text(token)
    else:
        token_file = token
    plugin = path.with_name(path.name + ".plugin.py")
    plugin.write_text(f"API_VERSION = {EXEC_API_VERSION!r}\n" + PLUGIN)
    cluster: dict[str, object] = {"server": server}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    user = {
        "exec": {
            "apiVersion": EXEC_API_VERSION,
            "command": sys.executable,
            "args": [str(plugin), str(token_file), str(calls_path(path)), str(lifetime)],
            "interactiveMode": "Never",
            "provideClusterInfo": False,
        }
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "plugin-user", "user": user}],
        "contexts": [{"name": "plugin", "context": {"cluster": "cluster", "user": "plugin-user"}}],
        "current-context": "plugin",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def calls_path(kubeconfig: Path) -> Path:
    return kubeconfig.with_name(kubeconfig.name + ".calls")


def plugin_runs(kubeconfig: Path) -> int:
    """How often the kubeconfig's exec plugin has run."""
    calls = calls_path(kubeconfig)
    return len(calls.read_text().splitlines()) if calls.exists() else 0
