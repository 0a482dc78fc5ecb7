"""The page's content view in headless Chromium: align a span of a track in every other
performance, overlay tempo and loudness curves, play a version from its aligned start."""

from __future__ import annotations

import pytest
from helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    publish_passages_index,
    serve_app_in_thread,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-passages")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0
    _, onsets = publish_passages_index(cfg, root)
    with serve_app_in_thread(cfg) as url:
        yield url, onsets


def _ink(driver, canvas_id: str) -> int:
    """Non-transparent pixels drawn on a canvas."""
    return driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;",
        canvas_id,
    )


def test_passage_overlay_and_playback_from_the_aligned_start(browser, served):  # noqa: F811
    from selenium.webdriver.common.by import By

    base_url, onsets = served
    browser.get(base_url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    start, end = onsets["anna"][8], onsets["anna"][28]
    browser.execute_script(
        "document.getElementById('track').value = 'anna';"
        "document.getElementById('start').value = arguments[0];"
        "document.getElementById('end').value = arguments[1];",
        f"{start:.2f}",
        f"{end:.2f}",
    )
    browser.find_element(By.ID, "passages-track").click()
    wait_for(
        browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#passages-list li.passage")) > 0
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#passages-list li.passage")
    tracks = [r.get_attribute("data-track-id") for r in rows]
    assert sorted(tracks) == ["ben", "cleo", "dan"]
    assert _ink(browser, "passages-tempo") > 500 and _ink(browser, "passages-loudness") > 500

    # Play the first version: the player seeks to its aligned start.
    rows[0].find_element(By.CSS_SELECTOR, "button.play-passage").click()
    wait_for(
        browser,
        lambda d: d.execute_script(
            "const p = document.getElementById('player'); return p.readyState >= 1 && !p.seeking"
        ),
        timeout=30,
    )
    src, position = browser.execute_script(
        "const p = document.getElementById('player'); return [p.currentSrc, p.currentTime]"
    )
    assert f"/audio/{tracks[0]}" in src
    assert abs(position - onsets[tracks[0]][8]) < 0.5, (position, onsets[tracks[0]][8])

    # An error path shows the API's sentence, not a broken chart.
    browser.execute_script(
        "document.getElementById('track').value = 'solo';"
        "document.getElementById('start').value = '1'; document.getElementById('end').value = '6';"
    )
    browser.find_element(By.ID, "passages-track").click()
    wait_for(browser, lambda d: "404" in d.find_element(By.ID, "status").text)
    assert "no other indexed performance" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "passages").is_displayed()
