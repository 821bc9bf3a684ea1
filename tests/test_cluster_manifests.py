"""Every cluster/*.yaml parses, has the kinds/apiVersions we mean, and its entry points name job
modules and config files that exist."""

from __future__ import annotations

import glob
import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {
    "raycluster.yaml": ("ray.io/v1", "RayCluster"),
    "rayjob-train.yaml": ("ray.io/v1", "RayJob"),
    "rayservice.yaml": ("ray.io/v1", "RayService"),
    "raycronjob-retrain.yaml": ("ray.io/v1", "RayCronJob"),
    "cronjob-retrain.yaml": ("batch/v1", "CronJob"),
}
# configs other parts of the project are still writing; each is named in the cluster helper's report


def docs(name: str) -> list[dict]:
    with open(os.path.join(REPO, "cluster", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_text() -> list[tuple[str, str]]:
    return [(os.path.basename(p), open(p).read()) for p in sorted(glob.glob(os.path.join(REPO, "cluster", "*.yaml")))]


def test_every_manifest_parses_with_expected_kind():
    names = {n for n, _ in all_text()}
    assert set(EXPECTED) | {"ray-up-aws.yaml", "serve_config.yaml"} <= names
    for name, (api, kind) in EXPECTED.items():
        (doc,) = docs(name)
        assert (doc["apiVersion"], doc["kind"]) == (api, kind), name
    for name, _ in all_text():
        docs(name)  # serve_config.yaml, ray-up-aws.yaml too


def test_raycluster_head_has_no_cpus_and_gpu_group_autoscales():
    spec = docs("raycluster.yaml")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_rayservice_serves_the_project_app_on_gpus_with_autoscaling():
    spec = docs("rayservice.yaml")[0]["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "pipelines.serve:build_app"
    assert app["args"]["num_gpus"] == 1 and app["args"]["autoscaling"]["max_replicas"] > 1
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_raycronjob_has_only_the_crd_fields_and_a_rayjob_template():
    spec = docs("raycronjob-retrain.yaml")[0]["spec"]
    assert set(spec) <= {"schedule", "timeZone", "suspend", "jobTemplate"}
    assert len(spec["schedule"].split()) == 5
    assert "jobs.schedule" in spec["jobTemplate"]["entrypoint"] and "rayClusterSpec" in spec["jobTemplate"]
    cron = docs("cronjob-retrain.yaml")[0]["spec"]
    assert "slime schedule" in cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_ray_up_launcher_keys():
    (cfg,) = docs("ray-up-aws.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("name,text", all_text())
def test_entry_points_reference_existing_jobs_and_configs(name, text):
    for module in re.findall(r"python -m jobs\.(\w+)", text) + re.findall(r"\bslime (\w+)", text):
        assert os.path.exists(os.path.join(REPO, "jobs", f"{module}.py")), f"{name}: jobs/{module}.py missing"
    for config in re.findall(r"(jobs/configs/[\w.-]+\.yaml)", text):
        assert os.path.exists(os.path.join(REPO, config)), f"{name}: {config} missing"
    for image in re.findall(r"image: (\S+)", text):
        assert image == "rayproject/ray:2.60.0-py311-gpu", f"{name}: {image}"
