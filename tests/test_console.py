"""The quiet console: library and Ray output go to a log file, the user sees summaries and bars."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_script(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quiet_console_sends_low_level_output_to_the_log_and_keeps_summaries(tmp_path):
    root = tmp_path / "store"
    proc = run_script(
        f"""
        import logging, os, sys
        from mess_ray import console
        with console.quiet_console({str(root)!r}) as path:
            # What Ray's C++ core, Ray Train and libraries write, by every route:
            os.write(2, b"[2026] core_worker.cc:123: E Actor has max_restarts > 0\\n")
            os.write(1, b"TrainingReport(metrics={{'loss': 1.0}})\\n")
            print("a library print")
            print("a library warning", file=sys.stderr)
            logging.getLogger("ray.serve").warning("ServeController.graceful_shutdown failed")
            with console.stage("ingest") as shown:
                shown.summary = "3 files"
            console.say("the result table")
        print("after: back on the terminal")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    for noise in ("core_worker", "TrainingReport", "library print", "library warning", "graceful"):
        assert noise not in shown
    lines = proc.stdout.splitlines()
    log = Path(lines[0].removeprefix("full log: "))
    assert lines[0].startswith("full log: ") and log.parent == root / "logs"
    assert lines[1:] == ["[ingest] 3 files", "the result table", "after: back on the terminal"]
    text = log.read_text()
    for noise in ("core_worker", "TrainingReport", "library print", "library warning", "graceful"):
        assert noise in text


def test_verbose_console_leaves_output_alone(tmp_path):
    proc = run_script(
        f"""
        import os
        from mess_ray import console
        with console.quiet_console({str(tmp_path / "store")!r}, verbose=True) as path:
            assert path is None
            os.write(2, b"raw stderr line\\n")
            console.say("summary")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "raw stderr line" in proc.stderr and proc.stdout.strip() == "summary"
    assert not (tmp_path / "store" / "logs").exists()


def test_cli_error_is_one_line_with_the_log_path(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mess_ray.cli",
            "quickstart",
            "--audio",
            str(tmp_path / "missing"),
            "--set",
            f"storage.root={tmp_path / 'store'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith("full log: ")
    assert proc.stderr.strip().startswith("mess-ray: error: quickstart failed: FileNotFoundError")
    assert "Traceback" not in proc.stderr and "full log:" in proc.stderr
    log = Path(proc.stdout.splitlines()[0].removeprefix("full log: "))
    assert "Traceback" in log.read_text()
