"""The chat page in a real headless browser (Debian's chromium driven by Playwright):
load it, set the controls, send a message, and watch the reply stream in piece by piece.

Needs /usr/bin/chromium (`make install` installs it when run as root); skipped with the
reason otherwise. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _browser import browser_page, serve_tiny, sync_api


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with serve_tiny(tmp_path_factory.mktemp("serve_browser"), "tiny-chat") as u:
        yield u


@pytest.fixture(scope="module")
def page():
    with browser_page() as p:
        yield p


def test_page_streams_a_reply(url, page, tmp_path):
    page.goto(url + "/")
    sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-chat")
    # record every text update of the reply as it happens, to see it arrive in pieces
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(recs => { for (const r of recs) for (const n of r.addedNodes)
            if (n.parentElement && n.parentElement.closest('.msg.assistant'))
                window.__lengths.push(n.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#max_tokens", "48")
    page.locator("#temperature").fill("1")  # greedy on a random model is a run of newlines: sample
    sync_api.expect(page.locator("#temperature-val")).to_have_text("1.00")
    page.fill("#prompt", "Hello, who are you?")
    page.click("#send")

    reply = page.locator(".msg.assistant .content").last
    sync_api.expect(page.locator(".msg.user .content")).to_have_text("Hello, who are you?")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=30_000)  # the stream has finished
    text = reply.text_content()
    assert text and len(text) > 0
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) > 3 and max(lengths) == len(text), lengths  # arrived in pieces, growing
    assert page.locator("#stat-ttft").text_content().endswith(" ms")
    assert float(page.locator("#stat-tps").text_content()) > 0
    assert 1 <= int(page.locator("#stat-tokens").text_content()) <= 48  # usage from the final chunk
    assert page.locator("#stat-error").text_content() == ""
    assert page.locator("#inside-root").count() == 1  # the slot the inspect view fills
    assert page.errors == []
    shot = Path(os.environ.get("QKV_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_page_shows_server_errors(url, page):
    page.goto(url + "/")
    sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-chat")
    page.fill("#max_tokens", "100000")  # longer than the context: the server says 400
    page.fill("#prompt", "hi")
    page.click("#send")
    sync_api.expect(page.locator("#stat-error")).to_contain_text("maximum context length")
    sync_api.expect(page.locator("#send")).to_be_enabled()


def test_page_attaches_a_json_schema(url, page):
    """Ticked, the schema box sends response_format json_schema and the reply validates; a
    schema that is not JSON is refused on the page and nothing is sent."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    page.goto(url + "/")
    sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-chat")
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.check("#schema_on")
    page.fill("#schema", '{"type": "object",')
    page.fill("#prompt", "Is it ok?")
    page.click("#send")
    sync_api.expect(page.locator("#stat-error")).to_contain_text("JSON schema: not valid JSON")
    sync_api.expect(page.locator("#schema")).to_have_attribute("aria-invalid", "true")
    assert page.locator(".msg").count() == 0 and page.input_value("#prompt") == "Is it ok?" and bodies == []

    page.fill("#schema", json.dumps(schema))
    page.click("#send")
    sync_api.expect(page.locator(".msg.user .content")).to_have_text("Is it ok?")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=30_000)
    assert page.locator("#stat-error").text_content() == ""
    assert len(bodies) == 1 and bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "page_schema", "schema": schema, "strict": True},
    }
    jsonschema.validate(json.loads(page.locator(".msg.assistant .content").last.text_content()), schema)
    if os.environ.get("QKV_SCREENSHOT_DIR"):
        page.screenshot(path=str(Path(os.environ["QKV_SCREENSHOT_DIR"]) / "chat_page_schema.png"), full_page=True)

    # a schema that cannot be met within max_tokens: the page says the JSON was cut
    page.fill("#schema", '{"type": "array", "items": {"type": "integer"}, "minItems": 20}')
    page.fill("#max_tokens", "4")
    page.fill("#prompt", "Numbers?")
    page.click("#send")
    sync_api.expect(page.locator("#stat-error")).to_contain_text("cut at max tokens", timeout=30_000)
    sync_api.expect(page.locator("#send")).to_be_enabled()

    page.uncheck("#schema_on")  # unticked: a plain message again
    page.fill("#prompt", "And now?")
    page.click("#send")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=30_000)
    assert len(bodies) == 3 and "response_format" not in bodies[2]
    assert page.errors == []
