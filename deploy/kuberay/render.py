"""Render the KubeRay manifests in this folder from one template (`python deploy/kuberay/render.py`).

One RayJob per batch stage of the stage registry (``mess_ray.stages``; ``rayjob-<job>.yaml``), a RayCronJob that runs the reindex job on a
schedule (``raycronjob-reindex.yaml``, KubeRay >= 1.6, alpha) and a RayService for the search
service (``rayservice.yaml``, its ``serveConfigV2`` is the repository's ``serve_config.yaml``).
Every Ray cluster has the same shape as ``cluster.yaml``: a head that runs no work
(``num-cpus: 0``), an autoscaled CPU worker group (spot nodes) and an autoscaled GPU group,
both from 0 pods, so a job only gets the pods it asks Ray for.

The committed files are this script's output (tests/test_kuberay.py checks it): edit the
template here, then re-run the script. ``--check`` exits 1 if a committed file differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from mess_ray.stages import BATCH_STAGES, STAGES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
API_VERSION = "ray.io/v1"
APP_DIR = "/home/ray/mess-ray"  # WORKDIR of deploy/Dockerfile
IMAGE = "REGISTRY/mess-ray:0.1.0"  # built from deploy/Dockerfile; replace REGISTRY
CONFIG = f"{APP_DIR}/configs/cluster.yaml"
SERVICE_ACCOUNT = "mess-ray"  # annotated with an IAM role for S3 (IRSA / Pod Identity)
REINDEX_SCHEDULE = "0 * * * *"  # hourly: new recordings under ingest.source get indexed

# Per batch job: what it needs from the cluster (GPU workers at most; 0 keeps the group off),
# from the stage registry.
BATCH_JOBS = {
    name: {
        "gpu_max": STAGES[name].resources.gpu_max,
        "cpu_max": STAGES[name].resources.cpu_max,
        "deadline_s": STAGES[name].resources.deadline_s,
    }
    for name in BATCH_STAGES
}


def ray_version_from_lock(lock: Path = REPO / "requirements.lock") -> str:
    match = re.search(r"^ray==([0-9.]+)$", lock.read_text(), re.MULTILINE)
    if not match:
        raise ValueError(f"{lock} pins no ray version")
    return match.group(1)


def _env() -> list[dict]:
    # Credentials come from the service account's IAM role; nothing secret is in a manifest.
    return [
        {"name": "RAY_TRAIN_V2_ENABLED", "value": "1"},
        {"name": "AWS_DEFAULT_REGION", "value": "us-west-2"},
    ]


def _container(
    name: str, cpu: str, memory: str, gpus: int = 0, ports: list[dict] | None = None
) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    container = {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(),
        "resources": {"requests": dict(limits), "limits": limits},
        # Ray's object store lives in shared memory.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _pod(
    container: dict, node_selector: dict | None = None, tolerations: list | None = None
) -> dict:
    spec = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    if tolerations:
        spec["tolerations"] = tolerations
    return {"spec": spec}


def ray_cluster_spec(ray_version: str, cpu_max: int, gpu_max: int) -> dict:
    """Head with 0 CPUs for Ray (it schedules, it does not work) + autoscaled worker groups."""
    head_ports = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
    ]
    groups = [
        {
            # Decoding, rendering and index shards: cheap CPU cores on spot nodes (jobs resume).
            "groupName": "cpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": cpu_max,
            "rayStartParams": {},
            "template": _pod(
                _container("ray-worker", "30", "60Gi"),
                node_selector={"karpenter.sh/capacity-type": "spot"},
            ),
        }
    ]
    if gpu_max:
        groups.append(
            {
                # Training and embedding: 4 x L40S per pod (g6e.12xlarge), as in cluster.yaml.
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": gpu_max,
                "rayStartParams": {},
                "template": _pod(
                    _container("ray-worker", "46", "360Gi", gpus=4),
                    node_selector={"node.kubernetes.io/instance-type": "g6e.12xlarge"},
                    tolerations=[
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                ),
            }
        )
    return {
        "rayVersion": ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(_container("ray-head", "8", "32Gi", ports=head_ports)),
        },
        "workerGroupSpecs": groups,
    }


def entrypoint(job: str) -> str:
    return f"python {APP_DIR}/jobs/{job}.py --config {CONFIG}"


def rayjob_spec(job: str, ray_version: str) -> dict:
    needs = BATCH_JOBS[job]
    return {
        "entrypoint": entrypoint(job),
        "submissionMode": "K8sJobMode",
        # A failed attempt is submitted again on a fresh cluster: every job resumes from what is
        # already in storage (README, "Re-running after a crash").
        "backoffLimit": 2,
        "activeDeadlineSeconds": needs["deadline_s"],
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "rayClusterSpec": ray_cluster_spec(ray_version, needs["cpu_max"], needs["gpu_max"]),
    }


def rayjob(job: str, ray_version: str) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": f"mess-ray-{job}", "labels": {"app": "mess-ray", "mess-ray/job": job}},
        "spec": rayjob_spec(job, ray_version),
    }


def raycronjob_reindex(ray_version: str) -> dict:
    """Each scheduled run: an incremental ingest (only new or changed recordings are decoded),
    then a reindex (only segments missing from the latest index are embedded)."""
    spec = rayjob_spec("reindex", ray_version)
    spec["entrypoint"] = f"{entrypoint('ingest')} && {entrypoint('reindex')}"
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCronJob",
        "metadata": {
            "name": "mess-ray-reindex",
            "labels": {"app": "mess-ray", "mess-ray/job": "reindex"},
        },
        "spec": {"schedule": REINDEX_SCHEDULE, "jobTemplate": spec},
    }


def rayservice(ray_version: str, serve_config: Path = REPO / "serve_config.yaml") -> dict:
    serve = yaml.safe_load(serve_config.read_text())
    # serve_config.yaml binds loopback; in a pod the proxy must listen on the pod's address
    # for the Kubernetes Service to reach it. Who can reach that is the Service's type
    # (ClusterIP: inside the cluster only) and a NetworkPolicy, plus serve.api_key.
    serve["http_options"]["host"] = "0.0.0.0"
    for app in serve["applications"]:
        # The app's config path, relative in serve_config.yaml, is the image's copy.
        config = app.get("args", {}).get("config")
        if config and not config.startswith("/"):
            app["args"]["config"] = f"{APP_DIR}/{config}"
    cluster = ray_cluster_spec(ray_version, cpu_max=8, gpu_max=2)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": {"name": "mess-ray-search", "labels": {"app": "mess-ray"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in the manifest."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    )


_Dumper.add_representer(str, _str)

HEADER = "# Generated by deploy/kuberay/render.py from one template: edit that, then re-run it.\n"


def render_all() -> dict[str, str]:
    version = ray_version_from_lock()
    docs = {f"rayjob-{job}.yaml": rayjob(job, version) for job in BATCH_JOBS}
    docs["raycronjob-reindex.yaml"] = raycronjob_reindex(version)
    docs["rayservice.yaml"] = rayservice(version)
    return {
        name: HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False) for name, doc in docs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed manifest differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale manifests (run python deploy/kuberay/render.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
