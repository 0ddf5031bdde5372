"""Local mode's runners: warm processes that ask for predictions, and the queue they ask.

A runner process loads its model once and asks the runner endpoint for work
(`whisperx_api.work`); this class is that endpoint's `WorkSource` in local mode and the
supervisor of the processes. It starts runners while queued predictions outnumber the
runners free to take them, up to `concurrency`; a runner exits on its own after its idle
time or its most predictions. What a runner held when it died (crash, SIGKILL, deadline)
fails; nothing else does. Status changes all go through the shared `StatusWriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from whisperx_api import lifecycle as lc
from whisperx_api.metrics import RunnerMetrics
from whisperx_api.records import PredictionRecord
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.work import (
    STOP,
    Assignment,
    FairQueue,
    WorkRequest,
    WorkWaiter,
    report_url,
    runner_token,
    work_url,
)

log = logging.getLogger(__name__)

_OUTPUT_TAIL_LINES = 20
Key = tuple[str, str]


@dataclass(frozen=True)
class RunnerLimits:
    """One hardware profile's runners: how many at once, how long one waits idle for work
    before it exits (0: one prediction per runner), how many predictions one serves
    (0: no limit)."""

    max_runners: int
    idle_seconds: float
    max_predictions: int = 0


@dataclass
class _Pending:
    secrets: dict[str, str]
    deadline: int | None
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Runner:
    id: str
    process: asyncio.subprocess.Process
    holding: Key | None = None
    served: int = 0
    idle: bool = False  # in a request for work right now
    timer: asyncio.TimerHandle | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_OUTPUT_TAIL_LINES))


def exit_message(code: int) -> str:
    """Why a runner that did not report its end stopped, as the caller sees it: its
    output (internal paths, tracebacks) goes to local mode's log only."""
    if code == 0:
        text = "the runner exited without reporting a result"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        text = f"the runner was killed by {name}"
        if code == -signal.SIGKILL:
            text += " (out of memory?)"
    else:
        text = f"the runner exited with code {code}"
    return text


class LocalRunners:
    def __init__(
        self,
        command: Sequence[str],
        env: Callable[[], dict[str, str]],
        limits: RunnerLimits,
        *,
        store: Store,
        writer: StatusWriter,
        on_done: Callable[[str, str], Awaitable[None]],
        stop_grace: float,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.limits = limits
        self.store = store
        self.writer = writer
        self.on_done = on_done
        self.stop_grace = stop_grace
        self.preexec = preexec
        self.base_url = ""  # the runner endpoint, once it serves
        self.queue = FairQueue()
        self._pending: dict[Key, _Pending] = {}
        self._runners: dict[str, _Runner] = {}
        self._waiter = WorkWaiter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.metrics = RunnerMetrics(
            "whisperx_local",
            busy=lambda: sum(r.holding is not None for r in self._runners.values()),
            idle=lambda: sum(r.idle for r in self._runners.values()),
        )

    # --- the backend's side ---

    async def submit(
        self, record: PredictionRecord, secrets: dict[str, str], deadline: int | None
    ) -> None:
        key = (record.namespace, record.id)
        self._pending[key] = _Pending(secrets, deadline)
        self.queue.push(*key)
        if self._free_runners() + self._room() < len(self.queue):
            await self.writer.apply(
                *key,
                lc.Queued(
                    reason="WaitingForRunnerSlot",
                    message=f"all {self.limits.max_runners} runner(s) are busy",
                    at=lc.now_utc(),
                ),
            )
        await self._scale()
        await self._waiter.announce()

    async def cancel(self, namespace: str, prediction_id: str) -> None:
        """After the writer recorded the cancel: drop it from the queue, or stop the
        runner holding it (the runner reports `canceled` and exits; another starts when
        work needs one)."""
        key = (namespace, prediction_id)
        if self.queue.remove(*key):
            self._pending.pop(key, None)
            await self.on_done(*key)
            return
        for runner in self._runners.values():
            if runner.holding == key:
                self._spawn_task(self._stop(runner.process), f"wx-stop-{runner.id}")

    async def close(self) -> None:
        self._closing = True
        await self._waiter.announce()
        self._pending.clear()
        await asyncio.gather(*(self._stop(r.process) for r in list(self._runners.values())))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def unfinished(self) -> list[Key]:
        held = [r.holding for r in self._runners.values() if r.holding is not None]
        return [*self._pending, *held]

    # --- the runners' side (WorkSource) ---

    async def claim(
        self, runner_id: str, request: WorkRequest
    ) -> Assignment | Literal["stop"] | None:
        runner = self._runners.get(runner_id)
        if runner is None or self._closing:
            return STOP
        if request.setup_seconds is not None:
            self.metrics.setup.observe(request.setup_seconds)
            log.info("runner %s ready in %.1f s", runner_id, request.setup_seconds)
        await self._release(runner)
        if self.limits.max_predictions and runner.served >= self.limits.max_predictions:
            return STOP

        def take() -> Awaitable[Assignment | None] | None:
            key = self.queue.pop()
            return self._assign(runner, key) if key is not None else None

        def idle(waiting: bool) -> None:
            runner.idle = waiting

        return await self._waiter.poll(
            request.wait, take=take, alive=lambda: not self._closing, idle=idle
        )

    # --- internals ---

    def _free_runners(self) -> int:
        return sum(r.holding is None for r in self._runners.values())

    def _room(self) -> int:
        return max(0, self.limits.max_runners - len(self._runners))

    async def _scale(self) -> None:
        while (
            not self._closing
            and len(self.queue) > self._free_runners()
            and len(self._runners) < self.limits.max_runners
        ):
            if not await self._start_runner():
                return

    async def _start_runner(self) -> bool:
        runner_id = uuid.uuid4().hex[:12]
        env = self.env()
        env.update(
            WHISPERX_WORK_URL=work_url(self.base_url, runner_id),
            WHISPERX_RUNNER_TOKEN=runner_token(self.writer.report_key, runner_id),
            WHISPERX_IDLE_SECONDS=f"{self.limits.idle_seconds:g}",
            WHISPERX_MAX_PREDICTIONS=str(self.limits.max_predictions),
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # SIGTERM reaches its children (ffmpeg) too
                preexec_fn=self.preexec,
            )
        except OSError as exc:
            await self._fail_queue("RunnerNotStarted", f"cannot start the runner: {exc}")
            return False
        runner = _Runner(runner_id, process)
        self._runners[runner_id] = runner
        log.info("runner %s started (pid %d)", runner_id, process.pid)
        self._spawn_task(self._watch(runner), f"wx-runner-{runner_id}")
        return True

    async def _fail_queue(self, reason: str, message: str) -> None:
        """No runner can start: what waits for one would wait forever."""
        while (key := self.queue.pop()) is not None:
            self._pending.pop(key, None)
            await self._fail(key, reason, message)
            await self.on_done(*key)

    async def _assign(self, runner: _Runner, key: Key) -> Assignment | None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return None
        runner.holding = key  # from here on, a cancel finds it on this runner
        try:
            record = await self.store.get_record(*key)
            if record is None or record.state.terminal:
                runner.holding = None
                await self.on_done(*key)
                return None
            if record.state.queued:
                await self.writer.apply(*key, lc.Admitted(at=lc.now_utc()))
        except BaseException:
            # Cut off (Redis, or the runner's request gone): the next runner takes it.
            runner.holding = None
            self._pending[key] = pending
            self.queue.push(*key)
            raise
        self.metrics.queued.observe(time.monotonic() - pending.queued_at)
        self.metrics.starts.inc("warm" if runner.served else "cold")
        runner.served += 1
        if pending.deadline is not None:
            runner.timer = asyncio.get_running_loop().call_later(
                pending.deadline, self._deadline_passed, runner, key, pending.deadline
            )
        log.info("prediction %s/%s: on runner %s (pid %d, %s start)", *key, runner.id,
                 runner.process.pid, "warm" if runner.served > 1 else "cold")  # fmt: skip
        return Assignment(
            namespace=key[0],
            id=key[1],
            input={**record.input, **pending.secrets},
            report_url=report_url(self.base_url, *key),
            report_token=self.writer.report_token(record),
            attempt=runner.id,
        )

    async def _release(self, runner: _Runner, reason: str = "", message: str = "") -> None:
        """The runner is done with what it held: asking for more work means its report
        went out (or was refused), exiting means it will never come."""
        key, runner.holding = runner.holding, None
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if key is None:
            return
        await self._fail(
            key,
            reason or "NoResult",
            message or "the runner went on without delivering this prediction's result",
        )
        await self.on_done(*key)

    def _deadline_passed(self, runner: _Runner, key: Key, seconds: int) -> None:
        async def end() -> None:
            await self._fail(key, "DeadlineExceeded", f"the run took longer than {seconds} s")
            await self._stop(runner.process)

        if runner.holding == key:
            self._spawn_task(end(), f"wx-deadline-{key[1]}")

    async def _fail(self, key: Key, reason: str, message: str) -> None:
        """Ends the prediction as failed unless it has ended already."""
        await self.writer.apply(*key, lc.Failed(reason=reason, message=message, at=lc.now_utc()))

    async def _watch(self, runner: _Runner) -> None:
        assert runner.process.stdout is not None
        await _pump(runner.process.stdout, runner.tail, runner.id)
        code = await runner.process.wait()
        del self._runners[runner.id]
        log.info("runner %s exited with code %d after %d prediction(s)", runner.id, code,
                 runner.served)  # fmt: skip
        held = runner.holding
        try:
            await self._release(runner, "RunnerExited", exit_message(code))
        except Exception:
            # Redis unavailable: the backend's record of active predictions names it, so
            # the next start ends it if nothing else did.
            log.exception("runner %s: ending what it held failed", runner.id)
        if held is not None and code != 0 and runner.tail:
            log.warning("prediction %s/%s: runner %s died; its last output: %s", *held,
                        runner.id, " | ".join(runner.tail))  # fmt: skip
        await self._scale()

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_grace):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def _spawn_task(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_LINE_BREAK = re.compile(rb"[\r\n]+")
_MAX_LINE = 4096


async def _pump(stream: asyncio.StreamReader, tail: deque[str], label: str) -> None:
    """Keeps a runner's last output lines (for the error of a crash) and logs them."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = _LINE_BREAK.split(pending + chunk)
        pending = pending[-_MAX_LINE:]
        for raw in lines:
            line = raw.decode(errors="replace").strip()[:_MAX_LINE]
            if line:
                tail.append(line)
                log.debug("runner %s: %s", label, line)
    if pending.strip():
        tail.append(pending.decode(errors="replace").strip())
