"""The web demo end to end in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium) uploads an image, clicks classes, and the overlays it shows must appear, equal what the server rendered,
and differ between classes. The test installs what it lacks (apt-get as root, pip for selenium) and skips, saying
why, only where that is impossible.

Also a small tool for the README screenshot (a run, not the test):

    python tests/test_app_browser.py runs/demo/version_0/checkpoints/last.ckpt docs/web_demo.png [--example chelsea]
"""
from __future__ import annotations

import base64
import importlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Chromium must not reach out on its own (updates, sync, field trials, QUIC probes): everything stays on 127.0.0.1.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
                  "--no-default-browser-check", "--disable-dev-shm-usage"]
WAIT_S = 90


# ----------------------------------------------------------------------------------------------------------------
# what the test needs: Chromium, its driver, selenium
# ----------------------------------------------------------------------------------------------------------------


def _apt_install(packages: list[str]) -> str | None:
    """Install Debian packages (refreshing the lists once if needed); -> None, or why it could not."""
    if shutil.which("apt-get") is None:
        return "there is no apt-get here (not Debian)"
    if os.geteuid() != 0:
        return "this user is not root, so apt-get cannot install it"
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"apt-get install {' '.join(packages)} failed: {last}"
    return None


def find_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when they are missing; skips if it can't."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        problem = _apt_install(["chromium", "chromium-driver"])
        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if problem or not (chromium and driver):
            pytest.skip(f"Chromium cannot be installed: {problem or 'chromium/chromedriver still not on PATH'}")
    return chromium, driver


def import_selenium():
    """selenium's webdriver, pip-installing selenium into this interpreter when it is missing."""
    try:
        return importlib.import_module("selenium.webdriver")
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "selenium>=4.10"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            pytest.skip(f"selenium cannot be installed with pip: {last}")
        importlib.invalidate_caches()
        return importlib.import_module("selenium.webdriver")


def start_browser(profile_dir: str, width: int = 1280, height: int = 1000):
    chromium, chromedriver = find_chromium()
    webdriver = import_selenium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


# ----------------------------------------------------------------------------------------------------------------
# page helpers
# ----------------------------------------------------------------------------------------------------------------


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        message = d.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent")
        if message and "message" not in what:
            raise AssertionError(f"the page shows an error while waiting for {what}: {message}")
        return condition(d)

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, f"timed out waiting for {what}")


def wait_overlay(driver, key: str):
    """Wait until the overlay for 'variant:target' is loaded and shown."""
    from selenium.webdriver.common.by import By

    return wait(driver, lambda d: d.find_element(By.ID, "overlay").get_attribute("data-loaded") == key
                and d.execute_script("return document.body.dataset.state") == "idle", f"overlay {key}")


def pixels(driver, element_id: str) -> np.ndarray:
    """The image as the browser decoded it (drawn on a canvas) -> uint8 [H, W, 3]."""
    url = driver.execute_script(
        "const img = document.getElementById(arguments[0]);"
        "if (!img.complete || !img.naturalWidth) return null;"
        "const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png');", element_id)
    assert url, f"#{element_id} holds no loaded image"
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def page_resources(driver) -> list[str]:
    """Every URL the page fetched (document, scripts, styles, images, API calls)."""
    return driver.execute_script(
        "return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name))")


# ----------------------------------------------------------------------------------------------------------------
# the test
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_browser(str(tmp_path_factory.mktemp("chromium-profile")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    from cdam_pl.app import make_server

    server = make_server(tiny_checkpoint, 0, quiet=True, n_samples=4, n_steps=4).start()
    yield server
    server.close()


def _digit_png(path: Path, i: int) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits().images[i]
    Image.fromarray(np.uint8(d * 15)).resize((64, 64), Image.NEAREST).convert("RGB").save(path)
    return path


def test_upload_click_two_classes_and_see_different_overlays(browser, app, tmp_path):
    import torch
    from selenium.webdriver.common.by import By

    from cdam_pl.data import build_transform, load_image

    browser.get(app.url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button[data-example]"), "the examples")
    image = _digit_png(tmp_path / "digit 3.png", 3)
    calls = app.engine.explain_calls
    browser.find_element(By.ID, "file").send_keys(str(image))
    buttons = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions button[data-target]"),
                   "the top-5 predictions")
    assert len(buttons) == 5

    # the probabilities shown are the model's, computed here independently
    engine = app.engine
    bb, head = engine.backbone, engine.head
    x = build_transform(bb.img_size, **bb.data_config)(load_image(image))[None]
    with torch.no_grad():
        probs = head(bb(x)).softmax(1)[0]
    order = probs.argsort(descending=True)[:5].tolist()
    assert [b.get_attribute("data-target") for b in buttons] == [f"c{k}" for k in order]
    shown = [float(b.find_element(By.CLASS_NAME, "prob").text.rstrip(" %")) for b in buttons]
    assert np.allclose(shown, 100 * probs[order].numpy(), atol=0.051)

    # click two classes: each overlay appears, is what the server rendered for that class, and they differ
    seen = {}
    image_id = engine.add_image(load_image(image), "digit 3.png")["id"]  # the cached entry: no new pass
    for button in (buttons[1], buttons[0]):
        target = button.get_attribute("data-target")
        button.click()
        wait_overlay(browser, f"vanilla:{target}")
        seen[target] = pixels(browser, "overlay")
        want = np.asarray(Image.open(io.BytesIO(engine.overlay_png(image_id, target))))
        assert seen[target].shape == want.shape and np.abs(seen[target].astype(int) - want).max() <= 2
        assert "selected" in button.get_attribute("class")
    a, b = seen.values()
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0, "the two classes' overlays look the same"
    attention = pixels(browser, "attention")
    assert attention.shape == a.shape
    assert engine.explain_calls == calls + 1  # one pass for the upload; the clicks only rendered

    # nothing the page loaded came from anywhere but this server
    origin = app.url.rstrip("/")
    assert all(u.startswith(origin + "/") for u in page_resources(browser)), page_resources(browser)


def test_bad_upload_shows_a_message_and_the_page_keeps_working(browser, app, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app.url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button[data-example]"), "the examples")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    text = wait(browser, lambda d: d.find_element(By.ID, "message").is_displayed()
                and d.find_element(By.ID, "message").text, "the error message")
    assert "cannot read 'notes.png'" in text and "not a recognised image format" in text
    browser.find_element(By.CSS_SELECTOR, "#examples button[data-example=coffee]").click()
    top = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions button[data-target]"), "predictions")
    wait_overlay(browser, f"vanilla:{top[0].get_attribute('data-target')}")
    assert not browser.find_element(By.ID, "message").is_displayed()


def test_concept_and_variants_in_the_browser(browser, app, tmp_path):
    import urllib.request

    from selenium.webdriver.common.by import By

    browser.get(app.url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button[data-example]"), "the examples")
    browser.find_element(By.ID, "file").send_keys(str(_digit_png(tmp_path / "seven.png", 7)))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions button[data-target]"), "predictions")
    examples = [str(_digit_png(tmp_path / f"zero{i}.png", i)) for i in (0, 10)]
    browser.find_element(By.ID, "concept-name").send_keys("zeros")
    browser.find_element(By.ID, "concept-files").send_keys("\n".join(examples))
    browser.find_element(By.ID, "concept-add").click()
    concept = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#concepts button[data-target]"), "concept")
    target = concept[0].get_attribute("data-target")
    assert concept[0].text == "zeros"
    wait_overlay(browser, f"vanilla:{target}")
    vanilla = pixels(browser, "overlay")
    assert "concept: zeros" in browser.find_element(By.ID, "overlay-caption").text
    browser.find_element(By.ID, "variant-integrated").click()
    wait_overlay(browser, f"integrated:{target}")
    integrated = pixels(browser, "overlay")
    assert np.abs(vanilla.astype(int) - integrated.astype(int)).mean() > 0.5
    # the download links serve the panel and the raw map of what is shown
    panel_href = browser.find_element(By.ID, "dl-panel").get_attribute("href")
    raw_href = browser.find_element(By.ID, "dl-raw").get_attribute("href")
    assert "variant=integrated" in raw_href and f"target={target}" in raw_href
    with urllib.request.urlopen(panel_href, timeout=60) as r:
        assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
    with urllib.request.urlopen(raw_href, timeout=60) as r, np.load(io.BytesIO(r.read()), allow_pickle=False) as z:
        assert str(z["variant"]) == "integrated" and str(z["label"]) == "concept: zeros"


# ----------------------------------------------------------------------------------------------------------------
# README screenshot (a run, not the test)
# ----------------------------------------------------------------------------------------------------------------


def screenshot(checkpoint: str, out: str, example: str | None = None, target_rank: int = 0) -> Path:
    """Start the demo on the checkpoint, pick an example, click a class, save a PNG of the whole page."""
    from selenium.webdriver.common.by import By

    from cdam_pl.app import make_server
    from cdam_pl.viz import save_png

    server = make_server(checkpoint, 0, quiet=True).start()
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(profile, 1280, 900)
        try:
            driver.get(server.url)
            thumbs = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button[data-example]"),
                          "the examples")
            pick = next((t for t in thumbs if t.get_attribute("data-example") == example), thumbs[0])
            pick.click()
            buttons = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions button[data-target]"),
                           "predictions")
            button = buttons[min(target_rank, len(buttons) - 1)]
            button.click()
            wait_overlay(driver, f"vanilla:{button.get_attribute('data-target')}")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, height + 140)  # the window includes a little browser chrome
            wait_overlay(driver, f"vanilla:{button.get_attribute('data-target')}")
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            server.close()
    return save_png(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), out)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Save a screenshot of the web demo for the README.")
    p.add_argument("checkpoint")
    p.add_argument("out", nargs="?", default="docs/web_demo.png")
    p.add_argument("--example", default=None, help="example id to pick (default: the first thumbnail)")
    p.add_argument("--rank", type=int, default=0, help="which of the top-5 classes to click (0 = top-1)")
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when cdam_pl is not installed
    print(screenshot(a.checkpoint, a.out, a.example, a.rank))
