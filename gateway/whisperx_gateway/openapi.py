"""OpenAPI documents built from the one schema (`whisperx_api.schema`).

`gateway_openapi()` is `/openapi.json`, the whole API; `model_openapi()` is a model
version's `openapi_schema` (Cog's shape: `components.schemas.Input` and `Output`).
"""

from __future__ import annotations

import copy
from typing import Any

from whisperx_api.lifecycle import Phase
from whisperx_api.schema import WEBHOOK_EVENTS, input_json_schema, output_json_schema

_REF_PREFIX = "#/components/schemas/"


def _lift_defs(schema: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """Moves pydantic's `$defs` into `into` (components) and rewrites `$ref`s to them."""
    node = copy.deepcopy(schema)
    for name, sub in node.pop("$defs", {}).items():
        into[name] = _rewrite_refs(sub)
    lifted: dict[str, Any] = _rewrite_refs(node)
    return lifted


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", _REF_PREFIX) if k == "$ref" else _rewrite_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def io_components() -> dict[str, Any]:
    components: dict[str, Any] = {}
    components["Input"] = _lift_defs(input_json_schema(), components)
    components["Output"] = _lift_defs(output_json_schema(), components)
    return components


def model_openapi(title: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1.0"},
        "paths": {},
        "components": {"schemas": io_components()},
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF_PREFIX + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_TIMESTAMP = {"type": "string", "format": "date-time"}
_URL = {"type": "string", "format": "uri"}


def _api_components() -> dict[str, Any]:
    webhook = {"type": "string", "maxLength": 2048, "pattern": r"^https?://[^/\s]+"}
    request_properties: dict[str, Any] = {
        "input": _ref("Input"),
        "webhook": {**webhook, "description": "URL that receives Replicate-style webhooks"},
        "webhook_completed": {**webhook, "description": "Legacy: a webhook for `completed` only"},
        "webhook_events_filter": {
            "type": "array",
            "maxItems": 4,
            "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
            "description": "Events to deliver (default all; `completed` is always sent)",
        },
        "stream": {"type": "boolean", "description": "Accepted; this model does not stream"},
    }
    return {
        "Prediction": {
            "type": "object",
            "required": ["id", "model", "version", "input", "status", "urls", "created_at"],
            "properties": {
                "id": {"type": "string"},
                "model": {"type": "string", "description": "owner/name"},
                "version": {"type": "string"},
                "input": {
                    "type": "object",
                    "description": "The input as given, secret fields left out",
                },
                "output": _nullable(_ref("Output")),
                "logs": {"type": "string"},
                "error": _nullable({"type": "string"}),
                "status": {"type": "string", "enum": [p.value for p in Phase]},
                "created_at": _nullable(_TIMESTAMP),
                "started_at": _nullable(_TIMESTAMP),
                "completed_at": _nullable(_TIMESTAMP),
                "urls": {
                    "type": "object",
                    "required": ["get", "cancel"],
                    "properties": {"get": _URL, "cancel": _URL, "web": _URL},
                },
                "metrics": {
                    "type": "object",
                    "properties": {
                        "predict_time": {"type": "number"},
                        "total_time": {"type": "number"},
                        "audio_duration": {"type": "number"},
                    },
                },
                "data_removed": {"type": "boolean"},
                "source": {"type": "string", "enum": ["api", "web"]},
            },
        },
        "PredictionRequest": {
            "type": "object",
            "required": ["version", "input"],
            "additionalProperties": False,
            "properties": {
                "version": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 300,
                    "description": "A version id, or a model as `owner/name[:version]` or `name`",
                },
                **request_properties,
            },
        },
        "ModelPredictionRequest": {
            "type": "object",
            "required": ["input"],
            "additionalProperties": False,
            "properties": request_properties,
        },
        "PredictionPage": _page("Prediction"),
        "Version": {
            "type": "object",
            "required": ["id", "created_at", "cog_version", "openapi_schema"],
            "properties": {
                "id": {"type": "string"},
                "created_at": _TIMESTAMP,
                "cog_version": {"type": "string"},
                "openapi_schema": {"type": "object"},
            },
        },
        "VersionPage": _page("Version"),
        "Model": {
            "type": "object",
            "required": ["url", "owner", "name", "visibility", "run_count", "latest_version"],
            "properties": {
                "url": _URL,
                "owner": {"type": "string"},
                "name": {"type": "string"},
                "description": _nullable({"type": "string"}),
                "visibility": {"type": "string", "enum": ["public", "private"]},
                "github_url": _nullable(_URL),
                "paper_url": _nullable(_URL),
                "license_url": _nullable(_URL),
                "run_count": {"type": "integer"},
                "cover_image_url": _nullable(_URL),
                "default_example": {"type": "null"},
                "latest_version": _ref("Version"),
            },
        },
        "ModelPage": _page("Model"),
        "File": {
            "type": "object",
            "required": ["id", "name", "content_type", "size", "urls"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "content_type": {"type": "string"},
                "size": {"type": "integer"},
                "etag": {"type": "string"},
                "checksums": {"type": "object"},
                "metadata": {"type": "object"},
                "created_at": _TIMESTAMP,
                "expires_at": _TIMESTAMP,
                "urls": {
                    "type": "object",
                    "required": ["get"],
                    "properties": {
                        "get": {
                            **_URL,
                            "description": "Signed download link: use it as an input URL",
                        }
                    },
                },
            },
        },
        "FilePage": _page("File"),
        "WebhookSecret": {
            "type": "object",
            "required": ["key"],
            "properties": {"key": {"type": "string", "pattern": "^whsec_"}},
        },
        "Problem": {
            "type": "object",
            "required": ["title", "status", "detail"],
            "properties": {
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
            },
        },
    }


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["results", "next", "previous"],
        "properties": {
            "previous": _nullable(_URL),
            "next": _nullable(_URL),
            "results": {"type": "array", "items": _ref(item)},
        },
    }


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


_ERRORS = {
    "401": _problem("Missing or invalid token"),
    "429": _problem(
        "This token's namespace holds its share of the requests in flight; retry after "
        "Retry-After seconds"
    ),
    "503": _problem("Overloaded or a dependency is unavailable; retry after Retry-After"),
}
_PREDICTION_ID = {
    "name": "prediction_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 253},
}


def _string_param(name: str, where: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": True, "schema": {"type": "string"}}


_FILE_ID = _string_param("file_id", "path")
_MODEL_PARAMS = [
    {"name": "model_owner", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}},
]
_CREATE_HEADERS = [
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait` or `wait=N`: hold the answer until the prediction ends or N "
        "seconds (default 60) pass; on timeout the status reads `starting`",
        "schema": {"type": "string"},
    },
    {
        "name": "Cancel-After",
        "in": "header",
        "required": False,
        "description": "Longest run time (`300`, `90s`, `5m`, `1h30m`)",
        "schema": {
            "type": "string",
            "pattern": r"^([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?(ms|h|m|s))+)$",
        },
    },
]


def _create_operation(operation_id: str, body: str, extra_params: list[Any]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "Create a prediction",
        "parameters": [*extra_params, *_CREATE_HEADERS],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        },
        "responses": {
            "201": _json(
                "Created; the Prediction exists",
                "Prediction",
                {"Location": {"schema": _URL, "description": "The prediction's URL"}},
            ),
            "400": _problem("Malformed JSON (or nested deeper than 64 levels) or header"),
            "404": _problem("No such model or version"),
            "408": _problem("The body did not arrive within WHISPERX_BODY_TIMEOUT_SECONDS"),
            "413": _problem("Body too large"),
            "422": _problem("Invalid input; the detail names the field"),
            **_ERRORS,
        },
    }


def gateway_openapi(*, metrics: bool) -> dict[str, Any]:
    schemas = io_components()
    schemas.update(_api_components())
    bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    paths: dict[str, Any] = {
        "/v1/predictions": {
            "post": _create_operation("predictions.create", "PredictionRequest", []),
            "get": {
                "operationId": "predictions.list",
                "summary": "List predictions, newest first",
                "parameters": [
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json("A page of predictions", "PredictionPage"),
                    "400": _problem("Invalid cursor"),
                    **_ERRORS,
                },
            },
        },
        "/v1/predictions/{prediction_id}": {
            "get": {
                "operationId": "predictions.get",
                "parameters": [_PREDICTION_ID],
                "responses": {
                    "200": _json("The prediction", "Prediction"),
                    "404": _problem("No such prediction in this token's namespace"),
                    **_ERRORS,
                },
            }
        },
        "/v1/predictions/{prediction_id}/cancel": {
            "post": {
                "operationId": "predictions.cancel",
                "parameters": [_PREDICTION_ID],
                "responses": {
                    "200": _json("Cancellation requested", "Prediction"),
                    "404": _problem("No such prediction"),
                    "409": _problem("The prediction has already ended"),
                    **_ERRORS,
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "models.list",
                "responses": {"200": _json("The models", "ModelPage"), **_ERRORS},
            }
        },
        "/v1/models/{model_owner}/{model_name}": {
            "get": {
                "operationId": "models.get",
                "parameters": _MODEL_PARAMS,
                "responses": {
                    "200": _json("The model", "Model"),
                    "404": _problem("No such model"),
                    **_ERRORS,
                },
            }
        },
        "/v1/models/{model_owner}/{model_name}/predictions": {
            "post": _create_operation(
                "models.predictions.create", "ModelPredictionRequest", _MODEL_PARAMS
            )
        },
        "/v1/models/{model_owner}/{model_name}/versions": {
            "get": {
                "operationId": "models.versions.list",
                "parameters": _MODEL_PARAMS,
                "responses": {
                    "200": _json("The model's versions", "VersionPage"),
                    "404": _problem("No such model"),
                    **_ERRORS,
                },
            }
        },
        "/v1/models/{model_owner}/{model_name}/versions/{version_id}": {
            "get": {
                "operationId": "models.versions.get",
                "parameters": [
                    *_MODEL_PARAMS,
                    {
                        "name": "version_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json("The version", "Version"),
                    "404": _problem("No such model or version"),
                    **_ERRORS,
                },
            }
        },
        "/v1/webhooks/default/secret": {
            "get": {
                "operationId": "webhooks.default.secret.get",
                "summary": "The secret that signs webhook deliveries (whsec_...)",
                "responses": {
                    "200": _json("The signing secret", "WebhookSecret"),
                    "404": _problem("No signing secret configured"),
                    **_ERRORS,
                },
            }
        },
        "/v1/files": {
            "post": {
                "operationId": "files.create",
                "summary": "Upload a file to use as an input (expires after 24 hours)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["content"],
                                "properties": {
                                    "content": {"type": "string", "format": "binary"},
                                    "metadata": {
                                        "type": "object",
                                        "description": "Any JSON object, kept with the file",
                                    },
                                },
                            },
                            # The metadata part is JSON text, as Replicate's clients send it.
                            "encoding": {"metadata": {"contentType": "application/json"}},
                        }
                    },
                },
                "responses": {
                    "201": _json("The file", "File"),
                    "400": _problem("Malformed multipart body"),
                    "404": _problem("Uploads are not configured"),
                    "408": _problem("The body did not arrive within WHISPERX_BODY_TIMEOUT_SECONDS"),
                    "413": _problem("File or metadata too large, or the namespace's quota"),
                    "415": _problem("Not multipart/form-data"),
                    "422": _problem("Missing `content` or bad metadata"),
                    **_ERRORS,
                },
            },
            "get": {
                "operationId": "files.list",
                "responses": {"200": _json("This token's files", "FilePage"), **_ERRORS},
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "operationId": "files.get",
                "parameters": [_FILE_ID],
                "responses": {
                    "200": _json("The file", "File"),
                    "404": _problem("No such file"),
                    **_ERRORS,
                },
            },
            "delete": {
                "operationId": "files.delete",
                "parameters": [_FILE_ID],
                "responses": {
                    "204": {"description": "Deleted"},
                    "404": _problem("No such file"),
                    **_ERRORS,
                },
            },
        },
        "/v1/files/{namespace}/{file_id}/download": {
            "get": {
                "operationId": "files.download",
                "summary": "A file's content, by the signed link in its `urls.get`",
                "security": [],
                "parameters": [
                    _string_param("namespace", "path"),
                    _FILE_ID,
                    _string_param("expires", "query"),
                    _string_param("signature", "query"),
                ],
                "responses": {
                    "200": {
                        "description": "The content, as an attachment: audio/* or "
                        "video/* as uploaded, anything else application/octet-stream",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "403": _problem("Invalid or expired link"),
                    "404": _problem("No such file"),
                    "503": _ERRORS["503"],
                },
            }
        },
        "/health": _open_get("health", "Alive"),
        "/ready": {
            "get": {
                "operationId": "ready",
                "security": [],
                "responses": {
                    "200": {"description": "Ready to serve"},
                    "503": _problem("Not ready (Redis or the backend unavailable)"),
                },
            }
        },
        "/openapi.json": _open_get("openapi", "This document"),
    }
    if metrics:
        paths["/metrics"] = _open_get("metrics", "Prometheus metrics (text format)")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WhisperX predictions (Replicate-compatible)",
            "version": "1.0",
            "description": "Replicate's predictions API for WhisperX transcription. Use "
            "`Authorization: Bearer <token>`; each token sees its own namespace only.",
        },
        "paths": paths,
        "security": bearer,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def _open_get(operation_id: str, description: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "security": [],
            "responses": {"200": {"description": description}},
        }
    }
