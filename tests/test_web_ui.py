"""The chat page at / in a real browser (headless Chromium over the DevTools protocol, see
_browser.py) against a live server on the tiny llama with --api-key: the key asked for and kept,
streamed answers over several turns equal to the API's own, token counts, the stop button,
errors the server answers (HTTP and mid-stream), a phone-sized screen, and the API docs pages
rendering with nothing loaded from outside the server. Skipped where no Chromium is installed.
The same routes without a browser: tests/test_web_pages.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _browser import Browser, Page, find_browser
from _live import start_server

BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium or Chrome found (Debian: apt-get install chromium; or set "
    "SRT_TEST_BROWSER to the browser's path)",
)

API_KEY = "web-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Prompts tried, in order, for one whose greedy answer runs to max_tokens (the stop tests
# need an answer still streaming when they act).
LONG_CANDIDATES = ("Tell me a long story.", "Count to one hundred.", "a b c d e", "Why?", "x")
LONG_MAX_TOKENS = 600

# Counts the renders of the last assistant answer (each streamed delta is one) in
# window.renders, from now on.
COUNT_RENDERS = """(() => {
  window.renders = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      const msg = r.target.parentElement;
      if (r.target.classList && r.target.classList.contains("body") && msg
          && msg.classList.contains("assistant")) window.renders++;
    }
  }).observe(document.getElementById("messages"), {childList: true, subtree: true});
})()"""


class Live:
    def __init__(self, base: str, browser: Browser) -> None:
        self.base, self.browser = base, browser
        self.long: tuple[str, str] | None = None  # _long_prompt's answer, found once

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """The non-streamed answer of the API to what the page sends."""
        body = {"messages": messages, **params}
        resp = httpx.post(self.base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        return resp.json() | {"status": resp.status_code}


@pytest.fixture(scope="module")
def live(
    tiny_model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    assert BROWSER is not None
    log = tmp_path_factory.mktemp("web") / "server.log"
    args = ["--model-path", tiny_model_paths["llama"], "--api-key", API_KEY]
    args += ["--max-total-tokens", "4096"]
    proc, base = start_server(args, log, Path(tmp_path_factory.mktemp("tmp")))
    browser = None
    try:
        browser = Browser(BROWSER)
        yield Live(base, browser)
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait(timeout=30)


def _set(page: Page, element_id: str, value: str) -> None:
    """Types `value` into an input as a user would (a change event follows)."""
    page.js(
        f"(() => {{ const el = document.getElementById({json.dumps(element_id)}); "
        f"el.value = {json.dumps(value)}; el.dispatchEvent(new Event('change')); }})()"
    )


def _send(page: Page, text: str) -> None:
    _set(page, "prompt", text)
    page.js("document.getElementById('send').click()")


def _last(page: Page, selector: str) -> str:
    return page.js(
        f"[...document.querySelectorAll({json.dumps(selector)})].pop()?.textContent ?? null"
    )


def _open_with_key(live: Live) -> Page:
    """A fresh tab on the chat page; the key is in this browser's storage by then."""
    page = live.browser.open(live.base + "/")
    page.wait("document.getElementById('model').options.length > 0")
    return page


def _long_prompt(live: Live) -> tuple[str, str]:
    """A prompt whose greedy answer runs to LONG_MAX_TOKENS, and that answer."""
    if live.long is not None:
        return live.long
    for prompt in LONG_CANDIDATES:
        messages = [{"role": "user", "content": prompt}]
        out = live.chat(messages, max_tokens=LONG_MAX_TOKENS, temperature=0)
        if out["choices"][0]["finish_reason"] == "length":
            live.long = prompt, out["choices"][0]["message"]["content"]
            return live.long
    pytest.fail(f"no prompt of {LONG_CANDIDATES} runs to {LONG_MAX_TOKENS} tokens; add one")


def test_chat_asks_for_the_key_then_streams_answers_over_turns(live: Live) -> None:
    page = live.browser.open(live.base + "/")
    # --api-key: the model list is refused, the page says so and opens the key field.
    page.wait("document.querySelector('.msg.system-error .error')")
    assert "401" in _last(page, ".error") and "API key" in _last(page, ".error")
    assert page.js("!document.getElementById('settings').hidden")
    _set(page, "api-key", API_KEY)
    page.wait("document.getElementById('model').options.length > 0")
    models = httpx.get(live.base + "/v1/models", headers=AUTH).json()["data"]
    assert page.js("document.getElementById('model').value") == models[0]["id"]
    assert page.js("document.querySelectorAll('.error').length") == 0  # the old error went
    assert page.js("localStorage.getItem('srt-chat.api-key')") == API_KEY

    system = "You are a terse assistant."
    _set(page, "system", system)
    _set(page, "temperature", "0")
    _set(page, "max-tokens", "48")
    messages = [{"role": "system", "content": system}]
    for turn in (1, 2):
        # NOTE: a user text whose answer runs to max tokens: a random model's answer that
        # ends after a token or two can arrive in one read, and show no streaming.
        for text in ("Hello there", "And then?", *LONG_CANDIDATES):
            want = live.chat(
                [*messages, {"role": "user", "content": text}], max_tokens=48, temperature=0
            )
            if want["choices"][0]["finish_reason"] == "length":
                break
        else:
            pytest.fail("no user text gives a 48-token answer here; add one")
        page.js(COUNT_RENDERS)
        _send(page, text)
        page.wait(f"document.querySelectorAll('.msg.assistant .stats').length === {turn}")
        messages.append({"role": "user", "content": text})
        answer = want["choices"][0]["message"]["content"]
        usage = want["usage"]
        assert _last(page, ".msg.user .body") == text
        assert _last(page, ".msg.assistant .body") == answer  # the whole conversation went
        assert usage["completion_tokens"] >= 2
        assert page.js("window.renders") >= 2, "the answer did not stream"
        stats = _last(page, ".msg.assistant .stats")
        assert f"{usage['completion_tokens']} tokens in" in stats and "tok/s" in stats
        assert f"prompt {usage['prompt_tokens']} tokens" in stats
        messages.append({"role": "assistant", "content": answer})
    assert page.js("document.getElementById('send').textContent") == "Send"
    # The page asked nothing of anyone but this server.
    urls = page.requested_urls()
    assert urls and all(u.startswith(live.base + "/") for u in urls), urls


def test_stop_button_ends_the_answer(live: Live) -> None:
    page = _open_with_key(live)
    prompt, full = _long_prompt(live)
    _set(page, "system", "")  # the earlier test's system prompt is kept in this browser
    _set(page, "temperature", "0")
    _set(page, "max-tokens", str(LONG_MAX_TOKENS))
    _send(page, prompt)
    page.wait("document.querySelector('.msg.assistant .body')?.textContent")
    assert page.js("document.getElementById('send').textContent") == "Stop"
    page.js("document.getElementById('send').click()")
    page.wait("document.querySelector('.msg.assistant .stats')")
    assert _last(page, ".msg.assistant .stats").startswith("stopped")
    shown = _last(page, ".msg.assistant .body")
    assert shown and full.startswith(shown) and len(shown) < len(full)
    assert page.js("document.getElementById('send').textContent") == "Send"


def test_server_errors_are_shown(live: Live) -> None:
    page = _open_with_key(live)
    # An HTTP error: the server's own message, and the text back in the input box.
    _set(page, "system", "")
    _set(page, "max-tokens", "-1")
    _send(page, "hi")
    page.wait("document.querySelector('.msg.assistant .error')")
    want = live.chat([{"role": "user", "content": "hi"}], max_tokens=-1)
    assert want["status"] == 400
    assert want["message"] in _last(page, ".msg.assistant .error")
    assert page.js("document.getElementById('prompt').value") == "hi"
    assert page.js("document.querySelector('.msg.assistant .error').getAttribute('role')") == (
        "alert"
    )
    # An error event in the middle of a stream: the request aborted on the server.
    prompt, _ = _long_prompt(live)
    _set(page, "temperature", "0")
    _set(page, "max-tokens", str(LONG_MAX_TOKENS))
    _send(page, prompt)
    page.wait("[...document.querySelectorAll('.msg.assistant .body')].pop()?.textContent")
    resp = httpx.post(live.base + "/abort_request", json={"abort_all": True}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    page.wait("[...document.querySelectorAll('.msg.assistant')].pop().querySelector('.error')")
    assert "abort" in _last(page, ".msg.assistant .error").lower()


def test_page_fits_a_phone(live: Live) -> None:
    page = live.browser.open(live.base + "/", width=390, height=844)
    page.resize(390, 844, mobile=True)
    page.wait("document.getElementById('model').options.length > 0")
    assert page.js("document.documentElement.scrollWidth") <= 390
    send = page.js(
        "(() => { const r = document.getElementById('send').getBoundingClientRect(); "
        "return [r.left, r.top, r.right, r.bottom]; })()"
    )
    assert 0 <= send[0] and send[2] <= 390 and 0 <= send[1] and send[3] <= 844, send


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        ("/docs", "document.querySelectorAll('.opblock').length > 5"),
        ("/redoc", "document.body.innerText.includes('/v1/chat/completions')"),
    ],
)
def test_docs_render_without_the_internet(live: Live, path: str, rendered: str) -> None:
    page = live.browser.open(live.base + path)
    page.wait(rendered)
    urls = page.requested_urls()
    assert urls[0] == live.base + path
    outside = [u for u in urls if not u.startswith((live.base + "/", "data:", "blob:" + live.base))]
    assert not outside
