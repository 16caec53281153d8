"""The dev-mode demo page in a real headless Chromium: uploads, its log, its icon, its errors."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp.test_utils import TestServer

from broker.dev.stack import DevStack, dev_stack
from broker.http.app import make_app, runner_options
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR

if TYPE_CHECKING:
    from playwright.async_api import Page

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
AVATAR_MAX_BYTES = 5 * 1024 * 1024  # policies/avatar-upload.yaml: max_object_bytes
STALE_KEY = (
    "this key is not valid: the dev key changes on every start of sts-broker dev; "
    "copy the new demo link printed in the terminal"
)
WAIT_MS = 15_000


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    message = "Chromium is missing: run `bash tools/install-system-deps.sh` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.asynccontextmanager
async def _dev_broker(storage_dir: Path, port: int | None = None) -> AsyncIterator[_Running]:
    """The dev stack with the demo page, served on 127.0.0.1 (``port`` or a free one)."""
    async with dev_stack(load_policies(POLICIES_DIR), POLICIES_DIR, storage_dir, port=0) as dev:
        server = TestServer(make_app(dev.services, demo=True), port=port)
        await server.start_server(**runner_options(dev.services))
        try:
            yield _Running(dev, server)
        finally:
            await server.close()


class _Running:
    """A running dev broker: its stack, its server, the demo link ``sts-broker dev`` prints."""

    def __init__(self, dev: DevStack, server: TestServer) -> None:
        self.dev, self.server = dev, server
        self.demo_link = f"{server.make_url('/demo')}#key={dev.dev_key}"


@contextlib.asynccontextmanager
async def _chromium() -> AsyncIterator[Page]:
    """A page in a headless Chromium."""
    _require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def _log(page: Page) -> list[str]:
    return await page.locator("#log > div").all_inner_texts()


async def _first_failure(page: Page) -> str:
    return await page.locator("#log > div.bad").first.inner_text(timeout=WAIT_MS)


async def test_demo_page_uploads_both_ways(tmp_path: Path) -> None:
    """Headless Chromium uploads a PNG by presigned PUT and by PostObject; the bytes land."""
    image = tmp_path / "pixel.png"
    image.write_bytes(PNG)
    async with _dev_broker(tmp_path / "oss") as running, _chromium() as page:
        await page.goto(running.demo_link)
        await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
        await page.set_input_files("#file", str(image))
        await page.click("#put")
        await page.wait_for_selector("body[data-put-key]", timeout=WAIT_MS)
        await page.click("#post")
        await page.wait_for_selector("body[data-post-key]", timeout=WAIT_MS)
        put_key = await page.get_attribute("body", "data-put-key")
        post_key = await page.get_attribute("body", "data-post-key")
        await page.screenshot(path=str(tmp_path / "demo.png"))
        oss = running.dev.oss
    assert (put_key, post_key) == ("avatars/dev/put-pixel.png", "avatars/dev/post-pixel.png")
    assert oss.read_object("examplebucket", put_key) == PNG
    assert oss.read_object("examplebucket", post_key) == PNG


async def test_demo_page_opens_with_a_ready_line(tmp_path: Path) -> None:
    """The log's first line says the page is ready: the key's policies and the upload prefix."""
    async with _dev_broker(tmp_path / "oss") as running, _chromium() as page:
        await page.goto(running.demo_link)
        await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
        lines = await _log(page)
    assert lines == [
        "ready: this key may use avatar-upload, pinned-reads, quick-upload, report-jobs, "
        "reports-read, service-uploads, vpc-ingest; uploads go under avatars/dev/"
    ]


async def test_demo_page_without_a_key_asks_for_one(tmp_path: Path) -> None:
    """Opened without #key=, the page's ready line asks for a key instead of failing."""
    async with _dev_broker(tmp_path / "oss") as running, _chromium() as page:
        await page.goto(str(running.server.make_url("/demo")))
        await page.locator("#log > div").first.wait_for(timeout=WAIT_MS)
        lines = await _log(page)
    assert len(lines) == 1
    assert lines[0].startswith("ready: paste a key")


async def test_favicon_is_served_and_the_page_loads_without_errors(tmp_path: Path) -> None:
    """/favicon.ico answers 200 with an image; loading the page logs no console error."""
    async with _dev_broker(tmp_path / "oss") as running, _chromium() as page:
        errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        await page.goto(running.demo_link)
        await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
        icon = await page.request.get(str(running.server.make_url("/favicon.ico")))
        status, content_type = icon.status, icon.headers["content-type"]
    assert (status, content_type) == (200, "image/svg+xml")
    assert errors == []


async def test_failed_post_object_shows_oss_code_and_message(tmp_path: Path) -> None:
    """A PostObject OSS refuses (over max_object_bytes) logs OSS's Code and Message, not XML."""
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"\x00" * (AVATAR_MAX_BYTES + 1 - len(PNG)))
    async with _dev_broker(tmp_path / "oss") as running, _chromium() as page:
        await page.goto(running.demo_link)
        await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
        await page.set_input_files("#file", str(big))
        await page.click("#post")
        failure = await _first_failure(page)
    assert failure == (
        "PostObject failed: HTTP 400 EntityTooLarge: "
        "Your proposed upload exceeds the maximum allowed size."
    )


async def test_open_tab_after_a_restart_says_the_key_changed(tmp_path: Path) -> None:
    """After a restart the old tab's upload says the dev key changed; pasting the new one works."""
    image = tmp_path / "pixel.png"
    image.write_bytes(PNG)
    async with _chromium() as page:
        async with _dev_broker(tmp_path / "oss") as first:
            await page.goto(first.demo_link)
            await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
            port = first.server.port
        async with _dev_broker(tmp_path / "oss", port=port) as second:
            await page.set_input_files("#file", str(image))
            await page.click("#put")
            failure = await _first_failure(page)
            await page.fill("#key", second.dev.dev_key)
            await page.locator("#key").blur()
            await page.wait_for_selector("body[data-ready='yes']", timeout=WAIT_MS)
            lines = await _log(page)
    assert failure == STALE_KEY
    assert lines[-1].startswith("ready: this key may use avatar-upload")
