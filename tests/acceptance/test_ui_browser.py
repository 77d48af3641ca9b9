"""The dashboard in a real headless Chromium against a real `spectral run`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.wait import WebDriverWait

from ..pg import query
from .browser import chromium
from .dashboard import TOKEN, running, seed


def text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text).strip()


def submit_and_wait_for(driver: WebDriver, button_css: str, css: str) -> str:
    """Click a form's button; once the next page shows ``css``, return its text.

    A click only starts the form's navigation: wait for the new page's element.
    """
    driver.find_element(By.CSS_SELECTOR, button_css).click()
    found = WebDriverWait(driver, 15).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
    return str(found.text).strip()


@pytest.mark.slow
def test_an_operator_logs_in_sees_the_numbers_and_requeues_a_dead_row_to_done(
    db_url: str, tmp_path: Path
) -> None:
    seeded = seed(db_url)
    target = seeded.dead_ids[0]
    with running(db_url, tmp_path, seeded.head) as (proc, base), chromium() as driver:
        driver.get(base + "/ui")
        assert driver.current_url == base + "/ui/login"
        driver.find_element(By.NAME, "token").send_keys("a-wrong-token-0123456789")
        assert "wrong token" in submit_and_wait_for(driver, "button[type=submit]", ".note")
        driver.find_element(By.NAME, "token").send_keys(TOKEN)
        submit_and_wait_for(driver, "button[type=submit]", "#outbox")
        assert driver.current_url == base + "/ui"

        # The seeded numbers, as the page shows them.
        for status, count in (("DONE", seeded.done), ("DEAD", seeded.dead),
                              ("PENDING", seeded.pending), ("CLAIMED", seeded.claimed)):
            assert text(driver, f'[data-total="{status}"]') == str(count), status
        for generation, counts in seeded.by_generation.items():
            for status, count in counts.items():
                css = f'#outbox tr[data-generation="{generation}"] td[data-status="{status}"]'
                assert text(driver, css) == str(count), (generation, status)
        assert text(driver, '#generations tr[data-generation="2"] .live-workers') == "1"
        assert text(driver, '#generations tr[data-generation="3"] .live-workers') == "1"
        assert "STALE" in text(driver, "#workers")
        assert f"{seeded.done} in all" in text(driver, "#throughput h2")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#throughput svg rect")) == 30
        assert driver.find_element(By.CSS_SELECTOR, '[data-verdict="stale_workers"]')
        assert "lost_wakeups" in text(driver, "#reconciler")

        flash = submit_and_wait_for(driver, f'button[data-requeue="{target}"]', ".flash")
        assert f"requeued event {target} (DEAD -> PENDING)" in flash
        proc.wait_for(f"ui action: requeued event {target}")
        deadline = time.monotonic() + 20
        while True:
            driver.get(base + "/ui")
            done = text(driver, '[data-total="DONE"]')
            if done == str(seeded.done + 1) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert done == str(seeded.done + 1), "the requeued row never reached DONE on the page"
        assert text(driver, '[data-total="DEAD"]') == str(seeded.dead - 1)
        assert not driver.find_elements(By.CSS_SELECTOR, f'tr[data-event="{target}"]')
        assert query(db_url, "SELECT status FROM core.outbox WHERE id = $1", target)[0]["status"] == "DONE"
        # The other DEAD row of the same topic was left alone.
        other = seeded.dead_ids[1]
        assert query(db_url, "SELECT status FROM core.outbox WHERE id = $1", other)[0]["status"] == "DEAD"
