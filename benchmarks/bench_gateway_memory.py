"""The gateway's memory under large uploads and reads of large predictions, this tree
against an earlier commit's gateway, in one run.

    .venv/bin/python benchmarks/bench_gateway_memory.py [--before REV] [--upload-mib 64]
        [--reads 100]

Each gateway (the earlier one from `git archive REV`, on PYTHONPATH ahead of this tree)
runs in its own process against a private redis-server, with the Kubernetes backend and
a stub API server (benchmarks/bench_gateway.py's). Measured from /proc: its RSS once
started; its peak RSS (VmHWM) over one upload of `--upload-mib` MiB through
`POST /v1/files` and its download; and its RSS after `--reads` GETs of distinct finished
predictions whose input is a 1 MB data URI (what stays held after them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_gateway import (  # noqa: E402
    NAMESPACE,
    TOKEN,
    Server,
    finished_record,
    redis_server,
    serve_gateway,
)

FILES_KEY = "bench-files-key-0123456789abcdef"


def memory(pid: int) -> dict[str, float]:
    """RSS and its peak so far, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


async def seed(redis_url: str, count: int) -> list[str]:
    """Finished predictions whose input holds a 1 MB data URI."""
    from whisperx_api.store import Store

    store = Store.from_url(redis_url)
    audio = "data:audio/wav;base64," + base64.b64encode(os.urandom(750_000)).decode()
    ids = []
    for n in range(count):
        pid = f"benchlarge{n:015d}"
        await store.put_output(NAMESPACE, pid, {"segments": [], "detected_language": "en"})
        await store.put_record(finished_record(pid, {"audio_file": audio}))
        ids.append(pid)
    await store.close()
    return ids


async def exercise(url: str, pid: int, upload: bytes, ids: list[str]) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen = {"started": memory(pid)["VmRSS"]}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("content", upload, filename="big.wav", content_type="audio/wav")
        async with http.post(f"{url}/v1/files", data=form, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
            link = (await resp.json())["urls"]["get"]
        async with http.get(link) as resp:
            assert resp.status == 200 and len(await resp.read()) == len(upload)
        seen["upload and download, peak"] = memory(pid)["VmHWM"]
        before_reads = memory(pid)["VmRSS"]
        for prediction in ids:
            async with http.get(f"{url}/v1/predictions/{prediction}", headers=auth) as resp:
                assert resp.status == 200
                await resp.read()
        seen["after the reads"] = memory(pid)["VmRSS"]
        seen["held by the reads"] = seen["after the reads"] - before_reads
    return seen


def earlier_tree(rev: str, folder: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "api", "gateway"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="46dbca1^", help="the earlier commit")
    parser.add_argument("--upload-mib", type=int, default=64)
    parser.add_argument("--reads", type=int, default=100)
    args = parser.parse_args()
    upload = os.urandom(args.upload_mib * 1024 * 1024)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gw-memory-") as tmp:
        before = earlier_tree(args.before, Path(tmp) / "before")
        trees = {f"before ({args.before})": before, "this tree": None}
        for label, tree in trees.items():
            redis, redis_url = redis_server(tempfile.mkdtemp(dir=tmp))
            env = dict(os.environ)
            if tree is not None:
                env["PYTHONPATH"] = f"{tree / 'api'}:{tree / 'gateway'}"
            kube = Server("kube", redis_url)
            gateway = Server("gateway", redis_url, kube.url, script=__file__, env=env)
            try:
                kube.wait_ready()
                gateway.wait_ready()
                ids = asyncio.run(seed(redis_url, args.reads))
                results[label] = {
                    k: round(v, 1)
                    for k, v in asyncio.run(
                        exercise(gateway.url, gateway.process.pid, upload, ids)
                    ).items()
                }
            finally:
                gateway.stop()
                kube.stop()
                redis.terminate()
                redis.wait()
    labels = list(results)
    report: dict[str, Any] = {"MB": results}
    report["peak / before"] = round(
        results[labels[1]]["upload and download, peak"]
        / results[labels[0]]["upload and download, peak"],
        2,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        # The gateway with uploads on.
        serve_gateway(int(sys.argv[3]), sys.argv[4], sys.argv[5],
                      files_key=FILES_KEY.encode(), max_file_bytes=1 << 30)  # fmt: skip
    else:
        main()
