"""deploy/kuberay: the KubeRay manifests are the renderer's output and agree with the repository."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
# Loaded by path under its own name: deploy/ is not a package and "render" is a common name.
_spec = importlib.util.spec_from_file_location("kuberay_render", KUBERAY / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

BATCH_JOBS = ["evaluate", "finetune", "index", "ingest", "pretrain", "reindex", "render"]


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def lock_ray_version() -> str:
    return re.search(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE).group(
        1
    )


def cluster_specs(doc: dict) -> dict:
    spec = doc["spec"]
    return (
        spec.get("rayClusterSpec")
        or spec.get("rayClusterConfig")
        or spec["jobTemplate"]["rayClusterSpec"]
    )


def test_committed_manifests_equal_the_rendered_ones():
    rendered = render.render_all()
    committed = {p.name for p in KUBERAY.glob("*.yaml")}
    assert committed == set(rendered), "run python deploy/kuberay/render.py"
    for name, text in rendered.items():
        assert (KUBERAY / name).read_text() == text, (
            f"{name} is stale: run python deploy/kuberay/render.py"
        )
    assert render.main(["--check"]) == 0


@pytest.mark.parametrize("job", BATCH_JOBS)
def test_a_rayjob_per_batch_job_runs_that_job_script(job):
    doc = load(f"rayjob-{job}.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{render.APP_DIR}/jobs/{job}.py"
    script = REPO / Path(argv[1]).relative_to(render.APP_DIR)
    assert script.is_file()
    config = REPO / Path(argv[argv.index("--config") + 1]).relative_to(render.APP_DIR)
    from mess_ray.config import load_config

    assert load_config(config).storage.root.startswith("s3://")
    # The cluster goes away with the job; a failed attempt is retried (the jobs resume).
    assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["backoffLimit"] >= 1


def test_gpu_groups_only_for_jobs_that_use_gpus():
    for job in BATCH_JOBS:
        groups = {
            g["groupName"]: g for g in cluster_specs(load(f"rayjob-{job}.yaml"))["workerGroupSpecs"]
        }
        assert "cpu" in groups
        assert ("gpu" in groups) == (job not in ("render", "ingest"))
        for group in groups.values():
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
        if "gpu" in groups:
            limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] >= 1


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(KUBERAY.glob("*.yaml"))]


def test_ray_versions_and_images_agree_with_the_lock_and_the_dockerfile():
    version = lock_ray_version()
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{version}-") and "ray-ml" not in base
    # cluster.yaml (VM launcher) runs the same Ray image.
    assert yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"] == base
    for name, doc in all_docs():
        cluster = cluster_specs(doc)
        assert cluster["rayVersion"] == version, name
        assert cluster["enableInTreeAutoscaling"] is True, name
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        pods = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                assert container["image"] == render.IMAGE, name


def test_rayservice_serve_config_is_serve_config_yaml_and_validates():
    from ray.serve.schema import ServeDeploySchema

    doc = load("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve)
    source = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app, source_app = schema.applications[0], source["applications"][0]
    assert app.import_path == source_app["import_path"]
    assert [d["name"] for d in serve["applications"][0]["deployments"]] == [
        d["name"] for d in source_app["deployments"]
    ]
    # The app's config is the image's copy of the repository's configs/cluster.yaml.
    config = Path(app.args["config"])
    assert (REPO / config.relative_to(render.APP_DIR)).is_file()
    module_name, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module_name), attr))


def test_reindex_runs_on_a_schedule_shorter_than_its_deadline():
    doc = load("raycronjob-reindex.yaml")
    assert doc["kind"] == "RayCronJob"
    fields = doc["spec"]["schedule"].split()
    assert len(fields) == 5 and fields[1:] == ["*", "*", "*", "*"] and fields[0].isdigit()
    template = doc["spec"]["jobTemplate"]
    # New recordings are ingested (incrementally) first, then only their segments embedded.
    steps = [shlex.split(part) for part in template["entrypoint"].split("&&")]
    assert [Path(argv[1]).name for argv in steps] == ["ingest.py", "reindex.py"]
    assert all((REPO / Path(argv[1]).relative_to(render.APP_DIR)).is_file() for argv in steps)
    # Hourly runs, each cut off before the next starts: two reindexes never publish at once.
    assert template["activeDeadlineSeconds"] < 3600


def test_renderer_rejects_a_lock_without_ray(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.0.0\n")
    with pytest.raises(ValueError, match="pins no ray version"):
        render.ray_version_from_lock(lock)
