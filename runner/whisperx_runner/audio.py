"""Decoding audio with ffmpeg to 16 kHz mono, the form every WhisperX stage takes.

The audio comes from a client, so ffmpeg is held on a short leash:
- only real audio (and audio-in-video) container demuxers may open it
  (`-format_whitelist`), and only the local file itself may be read
  (`-protocol_whitelist file`): playlists (HLS), manifests (DASH), concat scripts and
  every other demuxer that opens a second input are refused, so a client cannot make
  ffmpeg read the runner's own files and get them back as a transcript;
- the container is probed first (no audio stream, too many channels, or a declared
  duration beyond the limit is refused before decoding), the decoded length is capped
  with `-t` (a header may lie: a 1 Hz WAV resampled to 16 kHz grows 16,000-fold), and
  ffmpeg runs under an address-space limit.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisperx_runner.errors import InputError, RunnerError

SAMPLE_RATE = 16_000
_BYTES_PER_SECOND = 2 * SAMPLE_RATE

# Demuxers (ffmpeg's short names) of containers that hold audio and never open another
# input. `mov` serves mp4/m4a/3gp (its external references, `enable_drefs`, stay off);
# `matroska` serves webm.
AUDIO_FORMATS = (
    "wav", "w64", "mp3", "flac", "ogg", "matroska", "mov", "aac", "loas", "aiff", "caf",
    "amr", "ac3", "eac3", "asf", "avi", "flv", "mpegts", "mpeg", "wv", "ape", "au", "dts",
    "tta", "mpc", "mpc8", "gsm", "voc",
)  # fmt: skip
# Speech is mono or stereo; a few dozen channels is the most any real recording holds.
MAX_CHANNELS = 64

# What a hostile upload most often is instead of audio, named by its first bytes (the
# format allow-list refuses them anyway; this only gives the clearer error).
_NOT_AUDIO = (
    (b"#EXTM3U", "an HLS playlist (M3U)"),
    (b"ffconcat", "an ffmpeg concat script"),
    (b"<?xml", "an XML document (a DASH manifest?)"),
    (b"<MPD", "a DASH manifest"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
)
_TAR_MAGIC_OFFSET = 257
# QuickTime and ISO media (mov, mp4, m4a): the type of the first box, at bytes 4 to 8.
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"junk")


@dataclass(frozen=True)
class DecodeLimits:
    # Decoded audio longer than this is refused (an input error naming the limit).
    max_seconds: float = 4 * 3600.0
    # Address-space limit of each ffmpeg/ffprobe process (loading its libraries alone
    # takes about 300 MiB of address space).
    memory_bytes: int = 1 << 30
    # Wall-clock time for probing and for decoding, each.
    time_limit: float = 900.0


@dataclass(frozen=True)
class DecodedAudio:
    """16-bit little-endian mono PCM at SAMPLE_RATE."""

    pcm: bytes | bytearray

    @property
    def duration(self) -> float:
        return len(self.pcm) / _BYTES_PER_SECOND

    def samples(self) -> Any:
        """float32 numpy samples in [-1, 1] (numpy is part of the ML extra)."""
        import numpy as np

        return np.frombuffer(self.pcm, np.int16).astype(np.float32) / 32768.0


def sniff_not_audio(head: bytes) -> str | None:
    """What the file is when its first bytes say it is a playlist, manifest, script or
    archive; None otherwise."""
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    for magic, kind in _NOT_AUDIO:
        if start.startswith(magic):
            return kind
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "a tar archive"
    return None


@dataclass(frozen=True)
class Probe:
    format_name: str
    duration: float | None
    channels: int


def parse_probe(text: str) -> Probe:
    """ffprobe's JSON (`-show_entries format=...:stream=...`) to what the checks need."""
    data = json.loads(text)
    streams = [s for s in data.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise InputError("audio_file contains no audio stream", reason="InvalidAudio")
    fmt = data.get("format", {})
    try:
        duration: float | None = float(fmt["duration"])
    except (KeyError, TypeError, ValueError):
        duration = None
    channels = max(int(s.get("channels") or 0) for s in streams)
    return Probe(str(fmt.get("format_name", "")), duration, channels)


def check_probe(probe: Probe, limits: DecodeLimits) -> None:
    if probe.channels > MAX_CHANNELS:
        raise InputError(
            f"audio_file has {probe.channels} audio channels; at most {MAX_CHANNELS} are accepted",
            reason="InvalidAudio",
        )
    if probe.duration is not None and probe.duration > limits.max_seconds:
        raise _too_long(limits, f"{probe.duration:.0f} s")


def _too_long(limits: DecodeLimits, length: str) -> InputError:
    return InputError(
        f"audio_file is {length} long; the limit is {limits.max_seconds:g} s "
        "(WHISPERX_MAX_AUDIO_SECONDS)",
        reason="AudioTooLong",
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RunnerError(f"{name} is not installed", reason="RunnerMisconfigured")
    return path


def _limited(cmd: list[str], memory_bytes: int) -> list[str]:
    """`cmd` under an address-space limit, set by the shell that then execs it (no
    Python between fork and exec)."""
    return ["/bin/sh", "-c", f'ulimit -v {memory_bytes // 1024} && exec "$@"', "sh", *cmd]


def _input_options(path: Path, mov: bool) -> list[str]:
    # A mov/mp4 track may keep its samples in another file, named by a data reference
    # (dref): never opened (ffmpeg's default, made explicit). Only the mov demuxer has
    # the option, and ffmpeg refuses one that the chosen demuxer does not use.
    drefs = ["-enable_drefs", "0"] if mov else []
    return [
        "-protocol_whitelist", "file",
        "-format_whitelist", ",".join(AUDIO_FORMATS),
        *drefs,
        "-i", f"file:{path}",
    ]  # fmt: skip


def looks_like_mov(head: bytes) -> bool:
    """Whether the file's first bytes are a QuickTime or ISO media box (mov, mp4, m4a)."""
    return head[4:8] in _MOV_BOXES


async def _run(cmd: list[str], limits: DecodeLimits, max_stdout: int, what: str) -> bytearray:
    """Runs a tool to its end within the time limit; its stdout (up to `max_stdout`
    bytes, then it is killed) on success, an input error with its last stderr line on
    failure. Cancelling kills it."""
    proc = await asyncio.create_subprocess_exec(
        *_limited(cmd, limits.memory_bytes),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    errors: deque[bytes] = deque(maxlen=20)  # a corrupt file can log an error per frame

    async def read_stdout() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(1 << 20):
            out.extend(chunk)
            if len(out) > max_stdout:
                proc.kill()
                return

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            errors.append(line[:1000])

    try:
        async with asyncio.timeout(limits.time_limit):
            await asyncio.gather(read_stdout(), read_stderr(), proc.wait())
    except TimeoutError:
        raise InputError(
            f"audio_file took longer than {limits.time_limit:g} s to {what}",
            reason="InvalidAudio",
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0 and len(out) <= max_stdout:
        lines = [e.decode(errors="replace").strip() for e in errors if e.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if any("not on whitelist" in line for line in lines):
            last = "not in an audio container this service decodes"
        # The temporary path means nothing to a client.
        last = last.split(": ", 1)[-1] if last.startswith(("file:", "/")) else last
        raise InputError(f"audio_file is not decodable audio: {last}", reason="InvalidAudio")
    return out  # not copied: decoded audio may be hundreds of megabytes


async def probe_audio(path: Path, limits: DecodeLimits) -> Probe:
    with path.open("rb") as file:
        mov = looks_like_mov(file.read(8))
    cmd = [
        _tool("ffprobe"), "-hide_banner", "-loglevel", "error",
        *_input_options(path, mov),
        "-show_entries", "format=format_name,duration:stream=codec_type,channels",
        "-of", "json",
    ]  # fmt: skip
    text = await _run(cmd, limits, 1 << 20, "probe")
    try:
        return parse_probe(text.decode(errors="replace"))
    except ValueError:
        raise RunnerError("ffprobe wrote output that is not JSON") from None


async def decode_audio(path: Path, limits: DecodeLimits | None = None) -> DecodedAudio:
    """Decodes a file in an allowed audio container; anything else (text, an image, a
    playlist, an archive, nothing) is an input error, so it never reaches the models."""
    limits = limits or DecodeLimits()
    with path.open("rb") as file:
        kind = sniff_not_audio(file.read(512))
    if kind is not None:
        raise InputError(f"audio_file is {kind}, not audio", reason="InvalidAudio")
    probe = await probe_audio(path, limits)
    check_probe(probe, limits)
    # One second past the limit: audio that reaches it is longer than allowed.
    cap = limits.max_seconds + 1
    cmd = [
        _tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error",
        # Audio decoders hardly use threads; one thread keeps the address space small.
        "-threads", "1", "-filter_threads", "1",
        # The demuxer ffprobe chose (the same probing, the same file) is the one used here.
        *_input_options(path, probe.format_name.split(",")[0] == "mov"),
        "-vn", "-sn", "-dn", "-t", f"{cap:.3f}",
        "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-",
    ]  # fmt: skip
    pcm = await _run(cmd, limits, int(cap * _BYTES_PER_SECOND) + _BYTES_PER_SECOND, "decode")
    audio = DecodedAudio(pcm)
    if audio.duration > limits.max_seconds:
        raise _too_long(limits, f"more than {limits.max_seconds:g} s")
    if len(pcm) < 2:
        raise InputError("audio_file contains no audio samples", reason="InvalidAudio")
    return audio
