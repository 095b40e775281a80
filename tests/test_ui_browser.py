"""A real browser: Playwright drives the system's Chromium (Debian package ``chromium``, never a downloaded build).

Set up: ``apt-get install -y chromium`` and ``pip install playwright`` (no ``playwright install``). The test moves a
weight slider, clicks Generate, finds the image and saves a screenshot to ``docs/ui.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORA_UI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no system Chromium: apt-get install -y chromium (the CI set-up installs it)", allow_module_level=True)
pytest.importorskip("gradio", reason="the UI needs gradio: pip install -e '.[ui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser is the system's)")

from ui.app import build_demo, launch  # noqa: E402
from ui.handlers import Backend  # noqa: E402
from ui_support import bundled_pipeline, free_port, make_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    lib = root / "loras"
    lib.mkdir()
    # the default --model is the bundled model: LoRAs for it, small enough to keep its images recognisable
    make_lora(lib / "ink_style.safetensors", 2, rank=2, std=0.05, base=bundled_pipeline)
    make_lora(lib / "stripes.safetensors", 1, std=0.05, base=bundled_pipeline)
    cwd = os.getcwd()
    os.chdir(root)  # so the header shows the library as a user would give it: ./loras
    try:
        demo = build_demo(Backend(None, "./loras"))
    finally:
        os.chdir(cwd)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_slider_generate_and_screenshot(url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="load")
            # the library's LoRAs appear as rows with a checkbox, a weight slider and a text-encoder weight
            page.get_by_label("stripes").check(timeout=30_000)
            page.get_by_label("ink_style").check()
            slider = page.locator("#lora-weight-1 input[type=range]")
            slider.fill("0.4")
            number = page.locator("#lora-weight-1 input[type=number]")
            sync_api.expect(number).to_have_value("0.4")
            page.locator("#prompt textarea").fill("a red circle on a white background")
            page.locator("#generate-btn").click()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible", timeout=60_000)
            # visible is not loaded: on a busy host the <img> showed before its bytes arrived (img.complete false)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=60_000)
            sync_api.expect(page.locator("#image-info")).to_contain_text("ink_style 1 + stripes 0.4")
            sync_api.expect(page.locator("#snippet")).to_contain_text("set_adapters")
            # the README's screenshot is refreshed on request only, so a test run leaves the checkout clean
            out = ROOT / "docs" / "ui.png" if os.environ.get("LORA_UI_SCREENSHOT") else tmp_path / "ui.png"
            out.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            assert out.stat().st_size > 10_000
        finally:
            browser.close()
