"""Hostile `audio_file` contents: only real audio containers are decoded, within bounds.

Each file here is something a client can send as a data URI. The secret file stands for
a file of the runner's host (a mounted Secret, another prediction's input): no input may
make ffmpeg open it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.runner.conftest import ReportServer
from tests.runner.test_runner_inputs import run_prediction
from whisperx_runner import audio
from whisperx_runner.audio import DecodeLimits, Probe, decode_audio, looks_like_mov, probe_audio
from whisperx_runner.config import RunnerConfig
from whisperx_runner.errors import InputError


def tone(path: Path, seconds: float = 2.0) -> Path:
    """A real audio file of any container ffmpeg writes (by the file's suffix)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"sine=f=440:d={seconds}", str(path)],
        check=True,
    )  # fmt: skip
    return path


def wav_header(rate: int, channels: int, data: bytes) -> bytes:
    """A PCM WAV whose header says what the caller wants, true or not."""
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tone(tmp_path_factory.mktemp("host") / "secret.mp3")


def playlists(secret: Path) -> dict[str, bytes]:
    """Inputs that name another file for ffmpeg to open."""
    uri = secret.as_uri()
    hls = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{uri}\n#EXT-X-ENDLIST\n"
    mpd = (
        '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011" '
        'mediaPresentationDuration="PT2S"><Period><AdaptationSet mimeType="audio/mpeg">'
        f'<Representation id="a" bandwidth="1"><BaseURL>{uri}</BaseURL></Representation>'
        "</AdaptationSet></Period></MPD>\n"
    )
    return {
        "hls": hls.encode(),
        "hls-bom-and-blank-lines": b"\xef\xbb\xbf\n\n" + hls.encode(),
        "hls-ts-segment": hls.replace(".mp3", ".ts").encode(),
        "dash": mpd.encode(),
        "dash-xml-prolog": b'<?xml version="1.0"?>\n' + mpd.encode(),
        "concat": f"ffconcat version 1.0\nfile '{secret}'\n".encode(),
        "concat-no-header": f"file '{secret}'\n".encode(),
        "sdp-rtp": b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\n"
        b"t=0 0\r\nm=audio 5004 RTP/AVP 0\r\n",
        "srt-subtitles": f"1\n00:00:00,000 --> 00:00:02,000\n{uri}\n".encode(),
        "ass-subtitles": b"[Script Info]\nScriptType: v4.00+\n\n[Events]\nFormat: Layer, "
        b"Start, End, Style, Text\nDialogue: 0,0:00:00.00,0:00:02.00,Default,{\\fn"
        + str(secret).encode()
        + b"}x\n",
    }


def archives(secret: Path) -> dict[str, bytes]:
    """Real audio inside an archive is still not audio."""
    data = secret.read_bytes()
    zipped, tarred = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.mp3", data)
    with tarfile.open(fileobj=tarred, mode="w") as archive:
        info = tarfile.TarInfo("a.mp3")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return {"zip": zipped.getvalue(), "tar": tarred.getvalue(), "gzip": gzip.compress(data)}


CASES = ["hls", "hls-bom-and-blank-lines", "hls-ts-segment", "dash", "dash-xml-prolog",
         "concat", "concat-no-header", "sdp-rtp", "srt-subtitles", "ass-subtitles"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
async def test_inputs_that_open_other_inputs_are_refused(
    tmp_path: Path, secret: Path, case: str
) -> None:
    path = tmp_path / "audio"
    path.write_bytes(playlists(secret)[case])
    with pytest.raises(InputError) as caught:
        await decode_audio(path)
    assert caught.value.reason == "InvalidAudio" and caught.value.exit_code == 2
    assert str(tmp_path) not in str(caught.value)


@pytest.mark.parametrize("case", ["hls", "dash", "concat"])
async def test_the_format_allow_list_holds_without_the_sniffing(
    tmp_path: Path, secret: Path, case: str
) -> None:
    """The first-bytes check only names the kind; ffmpeg itself refuses the demuxer."""
    path = tmp_path / "audio"
    path.write_bytes(playlists(secret)[case])
    with pytest.raises(InputError, match="not in an audio container"):
        await probe_audio(path, DecodeLimits())


@pytest.mark.parametrize("case", ["zip", "tar", "gzip"])
async def test_archives_are_refused_by_name(tmp_path: Path, secret: Path, case: str) -> None:
    path = tmp_path / "audio"
    path.write_bytes(archives(secret)[case])
    with pytest.raises(InputError, match=f"is a {case} archive, not audio"):
        await decode_audio(path)


@pytest.mark.parametrize("suffix", ["wav", "mp3", "flac", "ogg", "m4a", "webm", "mp4", "aac"])
async def test_real_audio_containers_decode(tmp_path: Path, suffix: str) -> None:
    decoded = await decode_audio(tone(tmp_path / f"a.{suffix}"))
    assert 1.9 < decoded.duration < 2.2


async def test_a_sample_rate_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # 20 KB claiming 1 Hz: 10,000 s of audio, 320 MB once resampled to 16 kHz.
    path = tmp_path / "audio"
    path.write_bytes(wav_header(1, 1, b"\x01\x02" * 10_000))
    with pytest.raises(InputError, match=r"10000 s long; the limit is 3600 s") as caught:
        await decode_audio(path, DecodeLimits(max_seconds=3600))
    assert caught.value.reason == "AudioTooLong"


async def test_decoding_stops_at_the_limit_when_the_probe_knows_no_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unknown_length(path: Path, limits: DecodeLimits) -> Probe:
        return Probe("wav", None, 1)

    monkeypatch.setattr(audio, "probe_audio", unknown_length)
    path = tone(tmp_path / "a.wav", seconds=5)
    with pytest.raises(InputError, match=r"more than 2 s long; the limit is 2 s"):
        await decode_audio(path, DecodeLimits(max_seconds=2))


async def test_huge_channel_counts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audio"
    path.write_bytes(wav_header(16_000, 500, b"\0" * 1_000_000))
    with pytest.raises(InputError, match="500 audio channels; at most 64"):
        await decode_audio(path)


async def test_ffmpeg_runs_under_the_memory_limit(tmp_path: Path) -> None:
    path = tone(tmp_path / "a.mp3")
    await decode_audio(path, DecodeLimits(memory_bytes=1 << 30))
    with pytest.raises(InputError):  # too little address space even to load its libraries
        await decode_audio(path, DecodeLimits(memory_bytes=64 << 20))


@pytest.mark.parametrize(
    ("name", "cut"),
    [("zero-length", 0), ("wav-header-only", 30), ("mp4-without-its-index", 200)],
)
async def test_truncated_files_are_input_errors(tmp_path: Path, name: str, cut: int) -> None:
    source = tone(tmp_path / ("a.wav" if name.startswith(("zero", "wav")) else "a.mp4"))
    path = tmp_path / "audio"
    path.write_bytes(source.read_bytes()[:cut])
    with pytest.raises(InputError) as caught:
        await decode_audio(path)
    assert caught.value.reason == "InvalidAudio"


def test_limits_come_from_the_environment() -> None:
    config = RunnerConfig.from_env(
        {"WHISPERX_MAX_AUDIO_SECONDS": "60", "WHISPERX_DECODE_MEMORY_BYTES": str(512 << 20)}
    )
    assert config.decode == DecodeLimits(max_seconds=60, memory_bytes=512 << 20)


async def test_a_playlist_data_uri_fails_the_prediction_as_invalid_input(
    tmp_path: Path, report_server: ReportServer, secret: Path
) -> None:
    payload = base64.b64encode(playlists(secret)["hls"]).decode()
    inp = {"audio_file": f"data:audio/mpeg;base64,{payload}"}
    code, _, _ = await run_prediction(tmp_path, report_server, inp)
    done = report_server.completed()
    assert (code, done["status"], done["reason"]) == (2, "failed", "InvalidAudio")
    assert "HLS playlist" in done["error"] and "output" not in done
    assert json.dumps(done).count(str(secret)) == 0


def video_only(path: Path) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=duration=1:size=32x32:rate=5", str(path)],
        check=True,
    )  # fmt: skip
    return path


async def test_a_container_without_audio_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="contains no audio stream"):
        await decode_audio(video_only(tmp_path / "video.mkv"))


def _boxes(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """The ISO media boxes between start and end: type -> (offset, size)."""
    found = {}
    while start < end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        found[kind] = (start, size)
        start += size
    return found


def external_samples(own: bytes, sibling: str) -> bytes:
    """`own` (a mov whose index follows its samples) with its samples zeroed and its
    track's data reference pointing at the file `sibling` beside it: a Mac alias record
    (QuickTime's `alis`), one level up and one down, as ffmpeg's mov demuxer reads it."""
    mdat, size = _boxes(own, 0, len(own))[b"mdat"]
    own = own[: mdat + 8] + bytes(size - 8) + own[mdat + size :]
    chain, start, end = [], 0, len(own)
    for kind in (b"moov", b"trak", b"mdia", b"minf", b"dinf", b"dref"):
        offset, size = _boxes(own, start, end)[kind]
        chain.append((offset, size))
        start, end = offset + 8, offset + size
    name = sibling.encode()
    record = bytes(10 + 1 + 27 + 12) + bytes([len(name)]) + name.ljust(63, b"\0")
    record += bytes(16) + struct.pack(">HH", 1, 1) + bytes(16)  # levels up, down
    path = b"/host/" + name + b"\0" * (len(name) % 2)
    record += struct.pack(">HH", 2, len(path)) + path + struct.pack(">hH", -1, 0)
    alis = struct.pack(">I4sI", 12 + len(record), b"alis", 0) + record
    dref = struct.pack(">I4sII", 16 + len(alis), b"dref", 0, 1) + alis
    offset, size = chain[-1]
    out = bytearray(own[:offset] + dref + own[offset + size :])
    for parent, parent_size in chain[:-1]:
        struct.pack_into(">I", out, parent, parent_size + len(dref) - size)
    return bytes(out)


async def test_a_mov_data_reference_to_another_file_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mov/mp4 is an allowed container, and a track's samples may live in another file
    (a data reference): the runner's ffmpeg never opens it, even where data references
    were on by default (here, tools that turn them on before the runner's options)."""
    secret = tone(tmp_path / "secret.mov").read_bytes()  # beside the input, as in /tmp
    path = tmp_path / "audio"
    path.write_bytes(external_samples(tone(tmp_path / "own.mov").read_bytes(), "secret.mov"))
    assert looks_like_mov(secret) and looks_like_mov(path.read_bytes())
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("ffmpeg", "ffprobe"):
        real = shutil.which(name)
        (tools / name).write_text(f'#!/bin/sh\nexec {real} -enable_drefs 1 "$@"\n')
        (tools / name).chmod(0o755)
    # The file is hostile: with data references on, ffmpeg reads the secret's tone.
    command = [str(tools / "ffmpeg"), "-nostdin", "-loglevel", "error",
               "-i", f"file:{path}", "-f", "s16le", "-"]  # fmt: skip
    run = await asyncio.to_thread(subprocess.run, command, capture_output=True, check=True)
    followed = run.stdout
    assert any(struct.unpack(f"<{len(followed) // 2}h", followed))
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    with pytest.raises(InputError, match="no audio samples"):
        await decode_audio(path)
