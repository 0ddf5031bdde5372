"""Prometheus metrics in the text exposition format: counters, gauges, histograms.

Small on purpose (no client library): the gateway's hot path adds two dict updates.
Shared by the gateway, local mode's runners and the operator's warm runners.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: defaultdict[LabelValues, float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for values, count in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, values)} {count}")
        return lines


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {self.read()}",
        ]


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        self.counts: dict[LabelValues, list[int]] = {}
        self.sums: defaultdict[LabelValues, float] = defaultdict(float)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for values, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                labels = _labels(self.label_names, values, f'le="{le}"')
                lines.append(f"{self.name}_bucket{labels} {cumulative}")
            labels = _labels(self.label_names, values)
            lines.append(f"{self.name}_sum{labels} {self.sums[values]}")
            lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


class RunnerMetrics:
    """Warm runners, in local mode (prefix whisperx_local) and on a cluster
    (whisperx_operator): starts cold and warm, time queued, set-up time, runners busy
    and idle."""

    def __init__(self, prefix: str, busy: Callable[[], float], idle: Callable[[], float]) -> None:
        self.starts = Counter(
            f"{prefix}_prediction_starts_total",
            "Predictions started, on a runner's first prediction (cold) or a later one (warm)",
            ("start",),
        )
        self.queued = Histogram(f"{prefix}_queued_seconds", "Time a prediction waited for a runner")
        self.setup = Histogram(
            f"{prefix}_runner_setup_seconds",
            "A runner's cold start: imports and model load",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        )
        self.busy = Gauge(f"{prefix}_runners_busy", "Runners holding a prediction", busy)
        self.idle = Gauge(f"{prefix}_runners_idle", "Runners waiting for work", idle)

    def render(self) -> list[str]:
        lines: list[str] = []
        for metric in (self.starts, self.queued, self.setup, self.busy, self.idle):
            lines += metric.render()
        return lines
