"""The page's "inside" view in a real headless browser: chat, open the Inside tab, show the
attention map of a layer/head for the last reply plus the MoE routing table, and get a
clear error for a layer out of range. Same setup as test_serve_browser.py (Debian's
chromium driven by Playwright; skipped with the reason when missing)."""

from __future__ import annotations

import os

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} missing: apt-get install chromium (make install does it as root)")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.serve.app import create_app
    from qkv.serve.testing import BackgroundServer, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("inside") / "ckpt", n_expert=4, n_expert_per_token=2)
    model, tok = load_for_serving(str(ckpt))
    app = create_app(Engine(model, tok, num_blocks=64, max_num_seqs=4), "tiny-moe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(app) as srv:
            yield srv.url
    finally:
        torch.set_num_threads(threads)


def test_inside_view_shows_attention_and_routing(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
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
        finally:
            browser.close()
