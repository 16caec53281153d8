"""The dev-mode demo page in a real headless Chromium: presigned PUT and PostObject uploads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from broker.dev.stack import dev_stack
from broker.http.app import make_app, runner_options
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network beyond loopback (see tools/install-system-deps.sh).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + b"\x00" * 64


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    message = "Chromium is missing: run `bash tools/install-system-deps.sh` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


async def test_demo_page_uploads_both_ways(tmp_path: Path) -> None:
    """Headless Chromium uploads a PNG by presigned PUT and by PostObject; the bytes land."""
    _require_chromium()
    from playwright.async_api import async_playwright

    image = tmp_path / "pixel.png"
    image.write_bytes(PNG)
    policies = load_policies(POLICIES_DIR)
    async with dev_stack(policies, POLICIES_DIR, tmp_path / "oss", port=0) as dev:
        server = TestServer(make_app(dev.services, demo=True))
        await server.start_server(**runner_options(dev.services))
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                )
                try:
                    page = await browser.new_page()
                    await page.goto(f"{server.make_url('/demo')}#key={dev.dev_key}")
                    await page.wait_for_selector("body[data-ready='yes']", timeout=15_000)
                    await page.set_input_files("#file", str(image))
                    await page.click("#put")
                    await page.wait_for_selector("body[data-put-key]", timeout=15_000)
                    await page.click("#post")
                    await page.wait_for_selector("body[data-post-key]", timeout=15_000)
                    put_key = await page.get_attribute("body", "data-put-key")
                    post_key = await page.get_attribute("body", "data-post-key")
                    await page.screenshot(path=str(tmp_path / "demo.png"))
                finally:
                    await browser.close()
        finally:
            await server.close()
        assert (put_key, post_key) == ("avatars/dev/put-pixel.png", "avatars/dev/post-pixel.png")
        assert dev.oss.read_object("examplebucket", put_key) == PNG
        assert dev.oss.read_object("examplebucket", post_key) == PNG
