"""The OpenAPI 3.0 document of ingestd's HTTP API, built from the running config (limits)."""

from __future__ import annotations

from typing import Any

from . import __version__
from .config import Config

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR}}}
    if headers:
        out["headers"] = headers
    return out


def document(config: Config) -> dict[str, Any]:
    h = config.http
    retry_after = {"Retry-After": {"description": "seconds to wait before sending again",
                                   "schema": {"type": "integer", "minimum": 0}}}
    health = {"description": "health snapshot", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
    ingest_security: list[dict[str, list[str]]] = [{"bearer": []}] if config.tenancy.auth_on else []
    return {
        "openapi": "3.0.3",
        "info": {"title": "ingestd", "version": __version__,
                 "description": "HTTP ingestion of JSON telemetry, batched into object storage."},
        "paths": {
            "/v1/payloads": {
                "post": {
                    "operationId": "ingest",
                    "summary": "Send a collection of payloads; 202 once all are queued",
                    "security": ingest_security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Collection"}},
                            "application/x-ndjson": {"schema": {"type": "string", "minLength": 1,
                                                                "description": "one payload object per line"}},
                        },
                    },
                    "responses": {
                        "202": {"description": "every payload is queued",
                                "content": {"application/json": {"schema": {
                                    "type": "object", "required": ["accepted"],
                                    "properties": {"accepted": {"type": "integer", "minimum": 1}}}}}},
                        "400": _error("malformed JSON, wrong shape, empty data, too many payloads"),
                        "401": _error("missing or wrong bearer token", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
                        "413": _error(f"body over {h.max_body_bytes} bytes, or over {h.max_decoded_bytes} decoded, "
                                      "or more payloads than one second of the tenant's rate"),
                        "415": _error("unsupported Content-Type or Content-Encoding"),
                        "429": _error("the token's tenant is over its max_payloads_per_s; nothing was kept", retry_after),
                        "503": _error("queue full or draining; nothing was kept", retry_after),
                    },
                }
            },
            "/health": {"get": {"operationId": "health", "security": [],
                                "responses": {"200": health, "503": health}}},
            "/health/ready": {"get": {"operationId": "ready", "security": [], "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": {"description": "not ready", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/health/live": {"get": {"operationId": "live", "security": [], "responses": {
                "200": {"description": "the process answers", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [], "responses": {
                "200": {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [], "responses": {
                "200": {"description": "this document", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Collection": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "version": {"type": "string"},
                        "token": {"type": "string"},
                        "data": {"type": "array", "minItems": 1, "maxItems": h.max_payloads,
                                 "items": {"type": "object"}},
                    },
                },
                "Error": {"type": "object", "required": ["title", "description"],
                          "properties": {"title": {"type": "string"}, "description": {"type": "string"}}},
                "Health": {
                    "type": "object",
                    "required": ["status", "uptime_s", "queue", "workers", "counters", "rss_bytes", "cpu_percent"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "degraded", "draining"]},
                        "ready": {"type": "boolean"},
                        "uptime_s": {"type": "number"},
                        "queue": {"type": "object", "required": ["depth", "capacity"],
                                  "properties": {"depth": {"type": "integer"}, "capacity": {"type": "integer"}}},
                        "workers": {"type": "array", "items": {
                            "type": "object", "required": ["pid", "alive", "rss_bytes", "cpu_percent", "restarts"],
                            "properties": {"pid": {"type": "integer", "nullable": True}, "alive": {"type": "boolean"},
                                           "rss_bytes": {"type": "integer"}, "cpu_percent": {"type": "number"},
                                           "restarts": {"type": "integer"}}}},
                        "counters": {"type": "object", "additionalProperties": {"type": "integer"},
                                     "required": ["accepted_payloads", "uploaded_payloads", "uploaded_objects",
                                                  "failed_uploads", "dead_lettered_payloads", "rejected_requests"]},
                        "rss_bytes": {"type": "integer"},
                        "cpu_percent": {"type": "number"},
                    },
                },
            },
        },
    }
