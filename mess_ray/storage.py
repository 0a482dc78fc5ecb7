"""Storage root and versioned artifacts, the same for a local folder and s3://.

Every stage reads its inputs from and writes its outputs to the storage root as an
*artifact*: ``<root>/<stage>/<version>/`` holding the stage's files plus ``manifest.json``
(what produced it, from which inputs, counts). A version becomes visible only when
``<root>/<stage>/LATEST`` is rewritten to name it, which happens after every file and the
manifest are written, so readers never see a half-written artifact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

from mess_ray.config import StorageConfig

MANIFEST = "manifest.json"
LATEST = "LATEST"


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def make_filesystem(
    url: str, s3_endpoint_url: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the path inside it for a local path or any fsspec URL."""
    protocol = url.split("://", 1)[0] if _is_remote(url) else "file"
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # Listings must reflect what other workers just wrote (resume, incremental runs).
        options["use_listings_cache"] = False
    fs = fsspec.filesystem(protocol, **options)
    if protocol == "file":
        path = str(Path(url.removeprefix("file://")).expanduser().resolve())
    else:
        path = fs._strip_protocol(url)
    return fs, path


def resolve_endpoint(cfg: StorageConfig) -> StorageConfig:
    """``cfg`` with the S3 endpoint made explicit (from AWS_ENDPOINT_URL) for s3:// roots.

    Configs travel to Ray workers, whose environment may predate the driver's: an explicit
    endpoint in the config reaches every worker, an environment variable may not.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if cfg.s3_endpoint_url or not endpoint or not cfg.root.startswith(("s3://", "s3a://")):
        return cfg
    return cfg.model_copy(update={"s3_endpoint_url": endpoint})


@dataclass
class Storage:
    """A storage root: helpers to read and write files and artifacts under it."""

    root: str
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        # Resolve the endpoint on the driver and keep it on the object: Ray workers may have
        # been started before AWS_ENDPOINT_URL was set, and they receive this object pickled.
        if self.s3_endpoint_url is None and self.root.startswith(("s3://", "s3a://")):
            self.s3_endpoint_url = os.environ.get("AWS_ENDPOINT_URL")
        self.fs, self.base = make_filesystem(self.root, self.s3_endpoint_url)
        self.protocol = self.root.split("://", 1)[0] if _is_remote(self.root) else "file"
        if self.protocol == "file":
            os.makedirs(self.base, exist_ok=True)

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        return cls(cfg.root, cfg.s3_endpoint_url)

    def config(self) -> StorageConfig:
        return StorageConfig(root=self.root, s3_endpoint_url=self.s3_endpoint_url)

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Path inside ``self.fs`` (no protocol)."""
        return posixpath.join(self.base, *parts) if parts else self.base

    def url(self, *parts: str) -> str:
        """Full URL (with protocol for remote stores), usable by fsspec/soundfile/Ray."""
        p = self.path(*parts)
        return p if self.protocol == "file" else f"{self.protocol}://{p}"

    def pyarrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem over the same store, for Ray Data and Ray Train."""
        if self.protocol == "file":
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # -- files ---------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode and self.protocol == "file":
            self.fs.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        return self.fs.open(self.path(rel), mode)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel, "wb") as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel, "rb") as f:
            return f.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def put_file(self, local: str | Path, rel: str) -> None:
        if self.protocol == "file":
            dst = Path(self.path(rel))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dst)
        else:
            self.fs.put_file(str(local), self.path(rel))

    def put_dir(self, local: str | Path, rel: str) -> None:
        for src in sorted(Path(local).rglob("*")):
            if src.is_file():
                self.put_file(src, posixpath.join(rel, src.relative_to(local).as_posix()))

    def get_dir(self, rel: str, local: str | Path) -> Path:
        """Copy a folder of the store to a local folder (a no-op copy for local roots)."""
        local = Path(local)
        src = self.path(rel)
        for path in self.fs.find(src):
            dst = local / posixpath.relpath(path, src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(dst))
        return local

    @contextlib.contextmanager
    def local_dir(self, rel: str) -> Iterator[Path]:
        """A local folder with the contents of ``rel`` (the folder itself when local)."""
        if self.protocol == "file":
            yield Path(self.path(rel))
            return
        with tempfile.TemporaryDirectory(prefix="mess-ray-") as tmp:
            yield self.get_dir(rel, tmp)

    # -- artifacts -----------------------------------------------------------------------
    def latest(self, stage: str) -> str | None:
        """Version named by ``<stage>/LATEST``, or None when nothing is published."""
        rel = posixpath.join(stage, LATEST)
        if not self.exists(rel):
            return None
        return self.read_bytes(rel).decode().strip() or None

    def require_latest(self, stage: str) -> str:
        version = self.latest(stage)
        if version is None:
            raise FileNotFoundError(
                f"no published '{stage}' artifact under {self.root}: run `mess-ray {stage}` first"
            )
        return version

    def versions(self, stage: str) -> list[str]:
        """Published-or-not versions that carry a manifest, oldest first."""
        return [v for v in self.listdir(stage) if v != LATEST and self.exists(stage, v, MANIFEST)]

    def manifest(self, stage: str, version: str | None = None) -> dict[str, Any]:
        version = version or self.require_latest(stage)
        return self.read_json(posixpath.join(stage, version, MANIFEST))

    def publish(self, stage: str, version: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest, then point LATEST at the version (the commit point)."""
        full = {
            "stage": stage,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "host": socket.gethostname(),
            **manifest,
        }
        self.write_json(posixpath.join(stage, version, MANIFEST), full)
        # Write-then-rename keeps the pointer atomic on local disks; on S3 a PUT is atomic.
        if self.protocol == "file":
            tmp = self.path(stage, f".{LATEST}.{uuid.uuid4().hex}")
            Path(tmp).write_text(version)
            os.replace(tmp, self.path(stage, LATEST))
        else:
            self.write_bytes(posixpath.join(stage, LATEST), version.encode())
        return full


def new_version(prefix: str = "v") -> str:
    """Sortable, unique version name: UTC timestamp plus a short random suffix."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}{stamp}-{uuid.uuid4().hex[:6]}"
