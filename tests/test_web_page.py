"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

The app (the same FastAPI app Serve runs) is served by uvicorn on 127.0.0.1 over a tiny
faceted index. The browser loads the page, picks a time on a track's waveform, searches with
a facet weight, sees results with explanations and plays a hit from its timestamp; then
searches by uploading a file and by recording from Chromium's fake microphone.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
import soundfile as sf
from helpers import publish_audio_index, tiny_config, track_audio

from mess_ray.facets import make_layout
from mess_ray.serve import SearchService, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("web")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0
    publish_audio_index(cfg, root / "audio", facet_layout=make_layout(32, 8))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(SearchService.from_config(cfg)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        "--autoplay-policy=no-user-gesture-required",
        # A fake microphone (a beep) and auto-accepted permission for the Record button.
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


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
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
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
    _wait(browser, lambda d: len(_hits(d)) > 0)
    hits = _hits(browser)
    assert len(hits) == 10 and all(
        h["track"] != "track0" for h in hits
    )  # "other recordings only" is on
    assert "tempo and rubato: onsets" in hits[0]["why"] and " vs " in hits[0]["why"]
    assert "index v" in browser.find_element(By.ID, "status").text

    # Play the first hit: the player loads /audio/<track> and seeks to the hit's start.
    browser.find_elements(By.CSS_SELECTOR, "#results li.hit button.play")[0].click()
    _wait(
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
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    browser.find_element(By.ID, "tab-upload").click()
    browser.find_element(By.ID, "file").send_keys(str(clip))
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("3")
    browser.find_element(By.ID, "search-upload").click()
    _wait(browser, lambda d: len(_hits(d)) > 0)
    hits = _hits(browser)
    assert len(hits) == 3 and hits[0]["track"] == "track2" and "dynamics" in hits[0]["why"]

    # A filter nothing matches gives an empty list (not the previous results).
    _fresh_results(browser)
    browser.find_element(By.ID, "composer").send_keys("Mozart")
    browser.find_element(By.ID, "search-upload").click()
    _wait(browser, lambda d: "passages" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").text.startswith("0 passages")


def test_search_by_recording(browser, base_url):
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    browser.find_element(By.ID, "tab-record").click()
    browser.find_element(By.ID, "record").click()
    _wait(
        browser, lambda d: d.find_element(By.ID, "record-status").text == "recording…", timeout=20
    )
    time.sleep(2.5)
    browser.find_element(By.ID, "stop").click()
    _wait(
        browser,
        lambda d: (
            len(_hits(d)) > 0 or "error" in d.find_element(By.ID, "status").get_attribute("class")
        ),
    )
    assert browser.find_element(By.ID, "record-status").text.startswith("recorded ")
    assert len(_hits(browser)) == 10, browser.find_element(By.ID, "status").text
