"""The gateway's pure parts, without a network: parsing, auth, cursors, models, OpenAPI."""

from __future__ import annotations

import dataclasses
import json
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from whisperx_api import lifecycle as lc
from whisperx_api.metrics import Counter, Histogram
from whisperx_api.netguard import HostAllowList
from whisperx_api.records import PredictionRecord, to_replicate
from whisperx_api.schema import input_json_schema
from whisperx_api.store import RawPredictionView
from whisperx_gateway.auth import TokenConfigError, TokenMap, parse_authorization
from whisperx_gateway.config import ConfigError, GatewayConfig
from whisperx_gateway.errors import ApiError
from whisperx_gateway.local_backend import default_concurrency
from whisperx_gateway.local_runners import exit_message
from whisperx_gateway.models import ModelCatalog, ModelConfigError, schema_version_id
from whisperx_gateway.openapi import gateway_openapi, model_openapi
from whisperx_gateway.parsing import (
    Cursor,
    new_prediction_id,
    page_links,
    parse_cancel_after,
    parse_create_body,
    parse_json_body,
    parse_prefer_wait,
    valid_prediction_id,
    webhook_url_problem,
)
from whisperx_gateway.rendering import Renderer

AUDIO = "https://example.com/a.wav"


def api_error(call: object, *args: object, **kwargs: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# --- auth ---


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc123", "abc123"),
        ("bearer abc123", "abc123"),
        ("Token abc123", "abc123"),  # Replicate's legacy scheme
        ("  Bearer   abc123 ", "abc123"),
        ("Basic abc123", None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_authorization(header: str | None, token: str | None) -> None:
    assert parse_authorization(header) == token


def test_token_map_sources_and_lookup(tmp_path: Path) -> None:
    tokens = TokenMap.parse_env("secret-one-111=team-a, secret-two-222=team-b")
    assert tokens.namespace_for("secret-one-111") == "team-a"
    assert tokens.namespace_for("secret-two-222") == "team-b"
    assert tokens.namespace_for("secret-one-11") is None
    path = tmp_path / "tokens.yaml"
    path.write_text("secret-three-3: team-c\n")
    assert TokenMap.load_file(path).namespace_for("secret-three-3") == "team-c"


@pytest.mark.parametrize(
    "text", ["short=ns", "long-enough-token=Not_A_Namespace", "no-separator", "=ns"]
)
def test_token_map_rejects_bad_entries(text: str) -> None:
    with pytest.raises(TokenConfigError):
        TokenMap.parse_env(text)


def test_gateway_config_needs_tokens_and_reads_env() -> None:
    with pytest.raises(ConfigError):
        GatewayConfig.from_env({})
    config = GatewayConfig.from_env(
        {
            "WHISPERX_TOKENS": "secret-one-111=team-a",
            "WHISPERX_MODELS": "fast=cpu-small",
            "WHISPERX_PUBLIC_URL": "https://api.example.com/",
            "WHISPERX_METRICS": "off",
        }
    )
    assert config.public_url == "https://api.example.com"
    assert config.metrics is False
    assert config.models.get("anyone", "fast") is not None
    assert config.models.get("anyone", "whisperx") is None
    with pytest.raises(ConfigError):
        GatewayConfig.from_env({"WHISPERX_TOKENS": "secret-one-111=a", "WHISPERX_METRICS": "x"})


# --- ids ---


def test_prediction_ids_are_replicate_like_and_valid_kubernetes_names() -> None:
    ids = {new_prediction_id() for _ in range(1000)}
    assert len(ids) == 1000
    for prediction_id in ids:
        assert len(prediction_id) == 26
        assert valid_prediction_id(prediction_id)
    later = [new_prediction_id(now=1_800_000_000 + i / 1000) for i in range(50)]
    assert later == sorted(later), "ids sort by creation time, to the millisecond"
    assert not valid_prediction_id("UPPER")
    assert not valid_prediction_id("a:b")
    assert not valid_prediction_id("-a")
    assert not valid_prediction_id("a" * 254)


# --- headers ---


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("return=minimal", None),
        ("wait", 60),
        ("wait=5", 5),
        ("respond-async, wait=3", 3),
        ("Wait = 7", 7),
        ("wait=600", 60),  # shortened to the gateway's limit
    ],
)
def test_prefer_wait(header: str | None, seconds: int | None) -> None:
    assert parse_prefer_wait(header) == seconds


@pytest.mark.parametrize("header", ["wait=0", "wait=abc", "wait=-1", "wait=1.5"])
def test_prefer_wait_rejects_nonsense(header: str) -> None:
    error = api_error(parse_prefer_wait, header)
    assert error.status == 400 and "Prefer" in error.detail


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("300", 300), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1500ms", 2)],
)
def test_cancel_after(header: str | None, seconds: int | None) -> None:
    assert parse_cancel_after(header) == seconds


@pytest.mark.parametrize("header", ["", "abc", "5x", "0", "0s", "1h 30m", "m5", "30d"])
def test_cancel_after_rejects_nonsense(header: str) -> None:
    error = api_error(parse_cancel_after, header)
    assert error.status == 400 and "Cancel-After" in error.detail


# --- create bodies ---


def test_create_body_splits_secrets_and_keeps_what_was_given() -> None:
    parsed = parse_create_body(
        {
            "version": "whisperx",
            "input": {"audio_file": AUDIO, "batch_size": 8, "huggingface_access_token": "hf_x"},
            "webhook": "https://example.com/hook",
            "webhook_events_filter": ["completed", "start", "completed"],
        },
        version_required=True,
    )
    assert parsed.input == {"audio_file": AUDIO, "batch_size": 8}
    assert parsed.secrets == {"huggingface_access_token": "hf_x"}
    assert parsed.webhook_events_filter == ("completed", "start")


def test_create_body_defaults_and_legacy_webhook_completed() -> None:
    parsed = parse_create_body(
        {"input": {"audio_file": AUDIO}, "webhook_completed": "http://example.com/done"},
        version_required=False,
    )
    assert parsed.webhook == "http://example.com/done"
    assert parsed.webhook_events_filter == ("completed",)
    plain = parse_create_body({"input": {"audio_file": AUDIO}}, version_required=False)
    assert plain.webhook is None and plain.webhook_events_filter == (
        "start",
        "output",
        "logs",
        "completed",
    )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"version": "v", "input": {}}, "input.audio_file"),
        ({"version": "v", "input": {"audio_file": "ftp://x"}}, "input.audio_file"),
        ({"version": "v", "input": {"audio_file": AUDIO, "colour": 1}}, "input.colour"),
        ({"version": "v", "input": {"audio_file": AUDIO, "batch_size": "x"}}, "input.batch_size"),
        ({"version": "v", "input": {"audio_file": AUDIO, "language": "xx"}}, "input.language"),
        ({"version": "v", "input": "nope"}, "input"),
        ({"version": "v"}, "input"),
        ({"version": "v", "input": {"audio_file": AUDIO}, "webhook": "nope"}, "webhook"),
        (
            {"version": "v", "input": {"audio_file": AUDIO}, "webhook_events_filter": ["x"]},
            "webhook_events_filter",
        ),
        ({"version": "v", "input": {"audio_file": AUDIO}, "extra": 1}, "extra"),
        ({"version": 3, "input": {"audio_file": AUDIO}}, "version"),
        ({"input": {"audio_file": AUDIO}}, "version"),
    ],
)
def test_create_body_errors_name_the_field(body: dict[str, object], names: str) -> None:
    error = api_error(parse_create_body, body, version_required=True)
    assert error.status == 422
    assert error.detail.startswith(names) or f"; {names}" in error.detail, error.detail


def test_create_body_must_be_an_object() -> None:
    assert api_error(parse_create_body, [1], version_required=True).status == 422


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b"\xff", b"{'a': 1}"])
def test_json_body_errors(raw: bytes) -> None:
    error = api_error(parse_json_body, raw)
    assert error.status == 400 and "JSON" in error.detail


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.example.com/a?b=c", None),
        ("http://127.0.0.1:8000/hook", "'127.0.0.1' is a loopback address; refused"),
        ("http://[::1]/hook", "'::1' is a loopback address"),
        ("http://localhost:6379/", "'localhost' is a loopback address"),
        ("http://app.localhost/", "'app.localhost' is a loopback address"),
        ("http://0.0.0.0:8000/", "'0.0.0.0' is an unspecified address"),
        ("http://10.1.2.3/", "'10.1.2.3' is a private address"),
        ("http://[::ffff:192.168.1.1]/", "private address"),
        ("http://169.254.169.254/latest", "link-local (cloud metadata)"),
        ("http://93.184.215.14/hook", None),
        ("http://user:pass@example.com/", None),
        ("http://0/", "not a valid IP address"),
        ("http://1.2.3/", "not a valid IP address"),
        ("https://-bad-/", "not a valid host name"),
        ("https://a|b/", "not a valid host name"),
        ("https://bücher.example/", "ASCII"),
        ("http://\udbcd:x@example.com/", "ASCII"),
        ("http://a b/", "ASCII"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_webhook_urls_must_be_deliverable_and_public(url: str, problem: str | None) -> None:
    found = webhook_url_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)
    if problem is not None:
        body = {"version": "v", "input": {"audio_file": AUDIO}, "webhook": url}
        assert api_error(parse_create_body, body, version_required=True).detail.startswith(
            "webhook: "
        )


def test_webhook_allow_list_admits_internal_hosts() -> None:
    allow = HostAllowList.parse("127.0.0.1 localhost 10.0.0.0/8")
    for url in ("http://127.0.0.1:9/", "http://localhost/", "http://10.9.9.9/"):
        assert webhook_url_problem(url, allow) is None
    body = {"version": "v", "input": {"audio_file": AUDIO}, "webhook": "http://10.9.9.9/"}
    assert parse_create_body(body, version_required=True, webhook_allow=allow).webhook
    assert webhook_url_problem("http://192.168.0.1/", allow) is not None


# --- cursors ---


def test_cursor_round_trip_and_tampering() -> None:
    cursor = Cursor(older=True, score=1767225600.123456, id="abc")
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ["", "!!!", "e30", Cursor(True, 1.0, "UPPER").encode()]:
        assert api_error(Cursor.decode, bad).status == 400


def test_cursor_orders_ties_by_id() -> None:
    older = Cursor(older=True, score=10.0, id="m")
    assert older.admits(9.0, "z") and older.admits(10.0, "a")
    assert not older.admits(10.0, "m") and not older.admits(10.0, "z")
    newer = Cursor(older=False, score=10.0, id="m")
    assert newer.admits(10.0, "z") and newer.admits(11.0, "a")
    assert not newer.admits(10.0, "a")


def test_page_links() -> None:
    rows = [("c", 3.0), ("b", 2.0)]
    first = page_links(rows, None, has_more=True)
    assert first.previous is None and first.next == Cursor(True, 2.0, "b")
    assert page_links(rows, None, has_more=False).next is None
    older = page_links(rows, Cursor(True, 4.0, "d"), has_more=False)
    assert older.next is None and older.previous == Cursor(False, 3.0, "c")
    newer = page_links(rows, Cursor(False, 1.0, "a"), has_more=False)
    assert newer.previous is None and newer.next == Cursor(True, 2.0, "b")
    assert page_links([], None, has_more=False).next is None


# --- models ---


def test_model_catalog_defaults_map_the_original_models() -> None:
    catalog = ModelCatalog.parse("whisperx=whisperx,whisperx-a40-large=a40,acme/private=a100")
    model = catalog.get("victor-upmeet", "whisperx-a40-large")
    assert model is not None and model.hardware == "a40"
    assert model.full_name == "victor-upmeet/whisperx-a40-large"
    assert model.version == schema_version_id("whisperx-a40-large")
    assert len(model.version) == 64
    assert catalog.get("acme", "private") is not None
    assert catalog.get("other", "private") is None
    assert catalog.get("acme", "unknown") is None


def test_model_catalog_resolves_versions() -> None:
    catalog = ModelCatalog({"whisperx": "whisperx", "whisperx-a100-80gb": "a100"})
    a100 = catalog.get("whisperx", "whisperx-a100-80gb")
    assert a100 is not None
    assert catalog.by_version(a100.version) == a100
    assert catalog.by_version("whisperx-a100-80gb") == a100
    assert catalog.by_version(f"whisperx/whisperx-a100-80gb:{a100.version}") == a100
    assert catalog.by_version("whisperx/whisperx-a100-80gb:" + "0" * 64) is None
    assert catalog.by_version("0" * 64) is None
    assert catalog.by_version("nope") is None
    assert {m.name for m in catalog.all()} == {"whisperx", "whisperx-a100-80gb"}


@pytest.mark.parametrize("text", ["", "name", "Bad Name=x", "ok=Bad_Profile"])
def test_model_catalog_rejects_bad_configuration(text: str) -> None:
    with pytest.raises(ModelConfigError):
        ModelCatalog.parse(text)


# --- OpenAPI ---


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_documents_every_route_from_the_one_schema() -> None:
    doc = gateway_openapi(metrics=True)
    schemas = doc["components"]["schemas"]
    assert schemas["Input"]["properties"] == input_json_schema()["properties"]
    assert {"Segment", "Word", "Output", "Prediction", "Problem"} <= set(schemas)
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas
    assert set(doc["paths"]) >= {
        "/v1/predictions",
        "/v1/predictions/{prediction_id}",
        "/v1/predictions/{prediction_id}/cancel",
        "/v1/models/{model_owner}/{model_name}",
        "/v1/models/{model_owner}/{model_name}/predictions",
        "/v1/models/{model_owner}/{model_name}/versions/{version_id}",
        "/v1/webhooks/default/secret",
        "/metrics",
    }
    assert "/metrics" not in gateway_openapi(metrics=False)["paths"]
    json.dumps(doc)  # serializable as is


def test_model_openapi_has_cog_components() -> None:
    components = model_openapi("whisperx/whisperx")["components"]["schemas"]
    assert components["Input"]["required"] == ["audio_file"]
    assert components["Output"]["properties"]["segments"]["items"] == {
        "$ref": "#/components/schemas/Segment"
    }


# --- metrics ---


def test_metrics_text_format() -> None:
    counter = Counter("c_total", "help", ("route",))
    counter.inc('/a"b')
    counter.inc('/a"b')
    assert 'c_total{route="/a\\"b"} 2.0' in counter.render()
    histogram = Histogram("h_seconds", "help", ("route",), buckets=(0.1, 1.0))
    histogram.observe(0.05, "/x")
    histogram.observe(5.0, "/x")
    lines = histogram.render()
    assert 'h_seconds_bucket{route="/x",le="0.1"} 1' in lines
    assert 'h_seconds_bucket{route="/x",le="1.0"} 1' in lines
    assert 'h_seconds_bucket{route="/x",le="+Inf"} 2' in lines
    assert 'h_seconds_count{route="/x"} 2' in lines


# --- local mode ---


def test_exit_messages_say_why_a_runner_stopped() -> None:
    assert "without reporting" in exit_message(0)
    assert exit_message(3) == "the runner exited with code 3"
    assert "SIGKILL (out of memory?)" in exit_message(-signal.SIGKILL)
    assert "SIGTERM" in exit_message(-signal.SIGTERM)


def test_default_concurrency_is_at_least_one() -> None:
    assert default_concurrency() >= 1


# --- rendering ---


def _finished_record(**fields: object) -> PredictionRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    state = lc.PredictionState()
    for event in (
        lc.Created(at=at),
        lc.Started(at=at),
        lc.Completed(status=lc.Phase.SUCCEEDED, at=at, predict_time=1.0),
    ):
        state = lc.apply(state, event).state
    record = PredictionRecord(id="p1", namespace="ns", input={"audio_file": AUDIO}, state=state)
    return dataclasses.replace(record, **fields)  # type: ignore[arg-type]


def test_rendering_splices_the_stored_output_into_replicates_object() -> None:
    record = _finished_record()
    segment = {"start": 0.0, "end": 1.0, "text": 'hi "there"'}
    output = {"segments": [segment], "detected_language": "en"}
    view = RawPredictionView(json.dumps(record.to_json()), json.dumps(output), "log\n")
    renderer = Renderer()
    text = renderer.render(view, "http://gw")
    assert json.loads(text) == to_replicate(record, output, "log\n", "http://gw")
    assert json.loads(renderer.render(view, "http://gw", "starting"))["status"] == "starting"
    removed = _finished_record(data_removed=True)
    gone = RawPredictionView(json.dumps(removed.to_json()), json.dumps(output), "")
    assert json.loads(renderer.render(gone, "http://gw"))["output"] is None
    fresh = RawPredictionView.of(record, None, "")
    assert json.loads(renderer.render(fresh, "http://gw"))["output"] is None


def test_rendering_reuses_only_identical_records_and_stays_bounded_by_size() -> None:
    record = _finished_record()
    raw = json.dumps(record.to_json())
    one = len(Renderer().render(RawPredictionView(raw, None, "a"), "http://gw"))
    # Room for eight renderings of this size, not nine.
    renderer = Renderer(max_chars=8 * one + 20)
    first = renderer.render(RawPredictionView(raw, None, "a"), "http://gw")
    assert renderer.render(RawPredictionView(raw, None, "a"), "http://gw") == first
    assert len(renderer._heads) == 1
    changed = renderer.render(RawPredictionView(raw, None, "b"), "http://gw")
    assert json.loads(changed)["logs"] == "b"
    renderer.render(RawPredictionView(raw, None, "b"), "http://other")
    assert len(renderer._heads) == 3
    for logs in "cdefghij":
        renderer.render(RawPredictionView(raw, None, logs), "http://gw")
    assert len(renderer._heads) == 8
    assert renderer.kept_chars <= 8 * one + 20


def test_a_large_rendering_is_not_kept() -> None:
    # A megabyte of data URI in the input: answered every time, never held.
    record = dataclasses.replace(_finished_record(), input={"audio_file": "data:," + "a" * 2**20})
    raw = json.dumps(record.to_json())
    renderer = Renderer(max_chars=4 * 2**20)
    text = renderer.render(RawPredictionView(raw, None, ""), "http://gw")
    assert json.loads(text)["input"]["audio_file"].startswith("data:,aaa")
    assert renderer.kept_chars == 0


def test_uploaded_file_links_are_routed_to_the_internal_url() -> None:
    from whisperx_gateway.parsing import route_uploaded_files

    public, internal = "https://whisper.example.com", "http://whisperx-gateway.svc:8000"
    uploaded = {"audio_file": f"{public}/v1/files/abc/download?expiry=1&sig=x", "debug": True}
    routed = route_uploaded_files(uploaded, public, internal)
    assert routed == {
        "audio_file": f"{internal}/v1/files/abc/download?expiry=1&sig=x",
        "debug": True,
    }
    elsewhere = {"audio_file": "https://cdn.example.com/v1/files/abc"}
    assert route_uploaded_files(elsewhere, public, internal) == elsewhere
    assert route_uploaded_files(uploaded, public, None) == uploaded
