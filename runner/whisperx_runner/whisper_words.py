"""Word timestamps from Whisper itself, for `align_output` without a wav2vec2 model.

WhisperX gets word timings from a wav2vec2 CTC alignment model per language; where none
is installed (offline, local mode) the runner falls back to faster-whisper's own word
timestamps: dynamic time warping over the cross-attention of Whisper's alignment heads.

They are computed during transcription, at almost no cost: `WhisperWordTimestamps`
hooks one `FasterWhisperPipeline.transcribe` call and, after each batch is decoded, runs
faster-whisper's `add_word_timestamps` on the encoder output that batch has just
computed and the tokens of its text. That is one teacher-forced decoder pass over the
text and the DTW: no second encoding and no second decoding of the audio.

Each transcribed segment (a VAD chunk of up to 30 s) then becomes sentence segments
with `words: [{word, start, end, score}]` (score: Whisper's word probability), the
shape whisperx's alignment gives: the words are the segment's text split at spaces, and
`assign_word_speakers` works on them. Word edges that DTW lets run into a pause are cut
back to the speech regions the VAD found.

The ML stack is only touched through the pipeline object handed in.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

SAMPLE_RATE = 16_000
FRAMES_PER_SECOND = 100  # Whisper's mel frames (hop of 160 samples)
WINDOW_FRAMES = 3000  # 30 s

SpanFn = Callable[[str], Sequence[tuple[int, int]]]
Region = tuple[float, float]


@dataclass(frozen=True)
class TimedWord:
    text: str  # as Whisper decoded it: with its leading space, punctuation attached
    start: float
    end: float
    probability: float


@dataclass
class Chunk:
    """One transcribed segment: the audio slice whisperx decoded, with VAD regions."""

    start: float
    end: float
    speech: tuple[Region, ...] = ()
    words: list[TimedWord] | None = None


# --- pure logic -------------------------------------------------------------------------


def _region_at(regions: Sequence[Region], t: float) -> int:
    """Index of the last region starting at or before `t` (-1 if none)."""
    return bisect.bisect_right([r[0] for r in regions], t) - 1


def fit_to_speech(start: float, end: float, regions: Sequence[Region]) -> Region:
    """A word's edges moved out of the pauses the VAD found around it.

    Cross-attention DTW often stretches the last word before a pause into the silence
    and starts the first word after it early. An end inside a pause that follows the
    word's region is cut back to that region's end; a start inside a pause moves to the
    next region's start when the word ends there. Words that lie wholly in a pause or
    that span regions are left as they are.
    """
    if not regions:
        return start, end
    i = _region_at(regions, start)
    if (i < 0 or start > regions[i][1]) and i + 1 < len(regions):
        following = regions[i + 1]
        if end > following[0]:
            start = following[0]
            i += 1
    if i >= 0 and regions[i][0] <= start <= regions[i][1] < end:
        following_start = regions[i + 1][0] if i + 1 < len(regions) else math.inf
        if end <= following_start:
            end = regions[i][1]
    return start, end


def place_words(
    words: Sequence[TimedWord], lower: float, upper: float, speech: Sequence[Region] = ()
) -> list[TimedWord]:
    """Words with text, fitted to the speech regions, inside [lower, upper], in order
    without overlap, times rounded to milliseconds as whisperx's alignment does."""
    placed: list[TimedWord] = []
    previous_end = lower
    for word in words:
        if not word.text.strip():
            continue
        start, end = fit_to_speech(word.start, word.end, speech)
        start = round(min(max(start, previous_end, lower), upper), 3)
        end = round(min(max(end, start), upper), 3)
        placed.append(TimedWord(word.text, start, end, word.probability))
        previous_end = end
    return placed


def sentence_segments(
    text: str,
    words: Sequence[TimedWord],
    spans: Sequence[tuple[int, int]] | None,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]] | None:
    """Whisperx's aligned shape: one segment per sentence span (whisperx splits with
    NLTK's punkt too), `words: [{word, start, end, score}]`, start and end from its words.

    `words` must be the text cut into pieces (Whisper's words concatenate to the text
    they were decoded from); None when they do not, or when no word has text.
    """
    if "".join(w.text for w in words) != text:
        return None
    if not spans:
        spans = [(0, len(text))]
    span_starts = [s for s, _ in spans]
    groups: dict[int, list[TimedWord]] = {}
    offset = 0
    for word in words:
        first_char = offset + len(word.text) - len(word.text.lstrip())
        offset += len(word.text)
        if word.text.strip():
            index = max(0, bisect.bisect_right(span_starts, first_char) - 1)
            groups.setdefault(index, []).append(word)
    if not groups:
        return None
    segments: list[dict[str, Any]] = []
    orphans: list[str] = []  # sentence text without a word of its own (not seen in practice)
    for index, (span_start, span_end) in enumerate(spans):
        sentence = text[span_start:span_end]
        group = groups.get(index)
        if group is None:
            if segments:
                segments[-1]["text"] = f"{segments[-1]['text']} {sentence.strip()}"
            else:
                orphans.append(sentence.strip())
            continue
        if orphans:
            sentence = " ".join([*orphans, sentence.strip()])
            orphans = []
        segments.append(
            {
                "start": group[0].start,
                "end": group[-1].end,
                "text": sentence,
                "words": [
                    {
                        "word": w.text.strip(),
                        "start": w.start,
                        "end": w.end,
                        "score": round(w.probability, 3),
                    }
                    for w in group
                ],
                **(extra or {}),
            }
        )
    return segments


# --- hooking the whisperx pipeline ------------------------------------------------------

_MISSING = object()


@contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    """An instance attribute that shadows a method for the duration of the block."""
    saved = target.__dict__.get(name, _MISSING)
    setattr(target, name, value)
    try:
        yield
    finally:
        if saved is _MISSING:
            delattr(target, name)
        else:
            setattr(target, name, saved)


@dataclass
class WhisperWordTimestamps:
    """Word timings computed inside one `FasterWhisperPipeline.transcribe` call.

    The hooks (instance attributes, removed on exit) see, in order: the VAD chunks
    (`vad_model.merge_chunks`), each batch's encoder output (`model.encode`) and each
    batch's decoded text (`_forward`). whisperx decodes the chunks in order, one result
    per chunk, so the n-th text belongs to the n-th chunk and the n-th result segment.
    """

    chunks: list[Chunk] = field(default_factory=list)
    seconds: float = 0.0  # spent in the alignment pass
    error: str | None = None
    _next: int = 0
    _encoded: Any = None
    _last_speech: float = 0.0

    @contextmanager
    def hooked(self, pipeline: Any) -> Iterator[None]:
        whisper, vad = pipeline.model, pipeline.vad_model
        merge_chunks, encode, forward = vad.merge_chunks, whisper.encode, pipeline._forward

        def merge_chunks_hook(*args: Any, **kwargs: Any) -> Any:
            merged = merge_chunks(*args, **kwargs)
            self.chunks = [self._chunk(c) for c in merged]
            return merged

        def encode_hook(features: Any) -> Any:
            self._encoded = encode(features)
            return self._encoded

        def forward_hook(model_inputs: Any, **kwargs: Any) -> Any:
            self._encoded = None
            outputs = forward(model_inputs, **kwargs)
            try:
                self._add_words(pipeline, list(outputs["text"]))
            except Exception as exc:  # word timings are extra: the transcript stands
                self.error = self.error or f"{type(exc).__name__}: {exc}"
            finally:
                self._encoded = None
            return outputs

        with (
            _patched(vad, "merge_chunks", merge_chunks_hook),
            _patched(whisper, "encode", encode_hook),
            _patched(pipeline, "_forward", forward_hook),
        ):
            yield

    @staticmethod
    def _chunk(merged: dict[str, Any]) -> Chunk:
        # whisperx decodes audio[int(start * 16000) : int(end * 16000)]
        start = int(merged["start"] * SAMPLE_RATE) / SAMPLE_RATE
        end = int(merged["end"] * SAMPLE_RATE) / SAMPLE_RATE
        speech = tuple((float(a), float(b)) for a, b in merged.get("segments") or ())
        return Chunk(start, end, speech)

    def _add_words(self, pipeline: Any, texts: list[str]) -> None:
        chunks = self.chunks[self._next : self._next + len(texts)]
        self._next += len(texts)
        if self._encoded is None or len(chunks) != len(texts):
            raise RuntimeError("whisperx's batches no longer match its VAD chunks")
        tokenizer, options = pipeline.tokenizer, pipeline.options
        batch = [
            [
                {
                    "tokens": tokenizer.encode(text) if text.strip() else [],
                    "start": chunk.start,
                    "end": chunk.end,
                    # faster-whisper offsets the words by seek / frames per second
                    "seek": chunk.start * FRAMES_PER_SECOND,
                }
            ]
            for text, chunk in zip(texts, chunks, strict=True)
        ]
        frames = [
            min(WINDOW_FRAMES, math.ceil((c.end - c.start) * FRAMES_PER_SECOND)) for c in chunks
        ]
        started = time.perf_counter()
        last = pipeline.model.add_word_timestamps(
            batch,
            tokenizer,
            self._encoded,
            frames,
            options.prepend_punctuations,
            options.append_punctuations,
            self._last_speech,
        )
        self.seconds += time.perf_counter() - started
        if last is not None:
            self._last_speech = float(last)
        for chunk, item in zip(chunks, batch, strict=True):
            chunk.words = [
                TimedWord(
                    str(w["word"]), float(w["start"]), float(w["end"]), float(w["probability"])
                )
                for w in item[0].get("words", [])
            ]

    def segments(
        self, segments: Sequence[dict[str, Any]], duration: float, spans: SpanFn | None
    ) -> list[dict[str, Any]] | None:
        """The transcribed segments with words, split into sentences; None when the
        words do not match the segments (then the segments stand as they are)."""
        if self.error is not None or len(segments) != len(self.chunks):
            return None
        out: list[dict[str, Any]] = []
        for segment, chunk in zip(segments, self.chunks, strict=True):
            text = str(segment["text"])
            extra = {k: v for k, v in segment.items() if k == "avg_logprob"}
            words = chunk.words or []
            placed = place_words(
                words, max(0.0, chunk.start), min(duration, chunk.end), chunk.speech
            )
            # place_words drops pieces without text: keep them for the concatenation.
            pieces = iter(placed)
            full = [next(pieces) if w.text.strip() else w for w in words]
            sentences = sentence_segments(text, full, spans(text) if spans else None, extra)
            if sentences is None:
                out.append({**segment, "words": []})
            else:
                out.extend(sentences)
        return out
