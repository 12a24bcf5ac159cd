"""Request bodies in the OpenAPI document (main process).

The routes parse their JSON bodies themselves (`http_server.parse_body`), so that every
mistake is an OpenAI-style 400, and FastAPI therefore knows nothing of their bodies. A route
names its body model with `@request_body(Model)`; `install_openapi(app)` makes the app's
/openapi.json carry each such model's JSON schema as the route's requestBody (shared
sub-models once, under components/schemas), without FastAPI ever validating with it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__srt_request_body__"
_REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> Callable[[F], F]:
    """Marks a route function as taking a JSON body of `model` (for the docs only; the route
    still parses the body itself)."""

    def mark(fn: F) -> F:
        setattr(fn, _ATTR, model)
        return fn

    return mark


def install_openapi(app: FastAPI, api_key_exempt: Collection[str] | None = None) -> None:
    """Makes `app.openapi()` (served at /openapi.json) document the marked request bodies.
    `api_key_exempt` not None: the routes need the API key (a bearer token; Swagger UI's
    Authorize button then sends it), except those paths."""

    original = app.openapi  # FastAPI's: builds the document once and keeps it
    documented = False

    def openapi() -> dict[str, Any]:
        nonlocal documented
        doc = original()
        if not documented:
            _document(app, doc, api_key_exempt)
            documented = True
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _document(app: FastAPI, doc: dict[str, Any], api_key_exempt: Collection[str] | None) -> None:
    marked = [
        (route, getattr(route.endpoint, _ATTR))
        for route in app.routes
        if isinstance(route, APIRoute) and hasattr(route.endpoint, _ATTR)
    ]
    models = list(dict.fromkeys(model for _, model in marked))
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        if name in schemas and schemas[name] != schema:
            raise RuntimeError(f"two different OpenAPI schemas are named {name!r}")
        schemas[name] = schema
    for route, model in marked:
        for method in route.methods:
            operation = doc["paths"][route.path_format][method.lower()]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(model, "validation")]}},
            }
    if api_key_exempt is not None:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
        for path in api_key_exempt:
            for operation in doc["paths"].get(path, {}).values():
                operation["security"] = []
