"""docker-compose.yml, .env.example and the settings agree with each other."""
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def setting_variables() -> set[str]:
    text = (REPO / "compressor_ui" / "settings.py").read_text()
    return set(re.findall(r'env_(?:str|bool|int|list)\("([A-Z0-9_]+)"', text))


def test_env_example_lists_every_setting():
    listed = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
              if line and not line.startswith("#")}
    assert setting_variables() - listed == set()


def test_compose_parses_and_wires_web_worker_redis_postgres():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {name for name, svc in services.items() if not svc.get("profiles")} == {"web", "worker", "redis", "postgres"}
    worker = services["worker"]
    assert "-Q gpu" in worker["command"] and "--max-tasks-per-child 1" in worker["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    known = setting_variables() | {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert env["DATABASE_URL"].startswith("postgres://") and "@postgres:" in env["DATABASE_URL"]
        assert any(v.startswith("artifacts:") for v in services[name]["volumes"])
    assert services["web"]["environment"]["ARTIFACT_ROOT"] == services["worker"]["environment"]["ARTIFACT_ROOT"]


def test_compose_offers_an_s3_object_store_profile_wired_to_the_artifact_store_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["minio"]["profiles"] == ["s3"] and services["minio-bucket"]["profiles"] == ["s3"]
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert env["COMPRESSOR_ARTIFACT_STORE"].startswith("${COMPRESSOR_ARTIFACT_STORE:-local}")
        assert "COMPRESSOR_S3_ENDPOINT_URL" in env


def test_compose_offers_a_vllm_worker_in_its_own_image():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    worker = compose["services"]["worker-vllm"]
    assert worker["profiles"] == ["vllm"] and worker["build"]["dockerfile"] == "Dockerfile.vllm"
    assert worker["environment"]["COMPRESSOR_EVAL_BACKEND"] == "vllm" and "-Q gpu" in worker["command"]
    dockerfile = (REPO / "Dockerfile.vllm").read_text()
    assert "pip install vllm==" in dockerfile and "torch|" in dockerfile  # our torch pin is left to vLLM
