"""SRT, WebVTT and plain-text renderings of a prediction's output segments.

Pure functions of the one output schema, shared by the runner's standalone `transcribe`
and the gateway. A segment's speaker (present when diarization ran) is shown as
`[SPEAKER_00]: ` in SRT and text (whisperx's own writers do the same) and as a WebVTT
voice span `<v SPEAKER_00>`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from whisperx_api.schema import PredictionOutput, Segment

Format = Literal["json", "srt", "vtt", "txt"]
FORMATS: tuple[Format, ...] = ("json", "srt", "vtt", "txt")
MEDIA_TYPES: dict[Format, str] = {
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
}


def timestamp(seconds: float, separator: str = ".") -> str:
    """`HH:MM:SS.mmm` (WebVTT) or, with separator ",", `HH:MM:SS,mmm` (SRT)."""
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0.0
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _one_line(text: str) -> str:
    # A blank line ends a cue in both formats; cue text stays on one line.
    return " ".join(text.split())


def _cues(segments: Iterable[Segment]) -> Iterable[tuple[float, float, str, str | None]]:
    for segment in segments:
        text = _one_line(segment.text)
        if text:
            yield segment.start, max(segment.end, segment.start), text, segment.speaker


def to_srt(segments: Iterable[Segment]) -> str:
    blocks = []
    for index, (start, end, text, speaker) in enumerate(_cues(segments), start=1):
        label = f"[{speaker}]: " if speaker else ""
        blocks.append(
            f"{index}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{label}{text}\n"
        )
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(segments: Iterable[Segment]) -> str:
    blocks = ["WEBVTT\n"]
    for start, end, text, speaker in _cues(segments):
        body = _vtt_escape(text)
        if speaker:
            body = f"<v {_vtt_escape(speaker)}>{body}"
        blocks.append(f"{timestamp(start)} --> {timestamp(end)}\n{body}\n")
    return "\n".join(blocks)


def to_txt(segments: Iterable[Segment]) -> str:
    lines = []
    for _, _, text, speaker in _cues(segments):
        lines.append(f"[{speaker}]: {text}" if speaker else text)
    return "".join(f"{line}\n" for line in lines)


def render(output: PredictionOutput | Mapping[str, Any], fmt: Format) -> str:
    """The output in one format; `json` is the output itself, as compact JSON."""
    parsed = (
        output if isinstance(output, PredictionOutput) else PredictionOutput.model_validate(output)
    )
    if fmt == "json":
        return parsed.model_dump_json(exclude_unset=True) + "\n"
    if fmt == "srt":
        return to_srt(parsed.segments)
    if fmt == "vtt":
        return to_vtt(parsed.segments)
    if fmt == "txt":
        return to_txt(parsed.segments)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
