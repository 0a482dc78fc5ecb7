"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

The app (the same FastAPI app Serve runs) is served by uvicorn on 127.0.0.1 over a tiny
faceted index. The browser loads the page, picks a time on a track's waveform, searches with
a facet weight, sees results with explanations and plays a hit from its timestamp; then
searches by uploading a file and by recording from Chromium's fake microphone.
"""

from __future__ import annotations

import time

import pytest
import soundfile as sf
from helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    publish_audio_index,
    serve_app_in_thread,
    tiny_config,
    track_audio,
    wait_for,
)

from mess_ray.facets import make_layout

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)",
    ),
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0
    publish_audio_index(cfg, root / "audio", facet_layout=make_layout(32, 8))
    with serve_app_in_thread(cfg) as url:
        yield url


def _hits(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results li.hit')].map(li => ({track: li.dataset.trackId,"
        " start: Number(li.dataset.startS), why: li.querySelector('ul.why') ? li.querySelector('ul.why').innerText : ''}))"
    )


def _fresh_results(driver) -> None:
    driver.execute_script(
        "document.getElementById('results').replaceChildren();"
        "document.getElementById('status').textContent = '';"
    )


def test_search_by_track_time_on_the_waveform_and_play_a_hit(browser, base_url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert (
        browser.execute_script("return document.getElementById('waveform').dataset.ready")
        == "track0"
    )
    tempo = browser.find_element(By.ID, "w-tempo")
    assert tempo.is_enabled()  # the index is faceted: sliders are live

    # Click the middle of the waveform: start = half of the 6 s track.
    canvas = browser.find_element(By.ID, "waveform")
    ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).click().perform()
    start = float(browser.find_element(By.ID, "start").get_attribute("value"))
    assert 2.7 <= start <= 3.3, start
    browser.execute_script("document.getElementById('w-tempo').value = 1;")
    browser.find_element(By.ID, "search-track").click()
    wait_for(browser, lambda d: len(_hits(d)) > 0)
    hits = _hits(browser)
    assert len(hits) == 10 and all(
        h["track"] != "track0" for h in hits
    )  # "other recordings only" is on
    assert "tempo and rubato: onsets" in hits[0]["why"] and " vs " in hits[0]["why"]
    assert "index v" in browser.find_element(By.ID, "status").text

    # Play the first hit: the player loads /audio/<track> and seeks to the hit's start.
    browser.find_elements(By.CSS_SELECTOR, "#results li.hit button.play")[0].click()
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
    assert f"/audio/{hits[0]['track']}" in src
    assert position >= hits[0]["start"] - 0.05, (position, hits[0]["start"])


def test_search_by_upload(browser, base_url, tmp_path):
    from selenium.webdriver.common.by import By

    clip = tmp_path / "clip.wav"
    sf.write(clip, track_audio(2, 16000)[8000:40000], 16000)
    browser.get(base_url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    browser.find_element(By.ID, "tab-upload").click()
    browser.find_element(By.ID, "file").send_keys(str(clip))
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("3")
    browser.find_element(By.ID, "search-upload").click()
    wait_for(browser, lambda d: len(_hits(d)) > 0)
    hits = _hits(browser)
    assert len(hits) == 3 and hits[0]["track"] == "track2" and "dynamics" in hits[0]["why"]

    # A filter nothing matches gives an empty list (not the previous results).
    _fresh_results(browser)
    browser.find_element(By.ID, "composer").send_keys("Mozart")
    browser.find_element(By.ID, "search-upload").click()
    wait_for(browser, lambda d: "passages" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").text.startswith("0 passages")


def test_search_by_recording(browser, base_url):
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    browser.find_element(By.ID, "tab-record").click()
    browser.find_element(By.ID, "record").click()
    wait_for(
        browser, lambda d: d.find_element(By.ID, "record-status").text == "recording…", timeout=20
    )
    time.sleep(2.5)
    browser.find_element(By.ID, "stop").click()
    wait_for(
        browser,
        lambda d: (
            len(_hits(d)) > 0 or "error" in d.find_element(By.ID, "status").get_attribute("class")
        ),
    )
    assert browser.find_element(By.ID, "record-status").text.startswith("recorded ")
    assert len(_hits(browser)) == 10, browser.find_element(By.ID, "status").text


# -- as a person sees it: phone and desktop widths, states, keyboard ---------------------------
SCREENS = {"phone": (390, 844), "desktop": (1366, 900)}
LONG_TITLE = "Sonata " + "quasi una fantasia " * 8 + "Op.27No.2" + "_x" * 40


def _screenshot(driver, tmp_path, name: str) -> None:
    """Saved beside the test (and to $MESS_RAY_SCREENSHOTS when set, to look at them)."""
    import os

    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    if os.environ.get("MESS_RAY_SCREENSHOTS"):
        driver.save_screenshot(os.path.join(os.environ["MESS_RAY_SCREENSHOTS"], f"{name}.png"))


def _no_horizontal_overflow(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"
    )


@pytest.mark.parametrize("screen", list(SCREENS))
def test_page_at_phone_and_desktop_width_states_and_long_titles(
    browser, base_url, tmp_path, screen
):
    from selenium.webdriver.common.by import By

    browser.set_window_size(*SCREENS[screen])
    try:
        browser.get(base_url + "/")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        # Empty state: says what to do; the status says what is loaded.
        empty = browser.find_element(By.ID, "empty")
        assert empty.is_displayed() and "No search yet" in empty.text and "Search" in empty.text
        assert "3 recordings indexed" in browser.find_element(By.ID, "status").text
        assert _no_horizontal_overflow(browser)
        # On a phone the options start folded (results follow the query); open on a desktop.
        folded = not browser.find_element(By.ID, "k").is_displayed()
        assert folded == (screen == "phone")
        _screenshot(browser, tmp_path, f"{screen}-empty")

        # Results, with a hit whose title and track id are very long: nothing overflows.
        browser.find_element(By.ID, "search-track").click()
        wait_for(browser, lambda d: len(_hits(d)) > 0)
        assert not browser.find_element(By.ID, "empty").is_displayed()
        pct = browser.find_elements(By.CSS_SELECTOR, "#results li.hit .pct")[0].text
        assert "percentile" in pct and "closest in " in pct
        browser.execute_script(
            "const li = document.querySelector('#results li.hit');"
            "li.querySelector('strong').textContent = arguments[0];"
            "li.querySelector('.meta').textContent = arguments[0].replaceAll(' ', '_');",
            LONG_TITLE,
        )
        assert _no_horizontal_overflow(browser)
        widths = browser.execute_script(
            "const li = document.querySelector('#results li.hit');"
            "return [li.getBoundingClientRect().right, document.documentElement.clientWidth]"
        )
        assert widths[0] <= widths[1] + 1, widths
        browser.execute_script("document.getElementById('status').scrollIntoView()")
        _screenshot(browser, tmp_path, f"{screen}-results")

        # Loading: a search that has not answered yet shows a busy status and disables Search.
        browser.execute_script("window.fetch = () => new Promise(() => {});")
        browser.find_element(By.ID, "search-track").click()
        status = browser.find_element(By.ID, "status")
        assert status.get_attribute("class") == "loading" and "searching" in status.text
        assert not browser.find_element(By.ID, "search-track").is_enabled()
        _screenshot(browser, tmp_path, f"{screen}-loading")

        # Error: a failed request says so, as an alert, and clears stale results.
        browser.get(base_url + "/")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        browser.execute_script("window.fetch = () => Promise.reject(new Error('network down'));")
        browser.find_element(By.ID, "search-track").click()
        wait_for(
            browser, lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class")
        )
        status = browser.find_element(By.ID, "status")
        assert status.text.startswith("Search failed: network down")
        assert status.get_attribute("role") == "alert" and not _hits(browser)
        assert browser.find_element(By.ID, "search-track").is_enabled()
        assert "did not complete" in browser.find_element(By.ID, "empty").text
        browser.execute_script("document.getElementById('status').scrollIntoView()")
        _screenshot(browser, tmp_path, f"{screen}-error")
    finally:
        browser.set_window_size(1200, 1000)


def test_page_works_from_the_keyboard(browser, base_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(base_url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    # Every control is reachable with Tab, in order, starting with the tabs.
    focusable = browser.execute_script(
        "return [...document.querySelectorAll('button, input, select, canvas[tabindex]')]"
        ".filter(e => !e.disabled && e.offsetParent !== null && e.tabIndex >= 0).map(e => e.id)"
    )
    assert {"tab-track", "tab-upload", "tab-record", "track", "start", "search-track"} <= set(
        focusable
    )
    assert "waveform" in focusable and "k" in focusable and "performer" in focusable
    # Arrow keys on the waveform move the start time; Enter there searches.
    canvas = browser.find_element(By.ID, "waveform")
    canvas.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert float(browser.find_element(By.ID, "start").get_attribute("value")) == 1.0
    canvas.send_keys(Keys.ENTER)
    wait_for(browser, lambda d: len(_hits(d)) > 0)
    # Enter in a field submits too: fewer results from the options row.
    _fresh_results(browser)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("4", Keys.ENTER)
    wait_for(browser, lambda d: len(_hits(d)) > 0)
    assert len(_hits(browser)) == 4
    # A filter that matches nothing: an empty state that says what to change.
    _fresh_results(browser)
    browser.find_element(By.ID, "title").send_keys("Nobody Atall", Keys.ENTER)
    wait_for(browser, lambda d: "0 passages" in d.find_element(By.ID, "status").text)
    assert "Loosen the filters" in browser.find_element(By.ID, "empty").text
