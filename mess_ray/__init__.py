"""mess-ray: expressive music similarity search on Ray."""

import os as _os

__version__ = "0.1.0"

# Ray reads these when it is imported, so they are set before anything imports ray. Without
# a cluster address, an embedded Ray must bind loopback only and needs no auth token; jobs
# started by `ray job submit` get RAY_ADDRESS and keep whatever the cluster was started with.
LOOPBACK_DEFAULTED = False
if not _os.environ.get("RAY_ADDRESS") and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in _os.environ:
    _os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    LOOPBACK_DEFAULTED = True
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_AUTH_MODE", "disabled")
