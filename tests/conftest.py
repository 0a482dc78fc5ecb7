"""Shared fixtures: one embedded local Ray per test session, a real S3 endpoint on loopback."""

from __future__ import annotations

import os

# Before anything imports ray: loopback only, no auth, no usage reporting.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)
# Dummy credentials: the S3 endpoint is moto on 127.0.0.1, never AWS.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
# A distinctive secret: test_secrets_stay_out_of_ray_logs greps Ray's session logs for it.
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mess-ray-canary-secret-5f3a9c")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import pytest
from helpers import CHROMEDRIVER, CHROMIUM, free_port, tiny_config

from mess_ray.config import MessRayConfig


def pytest_collection_modifyitems(config, items):
    """Every test using the ray_local fixture is a ``ray`` test, and ``slow`` (it waits on Ray's
    scheduling; the session's Ray start alone takes seconds): ``pytest -m "not slow"`` skips them."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from mess_ray.raylocal import ensure_ray

    ensure_ray()
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on 127.0.0.1: a real S3 protocol endpoint (as s3fs tests do)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto endpoint; yields its s3:// URL."""
    import uuid

    import boto3

    name = f"mess-ray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture
def tiny_cfg(tmp_path) -> MessRayConfig:
    return tiny_config(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (Debian's chromium + chromium-driver); skips the
    module's browser tests where they are not installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)"
        )
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
