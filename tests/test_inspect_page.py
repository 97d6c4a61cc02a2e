"""The page's "inside" view in a real headless browser: chat, open the Inside tab, show the
attention map of a layer/head for the last reply plus the MoE routing table, and get a
clear error for a layer out of range. Same setup as test_serve_browser.py (Debian's
chromium driven by Playwright; skipped with the reason when missing)."""

from __future__ import annotations

import pytest

from _browser import browser_page, serve_tiny, sync_api


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with serve_tiny(tmp_path_factory.mktemp("inside"), "tiny-moe", n_expert=4, n_expert_per_token=2) as u:
        yield u


def test_inside_view_shows_attention_and_routing(url):
    with browser_page(height=900) as page:
        errors = page.errors
        page.goto(url + "/")
        sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-moe")
        page.fill("#max_tokens", "12")
        page.fill("#prompt", "Hello")
        page.click("#send")
        sync_api.expect(page.locator("#send")).to_be_enabled(timeout=30_000)
        reply = page.locator(".msg.assistant .content").last.text_content()

        page.click("#tab-inside")
        sync_api.expect(page.locator("#panel-inside")).to_be_visible()
        page.fill("#inside-layer", "1")
        page.fill("#inside-head", "3")
        page.click("#inside-last")  # the last reply, as the page shows it
        sync_api.expect(page.locator("#inside-status")).to_contain_text("tokens", timeout=30_000)
        assert page.input_value("#inside-text") == reply
        assert page.locator("#inside-status").text_content().endswith("2 layers × 4 heads")
        # the canvas was drawn: some pixels are not white
        painted = page.evaluate("""() => { const c = document.getElementById('inside-map');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250) n++; return n; }""")
        assert painted > 100
        sync_api.expect(page.locator("#inside-load tr")).to_have_count(3)  # header + 2 MoE layers
        assert page.locator("#inside-choices sub").count() > 0

        page.fill("#inside-layer", "7")
        page.click("#inside-show")
        sync_api.expect(page.locator("#inside-status")).to_contain_text("error: layer 7 is out of range")
        assert errors == []
