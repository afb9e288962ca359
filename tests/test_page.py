"""The chat page in a real browser: headless Chromium (Debian's package, driven by Playwright
through its path: Playwright's own browser download is not reachable) against the real server
with the bundled model: the page loads, a message gets its streamed answer, the live block view
showed masks before they turned into tokens, the mode switch and JSON output work, an API key
is asked for.  Screenshots are kept under a temp dir (printed) as artifacts."""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

import dlmnumba
from dlmnumba import DecodeSettings
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import ThreadedServer

TOY = str(Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("DLMNUMBA_ARTIFACTS") or tempfile.mkdtemp(prefix="dlmnumba-page-"))


def _server(**opts):
    m = dlmnumba.load_model(TOY)
    srv = ThreadedServer(create_app(ServerState(ServerOptions(model_name="toy", **opts),
                                                DecodeSettings(block_size=32)),
                                    load=lambda: m)).start()
    t0 = time.monotonic()
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    return srv


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _ask(page, text, timeout=60_000):
    n = page.locator(".answer").count()
    page.fill("#prompt", text)
    page.click("#send")
    answer = page.locator(".answer").nth(n)
    answer.locator("xpath=self::*[@data-done='1']").wait_for(timeout=timeout)
    return answer


def test_chat_page_streams_and_shows_the_block_filling_in(browser):
    srv = _server()
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.locator("#model").filter(has_text="toy").wait_for()
        page.select_option("#mode", "iterative")
        page.fill("#block", "32")
        page.fill("#threshold", "0.99")
        answer = _ask(page, "Reverse: diffusion")
        assert "noisuffid" in answer.inner_text()
        assert "tokens/pass" in answer.locator(".stats").inner_text()
        log = page.evaluate("window.__dlmLog")
        masks = [e["masks"] for e in log if e["mode"] == "iterative"]
        assert masks and max(masks) > 0 and min(masks) < max(masks)  # masks turned into tokens
        page.screenshot(path=str(ARTIFACTS / "chat-iterative.png"), full_page=True)
        page.reload()  # a new conversation
        page.locator("#model").filter(has_text="toy").wait_for()
        page.select_option("#mode", "ar")
        answer = _ask(page, "What is 12+35?")
        assert "47" in answer.inner_text() and " ar" in answer.locator(".stats").inner_text()
        page.reload()
        page.locator("#model").filter(has_text="toy").wait_for()
        page.select_option("#mode", "greedy")
        page.check("#json")
        answer = _ask(page, "Copy: abc")
        text = answer.inner_text().split("\n")[0]
        assert isinstance(json.loads(text), dict)
        page.screenshot(path=str(ARTIFACTS / "chat-modes.png"), full_page=True)
        print(f"screenshots in {ARTIFACTS}")
    finally:
        srv.stop()


def test_page_asks_for_the_api_key(browser):
    srv = _server(api_key="sekrit")
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.locator("#keybox").wait_for(state="visible")
        page.fill("#key", "sekrit")
        page.click("#savekey")
        page.locator("#model").filter(has_text="toy").wait_for()
        answer = _ask(page, "What is 1+1?")
        assert "error" not in answer.inner_text()
    finally:
        srv.stop()
