"""docker/compose.yaml without a Docker engine: the Compose Specification's JSON schema (the copy vendored
by the pinned check-jsonschema, `vendor.compose-spec`), then what `docker compose --profile cpu config`
would also catch, and that the `cpu` profile is `make stack` in containers."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from babelsynth.vllm_server import VLLMServer
from localstack.settings import STACK_ONLY, StackSettings, airflow_env, babelsynth_env

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
CHECK = [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def active(doc: dict, profile: str) -> dict[str, dict]:
    """The services `docker compose --profile <profile>` starts: those of the profile and those of none."""
    return {n: s for n, s in doc["services"].items() if "profiles" not in s or profile in s["profiles"]}


def test_the_compose_file_validates_against_the_compose_spec():
    r = subprocess.run([*CHECK, str(COMPOSE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path):
    """The check can fail: a healthcheck with `tests:` instead of `test:` is refused."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("healthcheck:\n      test:", "healthcheck:\n      tests:", 1))
    assert bad.read_text() != COMPOSE.read_text()
    r = subprocess.run([*CHECK, str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "tests" in r.stdout + r.stderr


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_dependencies_and_volumes_resolve_within_the_profile(profile):
    doc = compose()
    services = active(doc, profile)
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        missing = set(deps) - set(services)
        assert not missing, f"{profile}: {name} depends on {missing}, which the profile does not start"
        for v in svc.get("volumes") or []:
            src = v.split(":")[0]
            if not src.startswith(("/", ".", "$")):
                assert src in doc["volumes"], f"{name}: volume {src} is not declared"


def test_every_cpu_service_has_a_health_check_and_no_gpu():
    services = active(compose(), "cpu")
    assert {
        "postgres",
        "stack-init-cpu",
        "vllm-teacher-cpu",
        "vllm-llm-cpu",
        "airflow-api-cpu",
        "airflow-scheduler-cpu",
        "airflow-dag-processor-cpu",
        "airflow-triggerer-cpu",
    } <= set(services)
    for name, svc in services.items():
        assert (svc.get("healthcheck") or {}).get("test"), f"{name} has no health check"
        assert "deploy" not in svc, f"{name} reserves devices in the cpu profile"
        dockerfile = (svc.get("build") or {}).get("dockerfile", "")
        assert "gpu" not in dockerfile and "vllm.Dockerfile" not in dockerfile, (name, dockerfile)


def test_the_gpu_profile_keeps_the_production_services():
    services = active(compose(), "gpu")
    for name in ("vllm-teacher", "vllm-llm", "airflow-scheduler"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert not any(n.endswith("-cpu") for n in services)


def test_the_cpu_airflow_settings_are_the_stack_settings():
    env = compose()["services"]["airflow-api-cpu"]["environment"]
    stack = airflow_env(StackSettings(root=Path("/nonexistent-stack-root")))
    host_specific = {
        "AIRFLOW_HOME",
        "AIRFLOW__API__HOST",
        "AIRFLOW__API__PORT",
        "AIRFLOW__API_AUTH__JWT_SECRET",
    }
    for key in set(stack) - set(STACK_ONLY) - host_specific:
        assert key in env, key
        if "/" not in stack[key] and "127.0.0.1" not in stack[key]:
            assert str(env[key]) == stack[key], key
    secret_default = env["AIRFLOW__API_AUTH__JWT_SECRET"].split(":-", 1)[1].rstrip("}")
    assert len(secret_default.encode()) >= 64  # HS512: shorter keys make PyJWT warn on every call
    gpu_default = compose()["services"]["airflow-api"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert len(gpu_default.split(":-", 1)[1].rstrip("}").encode()) >= 64
    wanted = set(babelsynth_env(StackSettings())) - {"BABELSYNTH_VLLM_PYTHON"}
    assert wanted <= set(env), wanted - set(env)


def _flags(argv: list[str]) -> dict[str, str]:
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a], i = argv[i + 1], i + 1
        else:
            out[a] = ""
        i += 1
    return out


@pytest.mark.parametrize("service,multimodal", [("vllm-teacher-cpu", True), ("vllm-llm-cpu", False)])
def test_cpu_vllm_servers_run_the_flags_of_make_stack(service, multimodal):
    svc = compose()["services"][service]
    srv = VLLMServer(
        "/models/x", served_model_name="x", port=8000, multimodal=multimodal, python=sys.executable
    )
    want = _flags(srv.command()[3:])
    got = _flags(svc["command"])
    for k in ("--model", "--served-model-name", "--host", "--port"):
        want.pop(k), got.pop(k, None)
    assert got == want, shlex.join(svc["command"])


def test_cpu_services_build_images_that_exist_and_mount_configs_that_exist():
    for name, svc in active(compose(), "cpu").items():
        if "build" in svc:
            assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for value in (svc.get("environment") or {}).values():
            if isinstance(value, str) and value.startswith("/opt/babelsynth/"):
                assert (ROOT / value.removeprefix("/opt/babelsynth/")).exists(), f"{name}: {value}"
