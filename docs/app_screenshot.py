"""Make docs/app.png: the web app on the demo checkpoint, in headless Chromium, after a restore.

    .venv/bin/python docs/app_screenshot.py [--out docs/app.png]

Starts `diffrestorer-app` on the shipped demo checkpoint (its own settings: 10 DDIM steps) on a free
loopback port, adds the held-out photo 'rocket' degraded with rain and 'coffee' with noise from the
page's "first try" row, restores them, and saves the window. Needs Debian's chromium and
chromium-driver and selenium (the test extra), like tests/test_app_browser.py.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "app.png"))
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=1400)
    args = p.parse_args()
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")
    server = subprocess.Popen([sys.executable, "-m", "diffrestorer_jax.cli.app", "--checkpoint",
                               os.path.join(ROOT, "demo", "checkpoint"), "--port", "0", "--batch-size", "2"],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    url = server.stdout.readline().split()[-1]
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
              f"--window-size={args.width},{args.height}"):
        options.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        d.get(url)
        wait = WebDriverWait(d, 600)
        wait.until(lambda d: d.find_element(By.ID, "server-status").text == "ready")
        for photo, kind, strength in (("rocket", "rain", "1"), ("coffee", "noise", "0.6")):
            Select(d.find_element(By.ID, "photo")).select_by_value(photo)
            Select(d.find_element(By.ID, "degradation")).select_by_value(kind)
            d.execute_script("const s = document.getElementById('deg-strength'); s.value = arguments[0];"
                             "s.dispatchEvent(new Event('input'));", strength)
            n = len(d.find_elements(By.CSS_SELECTOR, "#inputs li"))
            d.find_element(By.ID, "add-sample").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#inputs li")) == n + 1)
        d.find_element(By.ID, "restore").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card img.restored")) == 2)
        time.sleep(2.5)  # the status line's next refresh
        d.execute_script("document.querySelector('.card .slider').value = 35;"
                         "document.querySelector('.card .slider').dispatchEvent(new Event('input'));")
        d.save_screenshot(args.out)
    finally:
        d.quit()
        server.terminate()
        server.wait()
    im = Image.open(args.out).convert("RGB")
    im.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
