"""Local mode's data folder and its private redis-server.

The folder holds the Redis data (AOF: every tenant's inputs and transcripts, the files
key, the webhook secret) and the inputs handed to runners, so it is readable by this
user only, and one local mode at a time uses it (an exclusive lock held while it runs).
The Redis listens on loopback with a password, dies with local mode even when local
mode is killed (Linux), is restarted should it die alone, and an orphan left by an
older local mode (its pid file names a live redis-server) is stopped before a new one
starts on the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import IO

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from whisperx_gateway.local_backend import die_with_parent

log = logging.getLogger(__name__)

LOCK_FILE = "whisperx-local.lock"
PID_FILE = "redis.pid"
CONFIG_FILE = "redis.conf"


class DataDir:
    """The data folder, private to this user, locked for this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.chmod(0o700)  # a folder made by an older version may be world-readable
        lock = (self.path / LOCK_FILE).open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SystemExit(
                f"{self.path} is in use by another whisperx-local; stop it first or give "
                "another --data-dir"
            ) from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _quote(value: str) -> str:
    """A redis.conf string argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _live_redis(pid: int) -> bool:
    """Whether `pid` is a running redis-server (Linux: its /proc command line)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class PrivateRedis:
    """A redis-server for this process only, on a data folder this process has locked."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self._password = secrets.token_urlsafe(24)
        self.port = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> str:
        await asyncio.to_thread(self._stop_orphan)
        # A free port is picked, then retried should another process take it first.
        for _ in range(5):
            self.port = _free_port()
            if await self._launch():
                self._supervisor = asyncio.create_task(self._supervise(), name="wx-redis")
                return self.url
        raise SystemExit("could not start redis-server")

    def _stop_orphan(self) -> None:
        """Stops a redis-server that an older local mode left on this data folder (the
        lock says none is running it now)."""
        pid_file = self.data_dir / PID_FILE
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if not _live_redis(pid):
            return
        log.warning("stopping an orphaned redis-server (pid %d) on %s", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _live_redis(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _live_redis(pid):
            os.kill(pid, signal.SIGKILL)

    def _write_config(self) -> Path:
        settings = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "requirepass": self._password,
            "dir": _quote(str(self.data_dir)),
            "pidfile": _quote(str(self.data_dir / PID_FILE)),
            "appendonly": "yes",
            "save": '""',
        }
        path = self.data_dir / CONFIG_FILE
        # The password stays out of the command line (`ps`): in a file only we can read.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.writelines(f"{name} {value}\n" for name, value in settings.items())
        return path

    async def _launch(self) -> bool:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: run scripts/setup.sh or set REDIS_URL")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            str(self._write_config()),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self.url = f"redis://:{self._password}@127.0.0.1:{self.port}/0"
        if await self._ready():
            return True
        await self._terminate()
        return False

    async def _ready(self, attempts: int = 200) -> bool:
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(attempts):
                if self.process is None or self.process.returncode is not None:
                    return False
                with contextlib.suppress(RedisError, OSError):
                    if await client.ping():
                        return True
                await asyncio.sleep(0.05)
            return False
        finally:
            await client.aclose()

    async def _supervise(self) -> None:
        """Restarts the server, on the same port and data, should it die on its own:
        clients reconnect by themselves."""
        delay = 1.0
        while self.process is not None:
            code = await self.process.wait()
            if self._stopping:
                return
            log.error("the private redis-server exited (code %s); restarting it", code)
            while not await self._launch():
                log.error("could not restart redis-server; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
            log.warning("the private redis-server is back at 127.0.0.1:%d", self.port)

    async def _terminate(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()
        if self._supervisor is not None:
            await self._supervisor
