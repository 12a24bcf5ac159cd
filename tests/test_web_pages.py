"""The browser pages and the API docs, on an app built in-process (no children): GET / is the
chat page unless --disable-web-ui, /docs and /redoc load nothing from outside the server, the
OpenAPI document carries every POST route's request body, the pages stay open under --api-key,
and /metrics without --enable-metrics names the flag. The chat page in a real browser:
tests/test_web_ui.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from srt.entrypoints.http_server import create_app
from srt.server_args import ServerArgs

# POST routes that take no body.
BODYLESS_POSTS = {"/flush_cache"}
# A URL that leaves the server: scheme-qualified or protocol-relative, in an attribute or a url().
EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)


class _FakeTM:
    """Enough of a TokenizerManager for routes that never generate."""

    served_model_name = "tiny"
    model_path = "/models/tiny"
    context_len = 128
    dead_reason: str | None = None
    metrics = None
    tokenizer = None  # no chat template: the chat route knows no tool format

    def __init__(self, **server_args: Any) -> None:
        self.server_args = ServerArgs(**server_args)

    def start(self) -> None:
        pass


def _client(**server_args: Any) -> TestClient:
    return TestClient(create_app(_FakeTM(**server_args)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with _client() as c:
        yield c


def test_root_is_the_chat_page_with_its_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="messages"' in page.text and 'id="prompt"' in page.text
    srcs = re.findall(r'(?:src|href)="(web/[^"]+)"', page.text)
    assert sorted(srcs) == ["web/chat.css", "web/chat.js"]
    for src in srcs:
        asset = client.get("/" + src)
        assert asset.status_code == 200 and asset.content
    # Offline: nothing of the page comes from elsewhere.
    for path in ("/", "/web/chat.js", "/web/chat.css"):
        assert not EXTERNAL.search(client.get(path).text), path
    # The page speaks the server's own API.
    js = client.get("/web/chat.js").text
    assert '"v1/chat/completions"' in js and '"v1/models"' in js and "include_usage" in js


def test_disable_web_ui_makes_root_the_normal_404() -> None:
    with _client(disable_web_ui=True) as c:
        for path in ("/", "/web/chat.js"):
            resp = c.get(path)
            assert resp.status_code == 404
            assert resp.json()["object"] == "error"
        assert c.get("/docs").status_code == 200  # the API docs stay


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200
    assert not EXTERNAL.search(page.text), EXTERNAL.search(page.text)
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith("/docs/assets/") for r in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    assert "/openapi.json" in page.text


def test_every_post_route_documents_its_request_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    posts = {p: ops["post"] for p, ops in doc["paths"].items() if "post" in ops}
    assert {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/tokenize"} <= set(posts)
    for path, op in posts.items():
        if path in BODYLESS_POSTS:
            assert "requestBody" not in op, path
            continue
        assert "requestBody" in op, f"POST {path} documents no request body"
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert schemas[name]["properties"], path
    chat = schemas["ChatCompletionRequest"]
    assert {"messages", "temperature", "max_tokens", "stream"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    # Each $ref in the document resolves.
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert ref in schemas, ref


def test_documenting_bodies_leaves_validation_as_it_was(client: TestClient) -> None:
    # Still srt's own parsing: OpenAI-style 400s, never FastAPI's 422.
    for path in ("/v1/chat/completions", "/generate", "/v1/tokenize"):
        resp = client.post(path, json={"bogus": [1]})
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["object"] == "error"
    resp = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "text/plain"})
    assert resp.status_code == 400 and "JSON" in resp.json()["message"]


def test_api_key_guards_the_api_not_the_pages() -> None:
    with _client(api_key="sesame") as c:
        assert c.get("/v1/models").status_code == 401
        for path in ("/", "/web/chat.js", "/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert c.get("/docs/assets/swagger-ui.css").status_code == 200
        # The docs offer the key: Swagger UI's Authorize sends it as a bearer token.
        doc = c.get("/openapi.json").json()
        assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert doc["paths"]["/health"]["get"]["security"] == []
        assert "security" not in doc["paths"]["/v1/models"]["get"]


def test_metrics_off_says_which_flag_turns_them_on(client: TestClient) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 404
    body = resp.json()
    assert body["object"] == "error" and "--enable-metrics" in body["message"]
