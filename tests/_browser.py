"""Shared set-up of the page tests: Debian's chromium driven by Playwright (never Playwright's
own browser downloads), and a tiny model served by qkv on loopback.

Importing this module skips the importing test module, with the reason, when playwright or
/usr/bin/chromium is missing (`make browser` installs it; CI does so itself)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} missing: run `make browser` (as root) to enable the page tests", allow_module_level=True)


@contextlib.contextmanager
def serve_tiny(directory, name: str, **cfg_overrides):
    """A tiny qkv checkpoint made in `directory`, served under `name`; yields the base URL."""
    from _serve_helpers import BackgroundServer, make_tiny_checkpoint
    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.serve.app import create_app

    model, tok = load_for_serving(str(make_tiny_checkpoint(directory / "ckpt", **cfg_overrides)))
    app = create_app(Engine(model, tok, num_blocks=64, max_num_seqs=4), name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
    try:
        with BackgroundServer(app) as srv:
            yield srv.url
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def browser_page(height: int = 720):
    """A chromium page that records uncaught page errors in `page.errors`."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.errors = errors
            yield page
        finally:
            browser.close()
