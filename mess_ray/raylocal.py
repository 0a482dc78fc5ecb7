"""Connect to a Ray cluster, or start an embedded local one bound to loopback."""

from __future__ import annotations

import logging
import os
import sys

import ray

from mess_ray.config import RayConfig

log = logging.getLogger(__name__)

# Environment every process of an embedded cluster must share: bind Ray to loopback and
# turn off token auth (there is no network to defend on one machine).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # also set by mess_ray/__init__ before ray is imported
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Forwarded to workers so they reach the same object store as the driver: where it is and
# how to find credentials, never the credentials themselves. Ray writes a job's runtime_env
# verbatim into its session logs (runtime_env_agent.log, world-readable), so secrets
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) must not travel this way.
# Locally, workers are children of the raylet this process starts and inherit its
# environment (credentials included); on a cluster, nodes get them from the instance profile
# / IRSA service account or an on-disk credentials file (AWS_SHARED_CREDENTIALS_FILE names
# a path, not a secret). An S3-compatible store (MinIO, moto) needs the endpoint on every
# node, and the region and metadata switch are not secret either.
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process: the configured cluster, or a local one."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    # Ray Data redraws its progress bars many times a second: on a terminal that is a live
    # display, in a log file (CI, `ray job logs`) thousands of lines. Keep them for terminals.
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster needs routable node addresses: undo the loopback default that importing
        # mess_ray set (an explicit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER from the user is kept).
        from ray._private import ray_constants

        import mess_ray

        if mess_ray.LOOPBACK_DEFAULTED:
            ray_constants.ENABLE_RAY_CLUSTER = True
        ray.init(address=address, runtime_env={"env_vars": forwarded}, log_to_driver=True)
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    # Several logical CPUs per core: stages use fractional CPUs and Ray Train's controller,
    # Ray Data's operators and Serve's proxy must all fit at once on a 2-core machine.
    num_cpus = cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    log.info("starting embedded local Ray with %d logical CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {**forwarded, **{k: os.environ[k] for k in LOCAL_ENV}}},
        configure_logging=True,
        log_to_driver=True,
    )


def shutdown_ray(stop_serve: bool = False) -> None:
    """Disconnect from Ray (an embedded Ray stops with it); ``stop_serve`` first stops the Serve
    applications this process started (their shutdown chatter then lands where output goes now)."""
    if not ray.is_initialized():
        return
    if stop_serve:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # Serve never started or is already gone
            pass
    ray.shutdown()
