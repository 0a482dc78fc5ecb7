"""The quiet console: one progress bar and one summary line per stage; everything else to a log.

At the default level :func:`quiet_console` redirects the process's stdout and stderr *file
descriptors* to ``<storage root>/logs/mess-ray-<time>.log``: Ray's C++ core (``core_worker.cc``
lines), Ray Train's reports, Ray Data's execution logs, worker output forwarded to the driver
and every library logger land there, whoever writes them. What the user sees goes through
:func:`say` (summary lines, results) and :func:`stage` / :func:`progress_handle` (tqdm bars) to
the original terminal. ``--verbose`` leaves the descriptors alone and logs at DEBUG.

Progress crosses process boundaries through a small Ray actor (:class:`_Progress`): training
workers and stage tasks call ``handle.update.remote(...)`` (fire and forget), the driver polls it
from a thread and redraws the bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_state: dict[str, Any] = {"out": None, "log_path": None, "quiet": False}


def say(*parts: Any) -> None:
    """Print to the user's terminal (also when stdout is redirected to the log)."""
    out: TextIO = _state["out"] or sys.stdout
    print(*parts, file=out, flush=True)


def is_quiet() -> bool:
    return bool(_state["quiet"])


def log_path() -> str | None:
    return _state["log_path"]


def _log_folder(storage_root: str) -> Path:
    """``<root>/logs`` for a local store; a local folder beside the working directory otherwise."""
    if "://" in storage_root and not storage_root.startswith("file://"):
        return Path.cwd() / "mess-ray-logs"
    return Path(storage_root.removeprefix("file://")) / "logs"


@contextlib.contextmanager
def quiet_console(storage_root: str, verbose: bool = False) -> Iterator[str | None]:
    """Route everything but :func:`say` and progress bars to a log file (not when ``verbose``).

    Yields the log file's path (None when verbose).
    """
    if verbose or _state["quiet"]:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        yield _state["log_path"]
        return
    folder = _log_folder(storage_root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mess-ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # fd 2: the log file
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _state.update(out=terminal, err=terminal_err, log_path=str(path), quiet=True)
    say(f"full log: {path}")
    try:
        yield str(path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        root.removeHandler(handler)
        terminal.close()
        terminal_err.close()
        _state.update(out=None, err=None, log_path=None, quiet=False)


def error(message: str) -> None:
    """An error for the user: to the terminal's stderr, with the log's path when there is one."""
    err: TextIO = _state.get("err") or sys.stderr
    where = f" (full log: {_state['log_path']})" if _state["log_path"] else ""
    print(f"mess-ray: error: {message}{where}", file=err, flush=True)


# -- progress ---------------------------------------------------------------------------------
def _bar(desc: str, total: int | None, unit: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_state.get("err") or sys.stderr,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5,
        # No total (yet): a running clock; set when the stage reports its total.
        bar_format=None if total else "{desc} running {elapsed}{postfix}",
    )


def _progress_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class _Progress:
        """Latest progress of a stage: a count, an optional total and a few named values."""

        def __init__(self) -> None:
            self.n, self.total, self.values = 0, None, {}

        def update(self, n: int | None = None, add: int = 0, total: int | None = None, **values):
            if n is not None:
                self.n = int(n)
            self.n += int(add)
            if total is not None:
                self.total = int(total)
            self.values.update(values)

        def get(self) -> tuple[int, int | None, dict]:
            return self.n, self.total, self.values

    return _Progress


class Stage:
    """One stage on the console: a live bar while it runs, one summary line when it ends."""

    def __init__(self, name: str, total: int | None, unit: str) -> None:
        self.name, self.unit = name, unit
        self.handle = None
        self.summary: str | None = None
        self._total = total
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def start(self) -> Stage:
        if not is_quiet():
            return self
        import ray

        if ray.is_initialized():
            self.handle = _progress_actor_class().remote()
        self._bar = _bar(f"[{self.name}]", self._total, self.unit)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(0.5):
            try:
                if self.handle is not None:
                    n, total, values = ray.get(self.handle.get.remote(), timeout=5)
                    self._draw(n, total, values)
                else:
                    self._bar.refresh()
            except Exception:  # a dying actor at shutdown: the bar just stops updating
                pass

    def _draw(self, n: int, total: int | None, values: dict) -> None:
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
            bar.bar_format = None
        if n != bar.n:
            bar.update(n - bar.n)
        if values:
            bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                refresh=False,
            )
        bar.refresh()

    def stop(self, ok: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=6)
        if self._bar is not None:
            if ok and self.handle is not None:
                with contextlib.suppress(Exception):
                    import ray

                    self._draw(*ray.get(self.handle.get.remote(), timeout=5))
            self._bar.close()
        if self.handle is not None:
            with contextlib.suppress(Exception):
                import ray

                ray.kill(self.handle)
            self.handle = None
        if ok and self.summary:
            say(f"[{self.name}] {self.summary}")


_current: list[Stage] = []


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "it") -> Iterator[Stage]:
    """``with stage("ingest") as s: ...; s.summary = "..."``: a bar while running, then the summary.

    Code below the stage reaches the bar's actor through :func:`progress_handle`.
    """
    current = Stage(name, total, unit).start()
    _current.append(current)
    ok = False
    try:
        yield current
        ok = True
    finally:
        _current.remove(current)
        current.stop(ok)


def progress_handle():
    """The innermost running stage's progress actor (None when quiet mode or Ray is off):
    pass it to workers, which call ``handle.update.remote(n=..., total=..., loss=...)``."""
    return _current[-1].handle if _current else None


STAGE_UNITS = {"pretrain": "step", "finetune": "step", "ingest": "file", "index": "segment"}


def summary_line(name: str, manifest: dict[str, Any], seconds: float) -> str:
    """The one line a finished stage leaves on the console."""
    counts = manifest.get("counts") or {}
    shown = {
        k: v
        for k, v in counts.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("excluded")
    }
    keys = list(shown)[:5]
    text = ", ".join(f"{k} {shown[k]}" for k in keys)
    losses = manifest.get("losses") or {}
    if losses.get("last") is not None:
        text += f", loss {losses['first']:.4g} -> {losses['last']:.4g}"
    if manifest.get("headline"):
        text = str(manifest["headline"])
    return f"done in {seconds:.1f} s, version {manifest.get('version')}: {text}"


def report(handle, **kwargs: Any) -> None:
    """Fire-and-forget progress update from any process (no-op without a handle)."""
    if handle is not None:
        with contextlib.suppress(Exception):
            handle.update.remote(**kwargs)
