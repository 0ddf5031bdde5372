"""An API fuzz run: schemathesis generates requests from /openapi.json (valid and
invalid, then stateful sequences through the links) against `whisperx-local` with the
stand-in runner, and checks every answer: no 5xx, status codes, content types and bodies
as documented, invalid requests refused, authentication enforced."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.gateway.conftest import STAND_IN_RUNNER, local_mode

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
# A fixed seed keeps CI reproducible; set WHISPERX_FUZZ_SEED to explore other inputs.
SEED = os.environ.get("WHISPERX_FUZZ_SEED", "20261125")


async def test_fuzzing_the_api_finds_no_server_errors(redis_url: str, tmp_path: Path) -> None:
    async with local_mode(
        tmp_path / "local.log",
        "--redis-url", redis_url,
        "--concurrency", "1",
        "--runner-command", " ".join(STAND_IN_RUNNER),
    ) as local:  # fmt: skip
        fuzz = await asyncio.create_subprocess_exec(
            SCHEMATHESIS, "run", f"{local.url}/openapi.json",
            "--header", f"Authorization: Bearer {local.token}",
            "--checks", "all",
            # Valid by the schema yet refused, by design: opaque list cursors, and the
            # rules JSON Schema cannot state (min_speakers <= max_speakers, duration
            # ranges). Refusing invalid data is still checked (negative_data_rejection).
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "25",
            "--workers", "1",
            "--generation-database", "none",
            "--seed", SEED,
            "--request-timeout", "70",
            "--no-color",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(fuzz.communicate(), 150)
        report = output.decode(errors="replace")
        assert fuzz.returncode == 0, report
        assert "Tested: 18" in report, report
    errors = [line for line in local.log().splitlines() if " ERROR whisperx" in line]
    assert errors == [], local.log()
