"""The page in a real headless browser: Debian's Chromium, driven by selenium through chromium-driver.

Loads the page from the app on 127.0.0.1, uploads a photo (a held-out demo photo cropped to an odd
size) and adds a bundled photo degraded on the server, restores both, and checks that each restored
image is shown at its input's size with the degradation-type chart; a file that is not an image gets
its message on the page. Saves a screenshot. Skips, saying why, where Chromium is not installed
(`make test` installs it as root with apt-get), except in CI, which must run it.
"""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from app_helpers import start_warm

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _missing():
    try:
        import selenium  # noqa: F401  (only whether it imports)
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return f"{path} not found: apt-get install -y chromium chromium-driver (make test does as root)"
    return None


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    server = start_warm([], tmp_path_factory)
    yield server
    assert server.stop() == 0, "".join(server.stderr)


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_restore_and_see_the_result(app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffrestorer_jax.data.demo_photos import load_photo
    photo = load_photo("rocket")  # held out: never trained on
    h, w = 61, 57  # not the model's 64 x 64: padded to a bucket and cropped back
    upload = tmp_path / "rocket small.png"
    Image.fromarray((photo[::7, ::7][:h, :w] * 255).round().astype(np.uint8)).save(upload)
    assert Image.open(upload).size == (w, h)
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")

    d = browser
    wait = WebDriverWait(d, 300)
    d.get(app.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "server-status").text == "ready")
    d.find_element(By.ID, "files").send_keys(str(upload))
    d.find_element(By.ID, "add-sample").click()  # coffee, noise, strength 1: degraded by the server
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#inputs li")) == 2)
    d.find_element(By.ID, "restore").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card img.restored")) == 2)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"))

    cards = {c.get_attribute("data-name"): c for c in d.find_elements(By.CSS_SELECTOR, ".card")}
    assert set(cards) == {"rocket small.png", "coffee_noise_1_seed0.png"}
    for name, (ch, cw) in {"rocket small.png": (h, w), "coffee_noise_1_seed0.png": (64, 64)}.items():
        card = cards[name]
        sizes = d.execute_script(
            "return [...arguments[0].querySelectorAll('img')].map(i => [i.className, i.naturalHeight, i.naturalWidth])",
            card)
        assert sorted(sizes) == [["degraded", ch, cw], ["restored", ch, cw]], sizes
        bars = card.find_elements(By.CSS_SELECTOR, "svg.type-chart rect.bar")
        assert len(bars) == 8
        probs = [float(b.get_attribute("data-prob")) for b in bars]
        assert abs(sum(probs) - 1) < 1e-3
        assert len(card.find_elements(By.CSS_SELECTOR, "rect.bar.top")) == 1
        png = card.find_element(By.CSS_SELECTOR, "a.download-png")
        assert png.get_attribute("download").endswith("_restored.png")
        assert card.find_element(By.CSS_SELECTOR, "a.download-json").get_attribute("href").endswith("/sidecar.json")
    assert "2 of 2 restored" in d.find_element(By.ID, "progress-text").text
    assert d.find_element(By.ID, "download-all").is_displayed()
    d.save_screenshot(str(tmp_path / "app.png"))
    assert Image.open(tmp_path / "app.png").size[0] > 0

    # A file that is not an image: its message on the page, nothing restored, the page goes on.
    for li in d.find_elements(By.CSS_SELECTOR, "#inputs li button"):
        li.click()
    d.find_element(By.ID, "files").send_keys(str(bad))
    wait.until(lambda d: not d.find_element(By.ID, "restore").get_attribute("disabled"))
    d.find_element(By.ID, "restore").click()
    wait.until(lambda d: "notes.png" in d.find_element(By.ID, "messages").text)
    text = d.find_element(By.ID, "messages").text
    assert "no usable image" in text and "notes.png: not an image file" in text
    assert app.get("/api/status").json()["ready"]
