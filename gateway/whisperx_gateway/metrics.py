"""The gateway's Prometheus metrics (GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from whisperx_api.metrics import Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(
        self, waiting: Callable[[], float], backend: Callable[[], list[str]] = list
    ) -> None:
        self.backend = backend
        self.requests = Counter(
            "whisperx_gateway_requests_total",
            "HTTP requests by route, method and status",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "whisperx_gateway_request_seconds",
            "HTTP request latency by route",
            ("route", "method"),
        )
        self.created = Counter(
            "whisperx_gateway_predictions_created_total",
            "Predictions created by model name",
            ("model",),
        )
        self.rejected = Counter(
            "whisperx_gateway_overload_rejections_total",
            "Requests refused because the gateway was at its concurrency limit",
        )
        self.waiting = Gauge(
            "whisperx_gateway_waiting_requests", "Requests held open by Prefer: wait", waiting
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.created, self.rejected, self.waiting):
            lines += metric.render()
        lines += self.backend()
        return "\n".join(lines) + "\n"
