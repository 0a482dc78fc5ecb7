"""jobs/*.py run under `ray job submit` on a (local, loopback) Ray cluster, and as scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("[a-z]*.py")))
def test_job_scripts_show_help(job):
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "--config" in out and "--set" in out


@pytest.fixture(scope="module")
def ray_cluster():
    """A separate `ray start --head --block` cluster on loopback with a job server.

    It runs in its own process group and is stopped by signalling that group: `ray stop`
    would kill every Ray process on the machine, the test session's own Ray included.
    """
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # The job's `python` must be this environment's, as on a cluster node with the project
    # installed (CI runs .venv/bin/python without activating the venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Short path: Ray's unix sockets live under it and AF_UNIX paths are capped at 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    log = open(temp_dir / "ray-start.log", "w")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # Ports with fixed defaults, taken already by the test session's own embedded Ray.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ray head did not start: {(temp_dir / 'ray-start.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, job: str, config: Path) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's dashboard agent is still registering."""
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                f"--address={address}",
                "--working-dir",
                str(REPO),
                "--",
                "python",
                f"jobs/{job}.py",
                "--config",
                str(config),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_render_and_ingest(ray_cluster, tmp_path):
    address, env = ray_cluster
    root = tmp_path / "store"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"storage:\n  root: {root}\nrender:\n  num_pieces: 2\n  max_duration_s: 4\n"
        "audio:\n  window_s: 2.0\n  hop_s: 1.0\n"
    )
    for job in ("render", "ingest"):
        proc = submit(address, env, job, config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
    latest = (root / "ingest" / "LATEST").read_text()
    manifest = json.loads((root / "ingest" / latest / "manifest.json").read_text())
    assert manifest["counts"]["files_in"] == manifest["counts"]["files_segmented"] == 8
