"""Regenerate the dashboard screenshots in docs/images/ from a seeded database.

    SPECTRAL_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python -m tests.acceptance.dashboard_screenshot

Without SPECTRAL_TEST_DATABASE_URL it starts an embedded server, as the test suite does.
Needs chromium and chromium-driver (Debian packages).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.wait import WebDriverWait

from ..pg import Server
from .browser import chromium
from .dashboard import TOKEN, running, seed

DOCS = Path(__file__).parents[2] / "docs" / "images"
SIZES = {"dashboard.png": (1280, 900), "dashboard-phone.png": (390, 844)}


def main(out: Path = DOCS) -> list[Path]:
    server = Server()
    written = []
    try:
        url = server.fresh()
        seeded = seed(url)
        with tempfile.TemporaryDirectory() as cwd, running(url, Path(cwd), seeded.head) as (_, base):
            time.sleep(1.5)  # the first heartbeat and the listener's connection
            for name, (width, height) in SIZES.items():
                with chromium(width, height) as driver:
                    driver.get(base + "/ui/login")
                    driver.find_element(By.NAME, "token").send_keys(TOKEN)
                    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
                    WebDriverWait(driver, 15).until(
                        EC.presence_of_element_located((By.CSS_SELECTOR, "#outbox")))
                    full = driver.execute_script("return document.documentElement.scrollHeight")
                    driver.set_window_size(width, int(full) + 140)
                    out.mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(out / name))
                    written.append(out / name)
    finally:
        server.close()
    return written


if __name__ == "__main__":
    for path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS):
        print(path)
