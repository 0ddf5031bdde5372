"""Decoding audio with ffmpeg to 16 kHz mono, the form every WhisperX stage takes."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisperx_runner.errors import InputError, RunnerError

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class DecodedAudio:
    """16-bit little-endian mono PCM at SAMPLE_RATE."""

    pcm: bytes

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def samples(self) -> Any:
        """float32 numpy samples in [-1, 1] (numpy is part of the ML extra)."""
        import numpy as np

        return np.frombuffer(self.pcm, np.int16).astype(np.float32) / 32768.0


async def decode_audio(path: Path, time_limit: float) -> DecodedAudio:
    """Decodes any format ffmpeg reads; a file without decodable audio (text, an image,
    nothing) is an input error, so it never reaches the models. Cancelling kills ffmpeg."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RunnerError("ffmpeg is not installed", reason="RunnerMisconfigured")
    cmd = [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        # Playlist formats could make ffmpeg open other URLs or local files (SSRF).
        "-protocol_whitelist",
        "file",
        "-threads",
        "0",
        "-i",
        str(path),
        "-vn",
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        str(SAMPLE_RATE),
        "-",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        raise InputError(
            f"audio_file took longer than {time_limit:g} s to decode", reason="InvalidAudio"
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        detail = stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1] if detail else f"ffmpeg exit code {proc.returncode}"
        last = last.replace(f"{path}: ", "")  # the temporary path means nothing to a client
        raise InputError(f"audio_file is not decodable audio: {last}", reason="InvalidAudio")
    if len(stdout) < 2:
        raise InputError("audio_file contains no audio samples", reason="InvalidAudio")
    return DecodedAudio(stdout)
